//! The registry server's gRPC API (`lodestar.registry.v1.Registry`):
//! request messages decoded by the generated service (prost), then
//! validated and applied, in process, against a fresh server per input.
//!
//! Input: records of a method byte, a flags byte (bit 0: send the token;
//! bit 1: the payload is the raw body rather than one message to frame),
//! a 2-byte length and the payload. No write without the token succeeds,
//! and every unary call ends with a `grpc-status`.

#![no_main]

#[path = "common.rs"]
mod common;

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use lodestar_registry_server::fuzzing::Apis;
use tower::ServiceExt as _;

/// The methods, and whether each is a write.
const METHODS: [(&str, bool); 10] = [
    ("Register", true),
    ("Heartbeat", true),
    ("KeepAlive", true),
    ("Deregister", true),
    ("GetInstances", false),
    ("ListServices", false),
    ("Watch", false),
    ("SetEnabled", true),
    ("SetProtection", true),
    ("Status", false),
];

fuzz_target!(|input: &[u8]| {
    common::paused_runtime().block_on(async {
        let apis = Apis::new(Some(common::TOKEN)).expect("a server");
        let mut rest = input;
        for _ in 0..16 {
            let [method, flags, a, b, ref tail @ ..] = *rest else {
                break;
            };
            let len = usize::from(u16::from_be_bytes([a, b])).min(tail.len());
            let (payload, tail) = tail.split_at(len);
            rest = tail;
            let (name, write) = METHODS[usize::from(method) % METHODS.len()];
            let authorized = flags & 1 != 0;
            let body = if flags & 2 != 0 {
                payload.to_vec()
            } else {
                common::frame(0, payload)
            };
            let mut request = http::Request::builder()
                .method("POST")
                .uri(format!(
                    "http://registry/lodestar.registry.v1.Registry/{name}"
                ))
                .header("content-type", "application/grpc")
                .header("te", "trailers");
            if authorized {
                request = request.header("authorization", format!("Bearer {}", common::TOKEN));
            }
            let request = request
                .body(axum::body::Body::from(body))
                .expect("a valid request");
            let response =
                tokio::time::timeout(Duration::from_secs(60), apis.grpc.clone().oneshot(request))
                    .await
                    .expect("the gRPC API answers")
                    .expect("infallible");
            let headers = response.headers().clone();
            let (data, trailers) =
                common::collect(response.into_body(), Duration::from_secs(60), 64).await;
            let status = headers
                .get("grpc-status")
                .or_else(|| trailers.as_ref().and_then(|t| t.get("grpc-status")))
                .map(|v| v.as_bytes().to_vec());
            if write && !authorized {
                assert_ne!(
                    status.as_deref(),
                    Some(&b"0"[..]),
                    "{name} succeeded without the token"
                );
                assert!(data.is_empty(), "{name} answered without the token");
            }
            if !matches!(name, "Watch" | "KeepAlive") {
                assert!(status.is_some(), "{name} ended without a grpc-status");
            }
        }
    });
});

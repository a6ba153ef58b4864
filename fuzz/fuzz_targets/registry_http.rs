//! The registry server's HTTP/JSON API: requests through its real axum
//! router (path and query extraction, JSON bodies, validation, auth), in
//! process, against a fresh server per input.
//!
//! Input: requests separated by 0xFF bytes. Each is a line `METHOD PATH`
//! (a leading `!` sends the right `Authorization`), then the JSON body.
//! No request makes the server fail (500), and no write without the token
//! succeeds.

#![no_main]

#[path = "common.rs"]
mod common;

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use lodestar_registry_server::fuzzing::Apis;
use tower::ServiceExt as _;

fuzz_target!(|input: &[u8]| {
    common::paused_runtime().block_on(async {
        let apis = Apis::new(Some(common::TOKEN)).expect("a server");
        for request in input.split(|b| *b == 0xFF).take(16) {
            let (line, body) = match request.iter().position(|b| *b == b'\n') {
                Some(at) => (&request[..at], &request[at + 1..]),
                None => (request, &[][..]),
            };
            let Ok(line) = std::str::from_utf8(line) else {
                continue;
            };
            let (authorized, line) = match line.strip_prefix('!') {
                Some(rest) => (true, rest),
                None => (false, line),
            };
            let Some((method, path)) = line.split_once(' ') else {
                continue;
            };
            let mut builder = http::Request::builder()
                .method(method)
                .uri(path)
                .header("content-type", "application/json");
            if authorized {
                builder = builder.header("authorization", format!("Bearer {}", common::TOKEN));
            }
            let Ok(request) = builder.body(axum::body::Body::from(body.to_vec())) else {
                continue; // not a method or URI http can carry
            };
            let write = !matches!(request.method().as_str(), "GET" | "HEAD" | "OPTIONS");
            let response =
                tokio::time::timeout(Duration::from_secs(60), apis.http.clone().oneshot(request))
                    .await
                    .expect("the HTTP API answers")
                    .expect("infallible");
            let status = response.status();
            let (data, _) =
                common::collect(response.into_body(), Duration::from_secs(60), 1024).await;
            assert_ne!(
                status,
                http::StatusCode::INTERNAL_SERVER_ERROR,
                "{}",
                String::from_utf8_lossy(&data)
            );
            if write && !authorized {
                assert!(
                    !status.is_success(),
                    "{method} {path} succeeded without the token"
                );
            }
        }
    });
});

//! The HTTP broker's wire format: the raw bytes a publisher (or anyone)
//! sends to a subscriber's HTTP endpoint, served by the real hyper
//! connection and handler over an in-memory stream.
//!
//! Input: a byte choosing the body limit, then the bytes of the connection.
//! Every message delivered is of the subscription's topic and within the
//! limit.

#![no_main]

#[path = "common.rs"]
mod common;

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use lodestar_broker::fuzzing::serve_http;

const TOPIC: &str = "orders.created";

fuzz_target!(|input: &[u8]| {
    let [limit, ref bytes @ ..] = *input else {
        return;
    };
    let max_body = usize::from(limit) * 4;
    let served = common::paused_runtime().block_on(serve_http(
        bytes,
        TOPIC,
        max_body,
        Duration::from_secs(60),
    ));
    for message in &served.delivered {
        assert_eq!(message.topic, TOPIC);
        assert!(
            message.body.len() <= max_body,
            "a body of {} bytes passed the limit of {max_body}",
            message.body.len()
        );
    }
    // Each delivered message was answered 200, in HTTP/1.1 or 1.0 (pipelined requests may
    // get other answers before or after).
    let ok = served
        .response
        .windows(8)
        .filter(|w| w == b"200 OK\r\n")
        .count();
    assert!(
        ok >= served.delivered.len(),
        "{} messages delivered, {ok} answered 200:\n{}",
        served.delivered.len(),
        String::from_utf8_lossy(&served.response)
    );
});

//! The JSON transcoder (`application/grpc+json`): JSON to protobuf as a
//! server reads a request (and a client a response), and protobuf to JSON.
//!
//! Input: a direction byte, then a JSON or protobuf message of
//! `fuzz.Everything` (proto/fuzz.proto). Whatever one direction produces,
//! the other accepts.

#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use lodestar::Code;

fuzz_target!(|input: &[u8]| {
    let [direction, ref message @ ..] = *input else {
        return;
    };
    let transcoder = common::transcoder();
    if direction & 1 == 0 {
        match transcoder.json_to_proto(message) {
            Ok(proto) => {
                let json = transcoder
                    .proto_to_json(&proto)
                    .unwrap_or_else(|e| panic!("our own protobuf does not go back to JSON: {e:?}"));
                transcoder
                    .json_to_proto(&json)
                    .unwrap_or_else(|e| panic!("our own JSON does not parse: {e:?}"));
            }
            Err(status) => assert_eq!(status.code(), Code::InvalidArgument, "{status:?}"),
        }
    } else {
        match transcoder.proto_to_json(message) {
            Ok(json) => {
                let proto = transcoder.json_to_proto(&json).unwrap_or_else(|e| {
                    panic!(
                        "our own JSON does not parse: {e:?}\n{}",
                        String::from_utf8_lossy(&json)
                    )
                });
                transcoder
                    .proto_to_json(&proto)
                    .unwrap_or_else(|e| panic!("our own protobuf does not go back to JSON: {e:?}"));
            }
            Err(status) => assert_eq!(status.code(), Code::Internal, "{status:?}"),
        }
    }
});

//! How messages are encoded: protobuf, and JSON over gRPC.
//!
//! # JSON (`application/grpc+json`)
//!
//! gRPC frames carry protobuf by default. With the JSON codec each message
//! is the proto3 JSON form of the same message instead, which browsers,
//! `curl` users and scripts can read and write. lodestar transcodes with the
//! descriptors `lodestar-build` embeds, so services need no extra code:
//! every lodestar server accepts both, answering in the codec it was asked
//! in, and a client chooses with
//! [`ClientBuilder::codec`](crate::client::ClientBuilder::codec).

mod json;
mod protobuf;

pub(crate) use json::{Descriptors, Transcode};
pub use protobuf::ProstCodec;
pub(crate) use protobuf::{Encoded, SendScope};

/// The content type of gRPC with JSON messages.
pub(crate) const CONTENT_TYPE: &str = "application/grpc+json";

/// Whether `headers` say the messages are JSON (`application/grpc+json`,
/// parameters allowed).
pub(crate) fn is_json(headers: &http::HeaderMap) -> bool {
    let Some(value) = crate::headers::find_header(headers, &http::header::CONTENT_TYPE) else {
        return false;
    };
    // Every call asks: bytes only, no UTF-8 check or splitting; and most
    // carry `application/grpc`, too short to be JSON's, with no scan.
    let value = value.as_bytes();
    if value.len() < CONTENT_TYPE.len() {
        return false;
    }
    let media = value
        .iter()
        .position(|b| *b == b';')
        .map_or(value, |end| &value[..end])
        .trim_ascii();
    media.eq_ignore_ascii_case(CONTENT_TYPE.as_bytes())
}

/// How messages are encoded on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Codec {
    /// Protocol buffers, gRPC's default (`application/grpc`).
    #[default]
    Protobuf,
    /// The proto3 JSON mapping (`application/grpc+json`).
    Json,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_json_content_types_are_json() {
        let json = |value: &'static str| {
            let mut headers = http::HeaderMap::new();
            headers.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(value),
            );
            is_json(&headers)
        };
        for yes in [
            "application/grpc+json",
            "Application/GRPC+JSON",
            "application/grpc+json; charset=utf-8",
            "application/grpc+json ;x=y",
        ] {
            assert!(json(yes), "{yes}");
        }
        for no in [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc+jso",
            "application/grpc+jsonx",
            "",
        ] {
            assert!(!json(no), "{no}");
        }
        assert!(!is_json(&http::HeaderMap::new()));
    }
}

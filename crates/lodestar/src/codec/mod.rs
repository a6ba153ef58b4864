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
pub(crate) use protobuf::with_send_limit;

/// The content type of gRPC with JSON messages.
pub(crate) const CONTENT_TYPE: &str = "application/grpc+json";

/// Whether `headers` say the messages are JSON (`application/grpc+json`,
/// parameters allowed).
pub(crate) fn is_json(headers: &http::HeaderMap) -> bool {
    let Some(value) = headers.get(http::header::CONTENT_TYPE) else {
        return false;
    };
    // Every call asks: bytes only, no UTF-8 check or splitting.
    let value = value.as_bytes();
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

//! Entry points for the fuzz targets in `fuzz/` (not part of the API).
//!
//! They drive the real parsers a peer's bytes reach (gRPC framing and its
//! size limit, decompression, JSON transcoding) without a socket, so a fuzz
//! target can feed them millions of inputs a second.

use std::convert::Infallible;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http_body::{Body as _, Frame};
use prost_reflect::{DescriptorPool, MessageDescriptor};

use crate::body::CallBody;
use crate::codec::Transcode;
use crate::compression::{Encoding, PerMessage};
use crate::frames::{Decompress, Reframer};

/// The transcoder of one message type, from an encoded `FileDescriptorSet`.
#[derive(Debug, Clone)]
pub struct Transcoder {
    message: MessageDescriptor,
}

impl Transcoder {
    /// The transcoder of `message` (a full name) in `set`.
    pub fn new(set: &[u8], message: &str) -> Result<Self, String> {
        let pool = DescriptorPool::decode(set).map_err(|e| e.to_string())?;
        let message = pool
            .get_message_by_name(message)
            .ok_or_else(|| format!("no message `{message}` in the set"))?;
        Ok(Self { message })
    }

    /// JSON to protobuf, as a server reads a JSON request.
    pub fn json_to_proto(&self, json: &[u8]) -> Result<Vec<u8>, tonic::Status> {
        self.reading_json().apply(json)
    }

    /// Protobuf to JSON, as a server writes a JSON response.
    pub fn proto_to_json(&self, proto: &[u8]) -> Result<Vec<u8>, tonic::Status> {
        Transcode::ProtoToJson(self.message.clone()).apply(proto)
    }

    /// JSON to protobuf, the peer at fault for bad JSON.
    fn reading_json(&self) -> Transcode {
        Transcode::JsonToProto {
            descriptor: self.message.clone(),
            peer_is_at_fault: true,
        }
    }
}

/// What a received body's messages go through after the size limit.
#[derive(Debug, Clone)]
pub enum Rewrite {
    /// Nothing: protobuf as it came.
    None,
    /// Decompressed (when `gzip`, else compressed messages are an error)
    /// and transcoded from JSON, as a server receives a JSON request and a
    /// client a JSON response.
    FromJson {
        /// Whether the call's `grpc-encoding` is gzip.
        gzip: bool,
    },
    /// Compressed, all by `default` or as `plan` says, as a server sends a
    /// response.
    Compress {
        /// Whether messages without a choice are compressed.
        default: bool,
        /// The per-message choices.
        plan: Option<Vec<bool>>,
    },
}

/// What came out of a body: its data, and the error it ended with.
#[derive(Debug, Default)]
pub struct Received {
    /// The data frames, in order.
    pub data: Vec<Bytes>,
    /// The status the body ended with, if it failed.
    pub error: Option<tonic::Status>,
}

/// Receives a body of `chunks` through [`CallBody`] with the message size
/// `limit` (which also bounds decompression) and `rewrite`.
pub fn receive(
    chunks: Vec<Bytes>,
    limit: usize,
    rewrite: Rewrite,
    transcoder: &Transcoder,
) -> Received {
    let reframer = match rewrite {
        Rewrite::None => None,
        Rewrite::FromJson { gzip } => Some(Reframer::transcoding(
            transcoder.reading_json(),
            Decompress { limit, gzip },
        )),
        Rewrite::Compress { default, plan } => {
            let plan = plan.map(|choices| {
                let plan = PerMessage::new();
                for choice in choices {
                    plan.push(choice);
                }
                plan
            });
            Some(Reframer::compressing(Encoding::Gzip, default, plan))
        }
    };
    let frames = chunks
        .into_iter()
        .map(|chunk| Ok::<_, Infallible>(Frame::data(chunk)));
    let inner = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
    let mut body = pin!(CallBody::new(inner, None, Some(limit)).with_reframer(reframer));
    let mut received = Received::default();
    let mut cx = Context::from_waker(Waker::noop());
    // Every poll is ready: the chunks are all there and there is no deadline.
    while let Poll::Ready(Some(frame)) = body.as_mut().poll_frame(&mut cx) {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    received.data.push(data);
                }
            }
            Err(error) => {
                received.error = Some(match error.downcast::<tonic::Status>() {
                    Ok(status) => *status,
                    Err(other) => tonic::Status::unknown(other.to_string()),
                });
                break;
            }
        }
    }
    received
}

/// Decompresses one gzip message, refusing any over `limit` bytes.
pub fn gunzip(message: &[u8], limit: usize) -> Result<Vec<u8>, tonic::Status> {
    crate::compression::gunzip(message, limit)
}

/// Compresses one message with gzip.
pub fn gzip(message: &[u8]) -> Result<Vec<u8>, tonic::Status> {
    crate::compression::gzip(message)
}

//! Message compression.
//!
//! gRPC compresses each message on its own: a message's frame says whether
//! it is compressed, and the `grpc-encoding` header says with what. A peer
//! lists what it can decompress in `grpc-accept-encoding`.
//!
//! lodestar **receives** gzip always. It **sends** compressed messages when
//! asked to ([`ClientBuilder::send_compressed`](crate::client::ClientBuilder::send_compressed),
//! [`ServiceBuilder::send_compressed`](crate::ServiceBuilder::send_compressed)),
//! and a server only compresses for a client that accepts the encoding: a
//! client that does not still gets plain messages.
//!
//! A call can turn compression on or off for itself with a [`Compress`]
//! extension (on the request, or on a server's response), and a stream can
//! choose per message with [`PerMessage`].
//!
//! ```
//! use lodestar::compression::Compress;
//!
//! let mut request = lodestar::Request::new(());
//! request.extensions_mut().insert(Compress(false)); // this call goes uncompressed
//! ```

use std::collections::VecDeque;
use std::io::Write as _;
use std::sync::{Arc, Mutex};

use bytes::{BufMut, Bytes, BytesMut};
use http::HeaderValue;

/// A compression algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Encoding {
    /// gzip (RFC 1952), the one every gRPC implementation supports.
    Gzip,
}

impl Encoding {
    /// The name used in `grpc-encoding` headers.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Gzip => "gzip",
        }
    }

    pub(crate) fn header_value(self) -> HeaderValue {
        HeaderValue::from_static(self.name())
    }

    /// Whether a `grpc-accept-encoding` value lists this encoding.
    pub(crate) fn accepted_by(self, accept: Option<&HeaderValue>) -> bool {
        accept.and_then(|v| v.to_str().ok()).is_some_and(|v| {
            v.split(',')
                .any(|e| e.trim().eq_ignore_ascii_case(self.name()))
        })
    }
}

/// Turns compression on or off for one call: put it in the extensions of a
/// request (client) or of a response (server). Off wins over the default;
/// on needs a configured encoding and, on a server, a client that accepts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compress(pub bool);

/// Chooses, message by message, which messages of a stream are compressed.
///
/// Put a clone in the extensions of the request (client) or response
/// (server), and [`push`](Self::push) one choice before sending each
/// message; messages without a choice follow the call's default.
#[derive(Debug, Clone, Default)]
pub struct PerMessage(Arc<Mutex<VecDeque<bool>>>);

impl PerMessage {
    /// An empty plan.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the next message sent is compressed.
    pub fn push(&self, compress: bool) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(compress);
    }

    fn pop(&self) -> Option<bool> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).pop_front()
    }
}

/// Whether each received message was compressed, in order, for servers and
/// clients that turn on `inspect_compression`. Found in the extensions of a
/// request (server) or response (client).
#[derive(Debug, Clone, Default)]
pub struct ReceivedFlags(Arc<Mutex<VecDeque<bool>>>);

impl ReceivedFlags {
    /// Whether the oldest message not yet asked about was compressed
    /// (`None` if no message has arrived since).
    pub fn next(&self) -> Option<bool> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).pop_front()
    }

    /// The flags of an inbound request, if the server records them.
    pub fn of<T>(request: &tonic::Request<T>) -> Option<ReceivedFlags> {
        request.extensions().get::<ReceivedFlags>().cloned()
    }

    pub(crate) fn record(&self, compressed: bool) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(compressed);
    }
}

/// Compresses the messages of an outgoing gRPC body: it collects whole
/// frames and rewrites each one the plan says to compress.
#[derive(Debug)]
pub(crate) struct Compressor {
    encoding: Encoding,
    default: bool,
    plan: Option<PerMessage>,
    pending: BytesMut,
}

impl Compressor {
    pub(crate) fn new(encoding: Encoding, default: bool, plan: Option<PerMessage>) -> Self {
        Self {
            encoding,
            default,
            plan,
            pending: BytesMut::new(),
        }
    }

    /// Takes the next chunk of the body; returns the frames it completed,
    /// compressed as planned (possibly empty, while a frame is incomplete).
    pub(crate) fn feed(&mut self, data: &Bytes) -> Result<Bytes, tonic::Status> {
        if self.pending.is_empty() && !self.default && self.plan.is_none() {
            return Ok(data.clone());
        }
        self.pending.extend_from_slice(data);
        let mut out = BytesMut::new();
        loop {
            if self.pending.len() < 5 {
                break;
            }
            let flag = self.pending[0];
            let len = u32::from_be_bytes([
                self.pending[1],
                self.pending[2],
                self.pending[3],
                self.pending[4],
            ]) as usize;
            if self.pending.len() < 5 + len {
                break;
            }
            let frame = self.pending.split_to(5 + len);
            let compress = self
                .plan
                .as_ref()
                .and_then(PerMessage::pop)
                .unwrap_or(self.default);
            if flag != 0 || !compress {
                out.extend_from_slice(&frame);
                continue;
            }
            let compressed = self.compress(&frame[5..])?;
            let len = u32::try_from(compressed.len())
                .map_err(|_| tonic::Status::resource_exhausted("compressed message too large"))?;
            out.put_u8(1);
            out.put_u32(len);
            out.extend_from_slice(&compressed);
        }
        Ok(out.freeze())
    }

    /// Whether a partial frame is still waiting for the rest of its bytes.
    pub(crate) fn has_partial_frame(&self) -> bool {
        !self.pending.is_empty()
    }

    fn compress(&self, message: &[u8]) -> Result<Vec<u8>, tonic::Status> {
        match self.encoding {
            Encoding::Gzip => {
                let mut encoder = flate2::write::GzEncoder::new(
                    Vec::with_capacity(message.len() / 2 + 16),
                    flate2::Compression::default(),
                );
                encoder
                    .write_all(message)
                    .and_then(|()| encoder.finish())
                    .map_err(|e| tonic::Status::internal(format!("gzip: {e}")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0];
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn frames(mut data: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        while !data.is_empty() {
            let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
            out.push((data[0], data[5..5 + len].to_vec()));
            data = &data[5 + len..];
        }
        out
    }

    #[test]
    fn compresses_as_planned_across_chunk_boundaries() {
        let plan = PerMessage::new();
        plan.push(true);
        plan.push(false);
        let mut compressor = Compressor::new(Encoding::Gzip, true, Some(plan));
        let first = vec![0u8; 1000];
        let mut body = frame(&first);
        body.extend(frame(b"plain"));
        body.extend(frame(b"default"));
        let mut out = Vec::new();
        for chunk in body.chunks(7) {
            out.extend_from_slice(&compressor.feed(&Bytes::copy_from_slice(chunk)).unwrap());
        }
        assert!(!compressor.has_partial_frame());
        let out = frames(&out);
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].0, 1);
        assert!(out[0].1.len() < 100, "1000 zeros compress well");
        let mut inflated = Vec::new();
        flate2::read::GzDecoder::new(&out[0].1[..])
            .read_to_end(&mut inflated)
            .unwrap();
        assert_eq!(inflated, first);
        assert_eq!(out[1], (0, b"plain".to_vec()));
        assert_eq!(out[2].0, 1, "messages without a choice follow the default");
    }

    #[test]
    fn reads_accept_encoding_lists() {
        let accept = HeaderValue::from_static("identity, deflate,GZIP");
        assert!(Encoding::Gzip.accepted_by(Some(&accept)));
        assert!(!Encoding::Gzip.accepted_by(Some(&HeaderValue::from_static("identity"))));
        assert!(!Encoding::Gzip.accepted_by(None));
    }
}

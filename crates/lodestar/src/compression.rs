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

use http::{HeaderName, HeaderValue};
use lodestar_core::sync::MutexExt;

/// The header naming how a call's messages are compressed.
pub(crate) const GRPC_ENCODING: HeaderName = HeaderName::from_static("grpc-encoding");

/// The header listing the encodings a peer can decompress.
pub(crate) const GRPC_ACCEPT_ENCODING: HeaderName = HeaderName::from_static("grpc-accept-encoding");

/// What lodestar can decompress, as `grpc-accept-encoding` lists it.
pub(crate) const ACCEPTED: HeaderValue = HeaderValue::from_static("gzip");

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

    /// Whether the next message sent is compressed. At most 1024 choices
    /// wait at once (the oldest go first): choices for a call that turns
    /// out not to compress are never taken.
    pub fn push(&self, compress: bool) {
        push_bounded(&self.0, compress);
    }

    /// The choice for the next message, if one was made.
    pub(crate) fn next_choice(&self) -> Option<bool> {
        self.0.lock_unpoisoned().pop_front()
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
        self.0.lock_unpoisoned().pop_front()
    }

    /// The flags of an inbound request, if the server records them.
    pub fn of<T>(request: &tonic::Request<T>) -> Option<ReceivedFlags> {
        request.extensions().get::<ReceivedFlags>().cloned()
    }

    /// Records a flag; at most the last 1024 are kept for a reader that
    /// does not keep up.
    pub(crate) fn record(&self, compressed: bool) {
        push_bounded(&self.0, compressed);
    }
}

/// How many per-message flags or choices wait at most.
const MAX_WAITING: usize = 1024;

fn push_bounded(queue: &Mutex<VecDeque<bool>>, value: bool) {
    let mut queue = queue.lock_unpoisoned();
    if queue.len() >= MAX_WAITING {
        queue.pop_front();
    }
    queue.push_back(value);
}

pub(crate) fn gzip(message: &[u8]) -> Result<Vec<u8>, tonic::Status> {
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(message.len() / 2 + 16),
        flate2::Compression::default(),
    );
    encoder
        .write_all(message)
        .and_then(|()| encoder.finish())
        .map_err(|e| tonic::Status::internal(format!("gzip: {e}")))
}

pub(crate) fn gunzip(message: &[u8], limit: usize) -> Result<Vec<u8>, tonic::Status> {
    use std::io::Read as _;
    let mut out = Vec::new();
    let read = flate2::read::GzDecoder::new(message)
        // One byte past the limit tells "over" from "exactly"; a limit of
        // usize::MAX (no limit) must not wrap to reading nothing.
        .take((limit as u64).saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| {
            tonic::Status::internal(format!("a gzip-compressed message is corrupt: {e}"))
        })?;
    if read > limit {
        return Err(tonic::Status::resource_exhausted(format!(
            "a compressed message decompresses to more than the limit of {limit} bytes \
             (MessageLimits::max_decoding_message_size)"
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_choices_and_flags_are_bounded() {
        let plan = PerMessage::new();
        let flags = ReceivedFlags::default();
        for i in 0..5000 {
            plan.push(i % 2 == 0);
            flags.record(true);
        }
        assert_eq!(plan.0.lock().unwrap().len(), 1024);
        assert_eq!(flags.0.lock().unwrap().len(), 1024);
        // The oldest choices went first.
        // The oldest choices went first: the oldest kept is push 3976, an even one.
        assert_eq!(plan.next_choice(), Some(true));
        assert_eq!(plan.next_choice(), Some(false));
    }

    #[test]
    fn an_unlimited_decompression_limit_still_decompresses() {
        let message = gzip(b"hello").unwrap();
        assert_eq!(gunzip(&message, usize::MAX).unwrap(), b"hello");
    }

    #[test]
    fn reads_accept_encoding_lists() {
        let accept = HeaderValue::from_static("identity, deflate,GZIP");
        assert!(Encoding::Gzip.accepted_by(Some(&accept)));
        assert!(!Encoding::Gzip.accepted_by(Some(&HeaderValue::from_static("identity"))));
        assert!(!Encoding::Gzip.accepted_by(None));
    }
}

//! The protobuf codec of generated services: prost's, with the send limit
//! checked before a message is encoded rather than after.
//!
//! A body that sends messages (a server's response, a client's request)
//! polls the encoding inside a [`SendScope`]. The encoder asks each
//! message for its `encoded_len()`, and one over the limit is not encoded
//! at all (no buffer the size of the message is allocated); the body then
//! delivers the messages before it and ends the call with
//! `RESOURCE_EXHAUSTED`. Outside such a scope, messages are encoded as they are.

use std::cell::Cell;
use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{Codec, EncodeBuf, Encoder};

/// tonic's prost codec, whose encoder checks the send limit first. The
/// code `lodestar-build` generates uses it.
#[derive(Debug, Clone)]
pub struct ProstCodec<T, U>(tonic_prost::ProstCodec<T, U>);

impl<T, U> Default for ProstCodec<T, U> {
    fn default() -> Self {
        Self(tonic_prost::ProstCodec::default())
    }
}

impl<T, U> Codec for ProstCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = CheckedEncoder<T>;
    type Decoder = <tonic_prost::ProstCodec<T, U> as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        CheckedEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        self.0.decoder()
    }
}

/// Encodes `T` with prost, unless it is over the current send limit.
#[derive(Debug)]
pub struct CheckedEncoder<T>(PhantomData<T>);

impl<T: Message> Encoder for CheckedEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        let len = item.encoded_len();
        if !admit(len) {
            // Left empty; the body polling us cuts the stream before it.
            return Ok(());
        }
        // The length is known: encode without measuring the message again
        // (prost's `encode` would, to check the capacity `EncodeBuf` grows
        // to anyway).
        dst.reserve(len);
        item.encode_raw(dst);
        Ok(())
    }
}

/// A message the encoder refused: the how-manieth of the messages encoded
/// during one poll it was (from 0), and its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refused {
    index: usize,
    pub(crate) len: usize,
}

impl Refused {
    /// Where the refused message's frame starts in `data`, the bytes that
    /// one poll of the encoding yielded (whole frames, in order).
    pub(crate) fn offset_in(&self, data: &[u8]) -> usize {
        let mut at = 0usize;
        for _ in 0..self.index {
            let Some(&[_, a, b, c, d]) = data.get(at..at.saturating_add(5)) else {
                break;
            };
            at = at.saturating_add(5 + u32::from_be_bytes([a, b, c, d]) as usize);
        }
        at.min(data.len())
    }
}

#[derive(Debug, Clone, Copy)]
struct Scope {
    limit: usize,
    encoded: usize,
    refused: Option<Refused>,
}

thread_local! {
    static SCOPE: Cell<Option<Scope>> = const { Cell::new(None) };
}

/// What the encoder did during one poll of a body.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Encoded {
    /// The first message refused, if any.
    pub(crate) refused: Option<Refused>,
    /// How many messages were encoded (or refused) with the limit checked.
    /// When some were, the data the poll yielded is those messages' frames,
    /// whole: it need not be scanned for their sizes again.
    pub(crate) checked: usize,
}

/// The send limit of one poll of a body that encodes messages: set by
/// [`enter`](Self::enter), read back by [`finish`](Self::finish), and the
/// outer scope (if any) put back when dropped, even if the poll panics.
/// A guard rather than a closure, so that what the poll returns (a frame,
/// over 100 bytes) is not moved through one.
#[must_use = "the scope ends when dropped"]
pub(crate) struct SendScope {
    outer: Option<Scope>,
}

impl SendScope {
    /// Makes `limit` the send limit until [`finish`](Self::finish).
    pub(crate) fn enter(limit: usize) -> Self {
        let outer = SCOPE.replace(Some(Scope {
            limit,
            encoded: 0,
            refused: None,
        }));
        Self { outer }
    }

    /// What the encoder did since [`enter`](Self::enter).
    pub(crate) fn finish(self) -> Encoded {
        SCOPE.get().map_or_else(Encoded::default, |scope| Encoded {
            refused: scope.refused,
            checked: scope.encoded,
        })
    }
}

impl Drop for SendScope {
    fn drop(&mut self) {
        SCOPE.set(self.outer);
    }
}

/// Whether a message of `len` bytes may be encoded now; records it if not.
/// After one refusal, the rest of the poll's messages are refused too.
fn admit(len: usize) -> bool {
    let Some(mut scope) = SCOPE.get() else {
        return true;
    };
    let index = scope.encoded;
    scope.encoded += 1;
    let admitted = scope.refused.is_none() && len <= scope.limit;
    if !admitted && scope.refused.is_none() {
        scope.refused = Some(Refused { index, len });
    }
    SCOPE.set(Some(scope));
    admitted
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;
    use prost_types::Any;

    fn message(len: usize) -> Any {
        Any {
            type_url: String::new(),
            value: vec![7; len],
        }
    }

    #[test]
    fn an_oversized_message_is_not_encoded() {
        let messages = futures_util::stream::iter(
            [message(10), message(1000), message(10)].map(Ok::<_, Status>),
        );
        let body = tonic::codec::EncodeBody::new_server(
            ProstCodec::<Any, Any>::default().encoder(),
            messages,
            None,
            tonic::codec::SingleMessageCompressionOverride::Inherit,
            None,
        );
        let mut body = std::pin::pin!(body);
        let waker = futures_util::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        let scope = SendScope::enter(100);
        let frame = body.as_mut().poll_frame(&mut cx);
        let encoded = scope.finish();
        assert_eq!(encoded.checked, 3, "each message, refused or not");
        let refused = encoded.refused;
        let data = match frame {
            std::task::Poll::Ready(Some(Ok(frame))) => frame.into_data().unwrap(),
            other => panic!("{other:?}"),
        };
        let refused = refused.expect("the second message is over the limit");
        assert_eq!(refused.len, message(1000).encoded_len());
        // The small message whole, then empty frames: 1000 bytes were never written.
        let small = 5 + message(10).encoded_len();
        assert_eq!(refused.offset_in(&data), small);
        assert_eq!(data.len(), small + 5 + 5, "{data:?}");
        // Outside a scope, nothing is checked.
        assert!(admit(usize::MAX));
    }
}

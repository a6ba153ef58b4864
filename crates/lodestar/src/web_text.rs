//! gRPC-Web text (`application/grpc-web-text`): the gRPC-Web body in
//! base64 (the standard alphabet, padded), both ways, as it streams.
//!
//! The spec lets each side pad wherever it flushes, so a body is a run of
//! *segments*, each valid padded base64 on its own: `aGVsbG8=IQ==` is
//! `hello` then `!`. The encoder (the client's requests) pads only where
//! it must (when the request's next message is not ready yet, and at its
//! end), so a unary request is one segment, which every server takes
//! (tonic-web decodes a request as one run of base64). The decoder (the
//! client's responses and the server's requests) takes segments split
//! anywhere: it holds back at most three characters of an incomplete group
//! of four, and decodes each chunk as it comes, so the frames it yields
//! are gRPC-Web's binary frames, read on as binary ones are (and bounded
//! the same way, by the reader's receive limit).

use std::pin::Pin;
use std::task::{Context, Poll};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http_body::{Body, Frame};

use crate::body::RequestBody;

/// Once a chunk of a request's base64 reaches 32 KiB (a multiple of
/// four), it goes out, even if the body has more ready (a message's
/// frame is encoded whole, so one chunk may be larger).
const MAX_CHUNK: usize = 32 * 1024;

/// A request body in base64, encoded as its frames come.
pub(crate) struct EncodeText {
    inner: RequestBody,
    /// The bytes of an incomplete group of three, for the next frame.
    carry: [u8; 2],
    held: usize,
    /// An error of the body, yielded after the data before it.
    failed: Option<tonic::Status>,
    ended: bool,
}

impl EncodeText {
    pub(crate) fn new(inner: RequestBody) -> Self {
        Self {
            inner,
            carry: [0; 2],
            held: 0,
            failed: None,
            ended: false,
        }
    }

    /// Appends `data`'s complete groups of three (after those held back)
    /// to `out` in base64, and holds back the rest.
    fn encode(&mut self, mut data: &[u8], out: &mut String) {
        if self.held > 0 {
            let take = (3 - self.held).min(data.len());
            let mut group = [0u8; 3];
            group[..self.held].copy_from_slice(&self.carry[..self.held]);
            group[self.held..self.held + take].copy_from_slice(&data[..take]);
            data = &data[take..];
            if self.held + take < 3 {
                self.carry[..self.held + take].copy_from_slice(&group[..self.held + take]);
                self.held += take;
                return;
            }
            STANDARD.encode_string(group, out);
            self.held = 0;
        }
        let whole = data.len() - data.len() % 3;
        STANDARD.encode_string(&data[..whole], out);
        let tail = &data[whole..];
        self.carry[..tail.len()].copy_from_slice(tail);
        self.held = tail.len();
    }

    /// Appends the bytes held back to `out`, padded.
    fn flush(&mut self, out: &mut String) {
        if self.held > 0 {
            STANDARD.encode_string(&self.carry[..self.held], out);
            self.held = 0;
        }
    }
}

impl Body for EncodeText {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = &mut *self;
        if let Some(status) = this.failed.take() {
            this.ended = true;
            return Poll::Ready(Some(Err(status)));
        }
        if this.ended {
            return Poll::Ready(None);
        }
        let mut out = String::new();
        let ready = |out: String| Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
        loop {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    // A gRPC request has no trailers: only data is sent.
                    if let Ok(data) = frame.into_data() {
                        this.encode(&data, &mut out);
                        if out.len() >= MAX_CHUNK {
                            return ready(out);
                        }
                    }
                }
                Poll::Ready(Some(Err(status))) => {
                    // The messages before the error are whole: they go first.
                    this.flush(&mut out);
                    if out.is_empty() {
                        this.ended = true;
                        return Poll::Ready(Some(Err(status)));
                    }
                    this.failed = Some(status);
                    return ready(out);
                }
                Poll::Ready(None) => {
                    this.ended = true;
                    this.flush(&mut out);
                    if out.is_empty() {
                        return Poll::Ready(None);
                    }
                    return ready(out);
                }
                Poll::Pending => {
                    // The next message is not ready: what is here goes now,
                    // padded, so that the server can read the message whole.
                    this.flush(&mut out);
                    if out.is_empty() {
                        return Poll::Pending;
                    }
                    return ready(out);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || (self.held == 0 && self.failed.is_none() && self.inner.is_end_stream())
    }
}

/// Decodes a response body from base64 as its chunks come.
#[derive(Debug, Default)]
pub(crate) struct DecodeText {
    /// The characters of an incomplete group of four.
    carry: [u8; 4],
    held: usize,
    /// How many characters came before this chunk.
    offset: u64,
}

impl DecodeText {
    /// The bytes that `chunk`'s complete groups (with those held back)
    /// stand for; an incomplete group is held back for the next chunk. A
    /// chunk with a bad group yields none of its bytes, only the error
    /// (the body is broken: its call ends).
    pub(crate) fn decode(&mut self, chunk: &[u8]) -> Result<Bytes, NotBase64> {
        let start = self.offset;
        self.offset += chunk.len() as u64;
        let mut out = Vec::with_capacity((self.held + chunk.len()) / 4 * 3);
        let mut rest = chunk;
        if self.held > 0 {
            let take = (4 - self.held).min(rest.len());
            self.carry[self.held..self.held + take].copy_from_slice(&rest[..take]);
            rest = &rest[take..];
            self.held += take;
            if self.held < 4 {
                return Ok(Bytes::new());
            }
            // The group began `held - take` characters before this chunk.
            let at = start + take as u64 - 4;
            decode_segment(&self.carry, at, &mut out)?;
            self.held = 0;
        }
        let base = start + (chunk.len() - rest.len()) as u64;
        let whole = rest.len() - rest.len() % 4;
        let (groups, tail) = rest.split_at(whole);
        // Segments end with a padded group (padding may fall anywhere a
        // group ends) or with the chunk's last whole group.
        let mut from = 0;
        while from < groups.len() {
            let end = match groups[from..].iter().position(|b| *b == b'=') {
                Some(pad) => (from + pad) / 4 * 4 + 4,
                None => groups.len(),
            };
            decode_segment(&groups[from..end], base + from as u64, &mut out)?;
            from = end;
        }
        self.carry[..tail.len()].copy_from_slice(tail);
        self.held = tail.len();
        Ok(Bytes::from(out))
    }

    /// Whether characters of an incomplete group are held back (a body that
    /// ends here is not whole).
    pub(crate) fn holds(&self) -> usize {
        self.held
    }
}

/// Decodes whole groups of four, the first at `at` in the body, onto
/// `out`.
fn decode_segment(segment: &[u8], at: u64, out: &mut Vec<u8>) -> Result<(), NotBase64> {
    STANDARD.decode_vec(segment, out).map_err(|error| {
        use base64::DecodeError;
        let what = match error {
            DecodeError::InvalidByte(i, b'=') => {
                format!(
                    "padding `=` at offset {} where a group of four cannot be padded",
                    at + i as u64
                )
            }
            DecodeError::InvalidByte(i, byte) => format!(
                "byte 0x{byte:02x} ({:?}) at offset {} is not in the standard alphabet",
                char::from(byte),
                at + i as u64
            ),
            DecodeError::InvalidLastSymbol(i, byte) => format!(
                "the symbol {:?} at offset {} leaves bits set past the data",
                char::from(byte),
                at + i as u64
            ),
            DecodeError::InvalidLength(_) | DecodeError::InvalidPadding => format!(
                "the group of four at offsets {}..{} is malformed (padding must end a group \
                 with one or two `=`)",
                at,
                at + segment.len() as u64
            ),
        };
        NotBase64(what)
    })
}

/// Text that is not base64 (the standard alphabet, padded): what is wrong,
/// and at which offset of the body. Each side makes it its status: a
/// server's `INVALID_ARGUMENT` (the request), a client's `INTERNAL` (the
/// response).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NotBase64(String);

impl std::fmt::Display for NotBase64 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `chunks` in order; the bytes, and what is held back.
    fn decode_all(chunks: &[&[u8]]) -> Result<(Vec<u8>, usize), NotBase64> {
        let mut decoder = DecodeText::default();
        let mut out = Vec::new();
        for chunk in chunks {
            out.extend_from_slice(&decoder.decode(chunk)?);
        }
        Ok((out, decoder.holds()))
    }

    #[test]
    fn decodes_padded_segments_split_at_every_offset() {
        // Three segments, padded as a server pads each flush: 5, 1 and 6
        // bytes (padding `=`, `==`, and none).
        let parts: [&[u8]; 3] = [b"hello", b"!", b"\x00\xff\x80abc"];
        let text: String = parts.iter().map(|p| STANDARD.encode(p)).collect();
        let text = text.as_bytes();
        let whole: Vec<u8> = parts.concat();
        for cut in 0..=text.len() {
            let (out, held) = decode_all(&[&text[..cut], &text[cut..]]).unwrap();
            assert_eq!(
                (out.as_slice(), held),
                (whole.as_slice(), 0),
                "cut at {cut}"
            );
            for second in cut..=text.len() {
                let chunks = [&text[..cut], &text[cut..second], &text[second..]];
                let (out, held) = decode_all(&chunks).unwrap();
                assert_eq!(out, whole, "cut at {cut} and {second}");
                assert_eq!(held, 0);
            }
        }
        let bytes: Vec<&[u8]> = text.chunks(1).collect();
        assert_eq!(decode_all(&bytes).unwrap().0, whole, "byte by byte");
        // A body that stops inside a group holds its characters back.
        assert_eq!(
            decode_all(&[b"aGVsbG8=IQ"]).unwrap(),
            (b"hello".to_vec(), 2)
        );
    }

    #[test]
    fn invalid_base64_names_the_byte_and_its_offset() {
        let error = |chunks: &[&[u8]]| decode_all(chunks).unwrap_err().to_string();
        // The bad byte is the 11th character of the body, wherever it is cut.
        for cut in 0..=12 {
            let body = b"aGVsbG8=IQ*=";
            let message = error(&[&body[..cut], &body[cut..]]);
            assert!(
                message.contains("0x2a") && message.contains("offset 10"),
                "cut at {cut}: {message}"
            );
        }
        let message = error(&[b"aGVs", b"b=G8"]);
        assert!(
            message.contains("offset 5") && message.contains('='),
            "{message}"
        );
        let message = error(&[b"aGVsa==="]);
        assert!(message.contains("`=` at offset 5"), "{message}");
        let message = error(&[b"QR=="]);
        assert!(message.contains("offset 1"), "{message}");
        let message = error(&[b"aGVsbG8=\r\nIQ=="]);
        assert!(
            message.contains("0x0d") && message.contains("offset 8"),
            "{message}"
        );
    }

    /// A body that yields what it is given, in order, then ends.
    struct Scripted(std::collections::VecDeque<Poll<Result<Frame<Bytes>, tonic::Status>>>);

    impl Body for Scripted {
        type Data = Bytes;
        type Error = tonic::Status;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
            match self.0.pop_front() {
                Some(Poll::Ready(frame)) => Poll::Ready(Some(frame)),
                Some(Poll::Pending) => Poll::Pending,
                None => Poll::Ready(None),
            }
        }

        fn is_end_stream(&self) -> bool {
            self.0.is_empty()
        }
    }

    fn request(script: Vec<Poll<Result<Frame<Bytes>, tonic::Status>>>) -> RequestBody {
        RequestBody::unchecked(
            tonic::body::Body::new(Scripted(script.into())),
            Default::default(),
        )
    }

    fn data(bytes: &'static [u8]) -> Poll<Result<Frame<Bytes>, tonic::Status>> {
        Poll::Ready(Ok(Frame::data(Bytes::from_static(bytes))))
    }

    fn encoded(body: EncodeText) -> Vec<Bytes> {
        let mut body = std::pin::pin!(body);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut out = Vec::new();
        loop {
            match body.as_mut().poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(frame))) => out.push(frame.into_data().unwrap()),
                Poll::Ready(None) => return out,
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_ready_request_is_one_padded_segment() {
        // The frames come ready one after another: one chunk, padded only
        // at its end, whatever the frames' lengths.
        let body = request(vec![data(b"\0\0\0\0\x02hi"), data(b"\0\0\0\0\x01!")]);
        let chunks = encoded(EncodeText::new(body));
        assert_eq!(chunks.len(), 1, "{chunks:?}");
        assert_eq!(
            chunks[0],
            STANDARD.encode(b"\0\0\0\0\x02hi\0\0\0\0\x01!").as_bytes()
        );
        assert!(encoded(EncodeText::new(request(vec![]))).is_empty());
    }

    #[test]
    fn a_request_whose_next_message_waits_is_padded_there() {
        let body = request(vec![
            data(b"hello"),
            Poll::Pending,
            data(b"a"),
            data(b"b"),
            Poll::Pending,
            data(b"!"),
            Poll::Ready(Err(tonic::Status::resource_exhausted("too big"))),
        ]);
        let mut body = std::pin::pin!(EncodeText::new(body));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut poll = || match body.as_mut().poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => format!("{:?}", frame.into_data().unwrap()),
            Poll::Ready(Some(Err(status))) => format!("{:?}", status.code()),
            Poll::Ready(None) => "end".to_owned(),
            Poll::Pending => "pending".to_owned(),
        };
        // Each run of ready frames is a padded segment; the data before an
        // error goes first.
        let polls: Vec<String> = (0..6).map(|_| poll()).collect();
        assert_eq!(
            polls,
            [
                "b\"aGVsbG8=\"",
                "b\"YWI=\"",
                "b\"IQ==\"",
                "ResourceExhausted",
                "end",
                "end"
            ]
        );
    }
}

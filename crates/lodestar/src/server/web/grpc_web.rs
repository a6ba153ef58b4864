//! gRPC-Web (<https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-WEB.md>):
//! gRPC's framing over any HTTP version, with the trailers carried in the
//! body as a last frame (flag `0x80`, then an HTTP/1-style header block),
//! and a text mode that base64-encodes the whole body both ways.
//!
//! A request becomes a native one at the edge: its content type is made
//! `application/grpc` (or `+json`), a text body is decoded as it streams
//! (never more than three characters held back), and the binary body is
//! passed on untouched, since its framing is gRPC's. The response's data
//! passes through (base64-encoded frame by frame in text mode) and its
//! trailers, or a trailers-only answer's status headers, become the last
//! frame.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame};
use hyper::body::Incoming;
use tower::BoxError;

use super::trailers::{Ending, TrailersInBody};
use super::{WebRequestBody, WebResponseBody, call};
use crate::server::stack::{Outer, ResponseBody};
use crate::web_text::DecodeText;

/// How a gRPC-Web call is encoded: base64 text or binary, and JSON or
/// protobuf messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Mode {
    pub(super) text: bool,
    pub(super) json: bool,
}

impl Mode {
    /// The mode a (lowercase, parameter-free) media type names, if it is
    /// gRPC-Web's.
    pub(super) fn of(media: &str) -> Option<Self> {
        let (text, codec) = if let Some(rest) = media.strip_prefix("application/grpc-web-text") {
            (true, rest)
        } else {
            (false, media.strip_prefix("application/grpc-web")?)
        };
        let json = match codec {
            "" | "+proto" => false,
            "+json" => true,
            _ => return None,
        };
        Some(Self { text, json })
    }

    fn content_type(self) -> HeaderValue {
        HeaderValue::from_static(match (self.text, self.json) {
            (false, false) => "application/grpc-web+proto",
            (false, true) => "application/grpc-web+json",
            (true, false) => "application/grpc-web-text+proto",
            (true, true) => "application/grpc-web-text+json",
        })
    }
}

/// Serves a gRPC-Web call through the server stack.
pub(super) async fn serve(
    outer: Outer,
    request: Request<Incoming>,
    mode: Mode,
) -> Response<WebResponseBody> {
    let (mut parts, body) = request.into_parts();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(if mode.json {
            "application/grpc+json"
        } else {
            "application/grpc"
        }),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    let response = if mode.text {
        call(
            outer,
            Request::from_parts(parts, WebRequestBody::text(body).into()),
        )
        .await
    } else {
        call(outer, Request::from_parts(parts, body.into())).await
    };
    respond(response, mode)
}

/// The gRPC-Web form of a native response.
fn respond(response: Response<ResponseBody>, mode: Mode) -> Response<WebResponseBody> {
    let (mut parts, body) = response.into_parts();
    parts
        .headers
        .insert(header::CONTENT_TYPE, mode.content_type());
    parts.headers.remove(header::CONTENT_LENGTH);
    // A trailers-only answer: its status goes in the trailer frame, as a
    // full answer's does, so clients find it in one place.
    let status_headers = super::take_status_headers(&mut parts.headers);
    let body = TrailersInBody::new(body, Ending::GrpcWeb { text: mode.text }, status_headers);
    Response::from_parts(parts, WebResponseBody::Streamed { body })
}

/// The trailer frame for `trailers`: flag `0x80`, the length, and
/// `name: value\r\n` lines (names lowercase, as `http` keeps them).
pub(super) fn trailer_frame(trailers: &HeaderMap) -> Bytes {
    let mut block = BytesMut::new();
    for (name, value) in trailers {
        block.put_slice(name.as_str().as_bytes());
        block.put_slice(b": ");
        block.put_slice(value.as_bytes());
        block.put_slice(b"\r\n");
    }
    let mut frame = BytesMut::with_capacity(5 + block.len());
    frame.put_u8(0x80);
    // Trailers are a few hundred bytes, bounded by the stack's headers.
    frame.put_u32(u32::try_from(block.len()).unwrap_or(u32::MAX));
    frame.put_slice(&block);
    frame.freeze()
}

pin_project_lite::pin_project! {
    /// A gRPC-Web text request body, decoded from base64 as it arrives.
    /// Padding may close any group of four characters (clients encode
    /// chunk by chunk); at most three characters wait for the next chunk.
    pub(crate) struct Base64Body {
        #[pin]
        inner: Incoming,
        text: DecodeText,
        done: bool,
    }
}

impl Base64Body {
    pub(super) fn new(inner: Incoming) -> Self {
        Self {
            inner,
            text: DecodeText::default(),
            done: false,
        }
    }
}

impl Body for Base64Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        loop {
            match ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue; // request trailers carry nothing here
                    };
                    match this.text.decode(&data) {
                        Ok(out) if out.is_empty() => {}
                        Ok(out) => return Poll::Ready(Some(Ok(Frame::data(out)))),
                        Err(error) => {
                            *this.done = true;
                            let status = tonic::Status::invalid_argument(format!(
                                "the gRPC-Web text request is not base64 (standard alphabet, \
                                 padded): {error}"
                            ));
                            return Poll::Ready(Some(Err(Box::new(status))));
                        }
                    }
                }
                Some(Err(error)) => {
                    *this.done = true;
                    return Poll::Ready(Some(Err(error.into())));
                }
                None => {
                    *this.done = true;
                    let held = this.text.holds();
                    if held == 0 {
                        return Poll::Ready(None);
                    }
                    let status = tonic::Status::invalid_argument(format!(
                        "the gRPC-Web text request ends inside a base64 group ({held} characters \
                         left over; a body is whole groups of four)"
                    ));
                    return Poll::Ready(Some(Err(Box::new(status))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types() {
        let mode = |text, json| Some(Mode { text, json });
        assert_eq!(Mode::of("application/grpc-web"), mode(false, false));
        assert_eq!(Mode::of("application/grpc-web+proto"), mode(false, false));
        assert_eq!(Mode::of("application/grpc-web+json"), mode(false, true));
        assert_eq!(Mode::of("application/grpc-web-text"), mode(true, false));
        assert_eq!(Mode::of("application/grpc-web-text+json"), mode(true, true));
        assert_eq!(Mode::of("application/grpc-web+thrift"), None);
        assert_eq!(Mode::of("application/grpc"), None);
    }

    #[test]
    fn trailers_become_a_flagged_frame() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("5"));
        trailers.insert("grpc-message", HeaderValue::from_static("gone"));
        let frame = trailer_frame(&trailers);
        assert_eq!(frame[0], 0x80);
        let block = b"grpc-status: 5\r\ngrpc-message: gone\r\n";
        assert_eq!(&frame[1..5], &(block.len() as u32).to_be_bytes());
        assert_eq!(&frame[5..], block);
    }
}

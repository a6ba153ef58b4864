//! Server-streaming methods over REST: newline-delimited JSON.
//!
//! A server-streaming method's replies go out as they come, one line of
//! JSON each (`application/x-ndjson`), in grpc-gateway's wrapping:
//!
//! ```text
//! {"result":{"name":"Lodestar Trailhead, Kestrel Ridge, NJ, USA","location":{…}}}
//! {"result":{"name":"Foxglove Lookout, Elm Harbor, NJ, USA","location":{…}}}
//! {"error":{"code":"deadline_exceeded","message":"…"}}
//! ```
//!
//! **Why this format.** Every line says what it is, so an error after
//! some replies can follow them in-band (the HTTP status went out with
//! the first reply) and cannot be mistaken for a reply, whatever fields
//! the reply type has; clients written for grpc-gateway read the
//! replies unchanged. The error object is the one every REST and
//! Connect error of lodestar carries (`code` by name, `message`,
//! `details`), so a client parses one error shape. Envoy's transcoder
//! answers a JSON array by default (`[{…},{…}]`), which a line-by-line
//! reader cannot take apart and which has no place for an error after
//! the first element; its `stream_newline_delimited` option writes bare
//! messages, one per line, with the status only in HTTP/2 trailers.
//!
//! **When the status is known.** The answer's head waits for the first
//! reply: a call that fails before it gets the REST error answer (the
//! code's HTTP status and the JSON error body), as a unary call does; a
//! stream that ends with no reply is `200` with an empty body. From the
//! first reply on, the status is `200`, and a failure is the last line,
//! `{"error":…}`. A stream that ends successfully ends with its last
//! reply (the end of the HTTP body says so); its trailing metadata is
//! not sent (but for a stream with no reply, whose whole answer is its
//! head: there it is in `trailer-…` headers, as on Connect unary), nor is
//! a failed stream's after its first reply.
//!
//! **Bounds and back-pressure.** Replies are taken from the handler's
//! stream only as the connection takes lines: one reply is decoded at a
//! time, and what waits here is at most one chunk of the stack's body
//! (the replies that were ready at once, up to tonic's 32 KiB) and the
//! part of a reply not yet whole (its length prefix checked against the
//! send limit before its bytes are held). A line over
//! the send limit (JSON can be larger than protobuf) ends the stream
//! with `resource_exhausted`.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Response};
use http_body::{Body, Frame, SizeHint};
use tower::BoxError;

use super::Reply;
use crate::server::budget::EndsCall;
use crate::server::stack::ResponseBody;
use crate::server::web::{WebResponseBody, connect};

/// The content type of a streamed REST answer.
const NDJSON: &str = "application/x-ndjson";

/// A gRPC frame's header: flags and length.
const HEADER: usize = 5;
/// `{"result":` and `}\n` around a reply's JSON.
const RESULT_OPEN: &[u8] = b"{\"result\":";
const LINE_CLOSE: &[u8] = b"}\n";

/// The REST answer of a server-streaming call: the stack's `response`,
/// its replies as lines of JSON made by `reply`, each line at most
/// `limit` bytes (the send limit). Waits for the first reply, or the
/// end, to choose the HTTP status.
pub(super) async fn respond(
    response: Response<ResponseBody>,
    reply: Reply,
    limit: usize,
) -> Response<WebResponseBody> {
    let (parts, body) = response.into_parts();
    let mut headers = parts.headers;
    if let Some(status) = crate::server::web::take_status_headers(&mut headers) {
        // A trailers-only answer: the call ended before any reply (`OK`
        // from a layer that answered for the handler: no replies).
        let status = tonic::Status::from_header_map(&status)
            .unwrap_or_else(|| tonic::Status::internal("the response ended without a status"));
        let headers = connect::metadata(headers);
        if status.code() == tonic::Code::Ok {
            return no_replies(headers);
        }
        return connect::error_response(&status, None, headers);
    }
    let mut headers = connect::metadata(headers);
    let mut lines = Box::pin(Lines::new(body, reply, limit));
    let first = std::future::poll_fn(|cx| lines.as_mut().poll_next(cx)).await;
    match first {
        Next::Line(line) => *lines.as_mut().project().first = Some(line),
        Next::End(status, trailers) => {
            // No reply came: the answer is whole, and its status the call's.
            for (name, value) in &trailers {
                if matches!(
                    name.as_str(),
                    "grpc-status" | "grpc-message" | "grpc-status-details-bin"
                ) {
                    continue;
                }
                if let Ok(name) = HeaderName::try_from(format!("trailer-{name}")) {
                    headers.append(name, value.clone());
                }
            }
            if status.code() != tonic::Code::Ok {
                return connect::error_response(&status, None, headers);
            }
            return no_replies(headers);
        }
    };
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON));
    // nginx buffers a proxied answer unless told not to (grpc-gateway's
    // users met this); the lines are meant to arrive as they are sent.
    headers.insert(
        HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    let mut response = Response::new(WebResponseBody::Lines { body: lines });
    *response.headers_mut() = headers;
    response
}

/// The answer of a stream that ended with no reply and `OK`: `200`, an
/// empty body.
fn no_replies(mut headers: HeaderMap) -> Response<WebResponseBody> {
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON));
    let mut response = Response::new(WebResponseBody::empty());
    *response.headers_mut() = headers;
    response
}

/// What the stream gave next.
enum Next {
    /// One reply, as its line.
    Line(Bytes),
    /// The call ended: its status and trailers.
    End(tonic::Status, HeaderMap),
}

pin_project_lite::pin_project! {
    /// The stack's response body, its replies as lines of JSON and a
    /// failure as a last `{"error":…}` line.
    pub(crate) struct Lines {
        #[pin]
        inner: ResponseBody,
        reply: Reply,
        limit: usize,
        // The bytes of a reply not yet whole.
        buffer: BytesMut,
        // The first line, read before the answer's head was sent.
        first: Option<Bytes>,
        done: bool,
    }
}

impl Lines {
    fn new(inner: ResponseBody, reply: Reply, limit: usize) -> Self {
        Self {
            inner,
            reply,
            limit,
            buffer: BytesMut::new(),
            first: None,
            done: false,
        }
    }

    /// The next line or the end, taking frames from the stack's body
    /// only until one reply is whole.
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Next> {
        let mut this = self.project();
        loop {
            match whole_frame(this.buffer, *this.limit) {
                Err(status) => {
                    let _ = this.inner.as_mut().ended(&status);
                    return Poll::Ready(Next::End(status, HeaderMap::new()));
                }
                Ok(Some((flags, message))) => {
                    match line(this.reply, flags, &message, *this.limit) {
                        Ok(line) => return Poll::Ready(Next::Line(line)),
                        Err(status) => {
                            let _ = this.inner.as_mut().ended(&status);
                            return Poll::Ready(Next::End(status, HeaderMap::new()));
                        }
                    }
                }
                Ok(None) => {}
            }
            let ended = match ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        this.buffer.extend_from_slice(&data);
                        continue;
                    }
                    Err(frame) => {
                        let trailers = frame.into_trailers().unwrap_or_default();
                        match tonic::Status::from_header_map(&trailers) {
                            Some(status)
                                if status.code() != tonic::Code::Ok || this.buffer.is_empty() =>
                            {
                                return Poll::Ready(Next::End(status, trailers));
                            }
                            Some(_) => tonic::Status::internal(
                                "the replies ended inside a message (a truncated frame)",
                            ),
                            None => tonic::Status::internal("the response ended without a status"),
                        }
                    }
                },
                Some(Err(error)) => {
                    tonic::Status::internal(format!("the reply stream failed: {error}"))
                }
                None => tonic::Status::internal("the response ended without a status"),
            };
            let _ = this.inner.as_mut().ended(&ended);
            return Poll::Ready(Next::End(ended, HeaderMap::new()));
        }
    }
}

/// Splits one whole gRPC frame off `buffer`: its flags and message.
/// A length over `limit` is refused before its bytes are held.
fn whole_frame(buffer: &mut BytesMut, limit: usize) -> Result<Option<(u8, Bytes)>, tonic::Status> {
    if buffer.len() < HEADER {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]]) as usize;
    if len > limit {
        return Err(tonic::Status::resource_exhausted(format!(
            "a reply of {len} bytes is larger than this server's send limit of {limit} bytes \
             (MessageLimits::max_encoding_message_size)"
        )));
    }
    if buffer.len() < HEADER + len {
        return Ok(None);
    }
    let flags = buffer[0];
    let mut frame = buffer.split_to(HEADER + len);
    frame.advance(HEADER);
    Ok(Some((flags, frame.freeze())))
}

/// One reply's line: `{"result":<json>}` and a newline, at most `limit`
/// bytes.
fn line(reply: &Reply, flags: u8, message: &[u8], limit: usize) -> Result<Bytes, tonic::Status> {
    if flags != 0 {
        return Err(tonic::Status::internal(format!(
            "a reply frame with flags {flags:#04x}; REST asks for uncompressed replies (0x00)"
        )));
    }
    let json = reply.json(message)?;
    let len = RESULT_OPEN.len() + json.len() + LINE_CLOSE.len();
    if len > limit {
        return Err(tonic::Status::resource_exhausted(format!(
            "a reply's JSON line is {len} bytes, more than this server's send limit of {limit} \
             bytes (MessageLimits::max_encoding_message_size)"
        )));
    }
    let mut out = BytesMut::with_capacity(len);
    out.put_slice(RESULT_OPEN);
    out.put_slice(&json);
    out.put_slice(LINE_CLOSE);
    Ok(out.freeze())
}

/// The last line of a stream that failed: `{"error":{…}}` and a newline.
fn error_line(status: &tonic::Status) -> Bytes {
    let line = serde_json::json!({ "error": connect::error_json(status) });
    let mut out = serde_json::to_vec(&line).unwrap_or_else(|_| b"{\"error\":{}}".to_vec());
    out.push(b'\n');
    Bytes::from(out)
}

impl Body for Lines {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if let Some(first) = self.as_mut().project().first.take() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        let next = ready!(self.as_mut().poll_next(cx));
        match next {
            Next::Line(line) => Poll::Ready(Some(Ok(Frame::data(line)))),
            Next::End(status, _) => {
                *self.as_mut().project().done = true;
                if status.code() == tonic::Code::Ok {
                    Poll::Ready(None)
                } else {
                    Poll::Ready(Some(Ok(Frame::data(error_line(&status)))))
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.first.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl EndsCall for Lines {
    fn ended(self: Pin<&mut Self>, status: &tonic::Status) -> Frame<Bytes> {
        let this = self.project();
        *this.done = true;
        *this.first = None;
        let _ = this.inner.ended(status);
        Frame::data(error_line(status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(flags: u8, message: &[u8]) -> Vec<u8> {
        let mut out = vec![flags];
        out.extend_from_slice(&(message.len() as u32).to_be_bytes());
        out.extend_from_slice(message);
        out
    }

    #[test]
    fn frames_are_split_whole_and_their_length_is_checked_first() {
        let mut buffer = BytesMut::new();
        buffer.extend_from_slice(&frame(0, b"abc")[..6]);
        assert_eq!(whole_frame(&mut buffer, 10).unwrap(), None);
        buffer.extend_from_slice(b"bc");
        buffer.extend_from_slice(&frame(0, b"")[..3]);
        assert_eq!(
            whole_frame(&mut buffer, 10).unwrap(),
            Some((0, Bytes::from_static(b"abc")))
        );
        assert_eq!(buffer.len(), 3, "the next frame's start is kept");
        buffer.extend_from_slice(&[0, 0]);
        assert_eq!(
            whole_frame(&mut buffer, 10).unwrap(),
            Some((0, Bytes::new()))
        );
        // A length over the limit is refused from the header alone.
        let mut big = BytesMut::from(&[0u8, 0, 0, 0, 11][..]);
        let error = whole_frame(&mut big, 10).unwrap_err();
        assert_eq!(error.code(), tonic::Code::ResourceExhausted);
        assert!(error.message().contains("11 bytes"), "{error:?}");
    }

    /// A response body of `frames`, as the stack hands it on.
    fn body(frames: Vec<Frame<Bytes>>) -> ResponseBody {
        let frames = frames.into_iter().map(Ok::<_, std::convert::Infallible>);
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        ResponseBody::from(tonic::body::Body::new(body))
    }

    /// Replies of `google.protobuf.StringValue`, whose JSON is a string.
    fn reply() -> Reply {
        let pool = prost_reflect::DescriptorPool::global();
        Reply {
            output: pool
                .get_message_by_name("google.protobuf.StringValue")
                .unwrap(),
            response_body: None,
        }
    }

    /// `text` as an encoded `StringValue`, framed.
    fn string_frame(flags: u8, text: &str) -> Vec<u8> {
        let mut message = vec![0x0a, text.len() as u8];
        message.extend_from_slice(text.as_bytes());
        frame(flags, &message)
    }

    fn status(code: i32) -> Frame<Bytes> {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from(code));
        Frame::trailers(trailers)
    }

    /// The whole body `frames` become, as text.
    async fn lines(frames: Vec<Frame<Bytes>>, limit: usize) -> String {
        use http_body_util::BodyExt as _;
        let lines = Box::pin(Lines::new(body(frames), reply(), limit));
        let bytes = lines.collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_trailers_only_answer_is_its_status_or_an_empty_stream() {
        use http_body_util::BodyExt as _;
        for (code, http, content_type) in [
            (0, http::StatusCode::OK, NDJSON),
            (5, http::StatusCode::NOT_FOUND, "application/json"),
        ] {
            let mut response = Response::new(body(vec![]));
            response
                .headers_mut()
                .insert("grpc-status", HeaderValue::from(code));
            let answer = respond(response, reply(), 100).await;
            assert_eq!(answer.status(), http, "grpc-status {code}");
            assert_eq!(answer.headers()[header::CONTENT_TYPE], content_type);
            let bytes = answer.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(bytes.is_empty(), code == 0, "grpc-status {code}: {bytes:?}");
        }
    }

    #[tokio::test]
    async fn replies_split_anyhow_become_one_line_each_and_a_failure_the_last() {
        let mut two = string_frame(0, "a");
        two.extend(string_frame(0, "bb"));
        // Chunks that cut frames anywhere: inside a header, inside a message.
        let chunks = || {
            [&two[..3], &two[3..9], &two[9..]]
                .map(|chunk| Frame::data(Bytes::copy_from_slice(chunk)))
                .into_iter()
                .collect::<Vec<_>>()
        };
        let mut ok = chunks();
        ok.push(status(0));
        assert_eq!(
            lines(ok, 100).await,
            "{\"result\":\"a\"}\n{\"result\":\"bb\"}\n"
        );
        let mut failed = chunks();
        failed.push(status(5));
        assert_eq!(
            lines(failed, 100).await,
            "{\"result\":\"a\"}\n{\"result\":\"bb\"}\n{\"error\":{\"code\":\"not_found\"}}\n"
        );
    }

    #[tokio::test]
    async fn what_the_stream_cannot_be_ends_it_with_an_error_line() {
        let one = || Frame::data(Bytes::from(string_frame(0, "a")));
        let first = "{\"result\":\"a\"}\n";
        let code = |text: &str| {
            let last = text.lines().last().unwrap();
            let json: serde_json::Value = serde_json::from_str(last).unwrap();
            json["error"]["code"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        };
        // A frame cut short by a successful end.
        let cut = Frame::data(Bytes::from(string_frame(0, "abc")[..6].to_vec()));
        let out = lines(vec![one(), cut, status(0)], 100).await;
        assert!(out.starts_with(first) && code(&out) == "internal", "{out}");
        // No status at all.
        let out = lines(vec![one()], 100).await;
        assert!(out.starts_with(first) && code(&out) == "internal", "{out}");
        // A compressed frame (REST asks for none).
        let gzip = Frame::data(Bytes::from(string_frame(1, "z")));
        let out = lines(vec![one(), gzip, status(0)], 100).await;
        assert!(out.starts_with(first) && code(&out) == "internal", "{out}");
        // A line over the limit (15 bytes here), though its message fits.
        let long = Frame::data(Bytes::from(string_frame(0, "0123456789")));
        let out = lines(vec![one(), long, status(0)], 15).await;
        assert!(
            out.starts_with(first) && code(&out) == "resource_exhausted",
            "{out}"
        );
    }

    #[test]
    fn a_failure_is_one_error_line() {
        let line = error_line(&tonic::Status::not_found("gone"));
        assert_eq!(
            line,
            Bytes::from_static(b"{\"error\":{\"code\":\"not_found\",\"message\":\"gone\"}}\n")
        );
    }
}

//! A streamed web answer: the stack's response body, its messages passed
//! on as they come and its trailers turned into one last data frame
//! (gRPC-Web's trailers frame, Connect's end-of-stream envelope).

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use tower::BoxError;

use super::connect::end_stream;
use super::grpc_web::trailer_frame;
use crate::server::budget::EndsCall;
use crate::server::stack::ResponseBody;

/// Which protocol's last frame the trailers become.
#[derive(Debug, Clone, Copy)]
pub(super) enum Ending {
    /// gRPC-Web: the trailers frame; with `text`, every frame in base64.
    GrpcWeb { text: bool },
    /// Connect streams: the end-of-stream envelope.
    Connect,
}

impl Ending {
    fn data(self, bytes: Bytes) -> Bytes {
        match self {
            Self::GrpcWeb { text: true } => Bytes::from(STANDARD.encode(&bytes)),
            Self::GrpcWeb { text: false } | Self::Connect => bytes,
        }
    }

    fn end(self, trailers: &HeaderMap) -> Bytes {
        match self {
            Self::GrpcWeb { .. } => self.data(trailer_frame(trailers)),
            Self::Connect => {
                let status = tonic::Status::from_header_map(trailers).unwrap_or_else(|| {
                    tonic::Status::internal("the response ended without a status")
                });
                end_stream(&status, trailers)
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// The stack's response body with its trailers as the last data frame.
    pub(crate) struct TrailersInBody {
        #[pin]
        inner: ResponseBody,
        ending: Ending,
        // A trailers-only answer's status headers, sent as the trailers.
        status_headers: Option<HeaderMap>,
        done: bool,
    }
}

impl TrailersInBody {
    /// `inner`, ending as `ending` says; `status_headers` are a
    /// trailers-only answer's status (its body then ends with no trailers).
    pub(super) fn new(
        inner: ResponseBody,
        ending: Ending,
        status_headers: Option<HeaderMap>,
    ) -> Self {
        Self {
            inner,
            ending,
            status_headers,
            done: false,
        }
    }
}

impl Body for TrailersInBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        let ending = *this.ending;
        let last = match ready!(this.inner.poll_frame(cx)) {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => return Poll::Ready(Some(Ok(Frame::data(ending.data(data))))),
                Err(frame) => ending.end(&frame.into_trailers().unwrap_or_default()),
            },
            Some(Err(error)) => {
                *this.done = true;
                return Poll::Ready(Some(Err(error)));
            }
            // A trailers-only answer, or a body that ended without a status
            // (then `end` reports one).
            None => ending.end(&this.status_headers.take().unwrap_or_default()),
        };
        *this.done = true;
        Poll::Ready(Some(Ok(Frame::data(last))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl EndsCall for TrailersInBody {
    fn ended(self: Pin<&mut Self>, status: &tonic::Status) -> Frame<Bytes> {
        let this = self.project();
        *this.done = true;
        // The status goes in the body, as the protocol's last frame.
        let _ = this.inner.ended(status);
        Frame::data(this.ending.end(&crate::body::status_trailers(status)))
    }
}

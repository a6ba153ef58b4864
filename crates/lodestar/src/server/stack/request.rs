//! The request body as the server's layers see it ([`RequestBody`]), and
//! the plan for the response it carries down to the routes.
//!
//! lodestar's layers below the user's (deadline, codec, limits) work on the
//! way in only: each sets its part of the request body's wrapper and of
//! the [`Plan`], and the routes' future carries the plan out when the
//! handler answers. One future for all of them, instead of one per layer,
//! keeps each call's futures small and cheap to build.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::call_end::Call;
use super::{codec, deadline};
use crate::body::{CallBody, Messages};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

pin_project_lite::pin_project! {
    /// The body of a request as the server's layers see it: hyper's, as
    /// it arrives, in the one wrapper that checks each message's size
    /// (and, for a JSON call, transcodes it) as the handler reads it.
    pub struct RequestBody {
        #[pin]
        inner: CallBody<Inbound>,
        // What the layers below the user's decided for the response.
        pub(super) plan: Plan,
        // Whether the call is JSON (`application/grpc+json`).
        pub(super) json: bool,
    }
}

impl std::fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestBody")
            .field("json", &self.json)
            .finish_non_exhaustive()
    }
}

impl RequestBody {
    pub(super) fn new(inner: impl Into<Inbound>, json: bool) -> Self {
        let inner = inner.into();
        Self {
            // A broken request stream means the client is gone, whatever
            // the handler answers now.
            inner: CallBody::new(inner, None, None).with_on_broken(Call::abandon_current),
            plan: Plan::default(),
            json,
        }
    }

    /// What each message passes through, for the layers to configure.
    pub(crate) fn messages(&mut self) -> &mut Messages {
        self.inner.messages()
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    // A wrapper only: inlined, so that a frame is not moved through a call
    // of its own.
    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.project().inner.poll_frame(cx)
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// A request's body as it came: native gRPC's HTTP/2 body, or what the
    /// web protocols (`server/web`) made of theirs. gRPC-Web (binary) and
    /// Connect streaming bodies are framed as gRPC's and come as
    /// [`Inbound::Grpc`]; the others are translated at the edge.
    #[project = InboundProj]
    pub(crate) enum Inbound {
        /// The body as hyper read it, framed as gRPC's.
        Grpc { #[pin] body: Incoming },
        /// A translated body (gRPC-Web text, a Connect unary message).
        Web { #[pin] body: crate::server::web::WebRequestBody },
    }
}

impl From<Incoming> for Inbound {
    #[inline]
    fn from(body: Incoming) -> Self {
        Self::Grpc { body }
    }
}

impl From<crate::server::web::WebRequestBody> for Inbound {
    fn from(body: crate::server::web::WebRequestBody) -> Self {
        Self::Web { body }
    }
}

impl Body for Inbound {
    type Data = Bytes;
    type Error = BoxError;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            InboundProj::Grpc { body } => body
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(Into::into))),
            InboundProj::Web { body } => body.poll_frame(cx),
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match self {
            Self::Grpc { body } => body.is_end_stream(),
            Self::Web { body } => body.is_end_stream(),
        }
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Grpc { body } => body.size_hint(),
            Self::Web { body } => body.size_hint(),
        }
    }
}

/// What the layers below the user's decided for the response, carried out
/// by the routes' future: each layer's part is its own.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    /// The inbound deadline as read on arrival (see `status.rs`), so that
    /// time spent in the user's layers counts against it.
    pub(super) arrived: Option<crate::Deadline>,
    /// The inbound deadline and its timer (see `deadline.rs`).
    pub(super) deadline: deadline::Bound,
    /// Compression and transcoding (see `codec.rs`).
    pub(super) codec: codec::Reply,
    /// The send limit (see `limits.rs`).
    pub(super) send_limit: Option<usize>,
    /// A call refused before the handler: this status instead.
    pub(super) refusal: Option<tonic::Status>,
}

//! The trace layer: runs the rest of the call inside the caller's W3C trace
//! context, so the calls and events the handler makes carry it on; with
//! OpenTelemetry on, inside the call's server span, whose own context it
//! then is (`telemetry/spans.rs`). It is below the status layer, so that
//! the span learns the call's final status ([`CallEnd`](super::CallEnd)).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{HeaderName, Request};
use tower::{Layer, Service};

use crate::trace::TraceContext;

/// Reads `traceparent`/`tracestate` and scopes the call in them.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TraceLayer;

impl<S> Layer<S> for TraceLayer {
    type Service = TraceService<S>;

    fn layer(&self, inner: S) -> TraceService<S> {
        TraceService { inner }
    }
}

/// See [`TraceLayer`].
#[derive(Debug, Clone)]
pub(crate) struct TraceService<S> {
    inner: S,
}

impl<S> TraceService<S> {
    /// The service below.
    pub(crate) fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

impl<S, B> Service<Request<B>> for TraceService<S>
where
    S: Service<Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = TraceFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // Most calls carry none: look for the header by a ready-made name first.
        const TRACEPARENT: HeaderName = HeaderName::from_static(crate::trace::TRACEPARENT);
        let context = match crate::headers::has_header(request.headers(), &TRACEPARENT) {
            true => TraceContext::from_headers(request.headers()),
            false => None,
        };
        #[cfg(feature = "otlp")]
        if crate::telemetry::spans_on() {
            let inner = &mut self.inner;
            let traced = crate::telemetry::spans::serve(request, context, |r| inner.call(r));
            return TraceFuture::Scoped {
                inner: Box::pin(traced),
            };
        }
        match context {
            None => TraceFuture::Plain {
                inner: self.inner.call(request),
            },
            // Boxed: the scope's future has no name. Only traced calls pay.
            Some(context) => TraceFuture::Scoped {
                inner: Box::pin(context.scope(self.inner.call(request))),
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`TraceService`].
    #[project = TraceProj]
    pub(crate) enum TraceFuture<F: Future> {
        Plain { #[pin] inner: F },
        Scoped { inner: Pin<Box<dyn Future<Output = F::Output> + Send>> },
    }
}

impl<F: Future> Future for TraceFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        match self.project() {
            TraceProj::Plain { inner } => inner.poll(cx),
            TraceProj::Scoped { inner } => inner.as_mut().poll(cx),
        }
    }
}

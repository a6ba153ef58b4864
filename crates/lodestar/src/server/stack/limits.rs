//! The body-limits layer: the message size limits ([`MessageLimits`]) on
//! the request's messages as they arrive and on the response's before they
//! are encoded.

use std::task::{Context, Poll};

use http::Request;
use tower::{Layer, Service};

use super::request::RequestBody;
use crate::MessageLimits;

/// Limits the size of each message, both ways.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LimitsLayer {
    pub(crate) limits: MessageLimits,
}

impl<S> Layer<S> for LimitsLayer {
    type Service = LimitsService<S>;

    fn layer(&self, inner: S) -> LimitsService<S> {
        LimitsService {
            inner,
            limits: self.limits,
        }
    }
}

/// See [`LimitsLayer`].
#[derive(Debug, Clone)]
pub(crate) struct LimitsService<S> {
    inner: S,
    limits: MessageLimits,
}

impl<S> Service<Request<RequestBody>> for LimitsService<S>
where
    S: Service<Request<RequestBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<RequestBody>) -> S::Future {
        let body = request.body_mut();
        body.messages()
            .set_limit(self.limits.max_decoding_message_size);
        body.plan.send_limit = Some(self.limits.max_encoding_message_size);
        self.inner.call(request)
    }
}

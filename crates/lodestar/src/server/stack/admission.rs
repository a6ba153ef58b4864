//! The admission layer: the policy's rate and concurrency limits (see
//! `server/admission`), right below the status layer, so that a refusal
//! costs almost nothing: no user layer, no request body read, no handler.
//!
//! A refused call fails with its `RESOURCE_EXHAUSTED` status (the status
//! layer answers it, trailers-only). An admitted call under a concurrency
//! limit holds its place until its final status: the place is handed to a
//! [`CallEnd`] hook when the call's future is first polled (the call is
//! then current), and given back by the hook, or by its `Drop` if the call
//! never got that far. With no limits in the policy, a call costs one
//! atomic load.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower::{BoxError, Layer, Service};

use super::request::RequestBody;
use super::{CallEnd, ResponseBody};
use crate::server::admission::{Admission, Slot};

/// Applies the policy's limits.
#[derive(Debug, Clone)]
pub(crate) struct AdmissionLayer {
    pub(crate) admission: Arc<Admission>,
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = AdmissionService<S>;

    fn layer(&self, inner: S) -> AdmissionService<S> {
        AdmissionService {
            inner,
            admission: Arc::new(Own(self.admission.clone())),
        }
    }
}

/// See [`AdmissionLayer`].
#[derive(Debug, Clone)]
pub(crate) struct AdmissionService<S> {
    inner: S,
    /// The server's admission state, through a reference counted per
    /// connection (see [`make_own`](Self::make_own)).
    admission: Arc<Own>,
}

/// The server's admission state, as one connection refers to it.
#[derive(Debug)]
struct Own(Arc<Admission>);

impl<S> AdmissionService<S> {
    /// The service below.
    pub(crate) fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Takes a reference of its own (for one connection): the service is
    /// cloned for every call, and the calls of a connection then count
    /// their references apart from other connections'.
    pub(crate) fn make_own(&mut self) {
        self.admission = Arc::new(Own(self.admission.0.clone()));
    }
}

impl<S> Service<Request<RequestBody>> for AdmissionService<S>
where
    S: Service<Request<RequestBody>, Response = Response<ResponseBody>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody>;
    type Error = BoxError;
    type Future = AdmissionFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<RequestBody>) -> Self::Future {
        let admission = &self.admission.0;
        if !admission.is_enabled() {
            return AdmissionFuture::admitted(self.inner.call(request), None);
        }
        match admission.admit(request.uri().path(), request.headers()) {
            Ok(slot) => AdmissionFuture::admitted(self.inner.call(request), slot),
            Err(status) => AdmissionFuture {
                state: State::Refused {
                    status: Some(Box::new(status)),
                },
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`AdmissionService`].
    pub(crate) struct AdmissionFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<F> {
        Admitted {
            #[pin]
            inner: F,
            // Until handed to the call's end.
            slot: Option<Slot>,
        },
        Refused { status: Option<Box<tonic::Status>> },
    }
}

impl<F> AdmissionFuture<F> {
    fn admitted(inner: F, slot: Option<Slot>) -> Self {
        Self {
            state: State::Admitted { inner, slot },
        }
    }
}

impl<F, E> Future for AdmissionFuture<F>
where
    F: Future<Output = Result<Response<ResponseBody>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<ResponseBody>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Admitted { inner, slot } => {
                if let Some(slot) = slot.take() {
                    // Not registered (no call current) drops the slot: the
                    // call then goes on uncounted rather than leak it.
                    CallEnd::HANDLE.on_end(move |outcome| slot.end(outcome));
                }
                inner.poll(cx).map_err(Into::into)
            }
            StateProj::Refused { status } => match status.take() {
                Some(status) => Poll::Ready(Err(status)),
                None => Poll::Pending, // polled after it completed
            },
        }
    }
}

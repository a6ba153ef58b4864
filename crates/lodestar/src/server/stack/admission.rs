//! The admission layer: the policy's rate and concurrency limits (see
//! `server/admission`), right below the status layer, so that a refusal
//! costs almost nothing: no user layer, no request body read, no handler.
//!
//! A refused call fails with its `RESOURCE_EXHAUSTED` status (the status
//! layer answers it, trailers-only), once its request has ended (see
//! [`Refusal`]). An admitted call under a concurrency limit holds its place
//! until its final status: the place is handed to the call's [`CallEnd`]
//! when the call's future is first polled (the call is then current), and
//! given back when the call ends, or by its `Drop` if the call never got
//! that far (no allocation but the call's watch). With no limits in the
//! policy, a call costs one atomic load.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Buf;
use http::{Request, Response};
use http_body::Body;
use tokio::time::Sleep;
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
                    refusal: Some(Box::new(Refusal::new(status, request.into_body()))),
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
        Refused { refusal: Option<Box<Refusal>> },
    }
}

/// The most request bytes a refused call's body is drained of: 64 KiB.
const DRAIN_BYTES: usize = 64 * 1024;
/// The longest a refused call waits for the end of its request: 2 ms.
const DRAIN_TIME: Duration = Duration::from_millis(2);

/// A refused call, answered once its request has ended (its bytes are
/// discarded, never decoded), or at most [`DRAIN_BYTES`] or [`DRAIN_TIME`]
/// later. An answer while the client is still sending makes HTTP/2 reset
/// the request stream (`NO_ERROR`), and hyper's h2 closes a connection
/// after 1,024 such resets (its guard against reset floods): under
/// overload, a refused unary call's message is usually a few microseconds
/// behind its headers, and waiting for it keeps the connection.
struct Refusal {
    status: tonic::Status,
    body: RequestBody,
    drained: usize,
    deadline: Option<Pin<Box<Sleep>>>,
}

impl Refusal {
    fn new(status: tonic::Status, body: RequestBody) -> Self {
        Self {
            status,
            body,
            drained: 0,
            deadline: None,
        }
    }

    /// Whether the request has ended, or been waited for long enough.
    fn poll_drained(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        while !self.body.is_end_stream() && self.drained <= DRAIN_BYTES {
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    self.drained += frame.data_ref().map_or(0, Buf::remaining);
                }
                Poll::Ready(None | Some(Err(_))) => return Poll::Ready(()),
                Poll::Pending => {
                    let deadline = self
                        .deadline
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(DRAIN_TIME)));
                    return deadline.as_mut().poll(cx);
                }
            }
        }
        Poll::Ready(())
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
                    // Not held (no call current) drops the slot: the call
                    // then goes on uncounted rather than leak it.
                    CallEnd::HANDLE.hold(slot);
                }
                inner.poll(cx).map_err(Into::into)
            }
            StateProj::Refused { refusal } => {
                let Some(drained) = refusal.as_mut() else {
                    return Poll::Pending; // polled after it completed
                };
                ready!(drained.poll_drained(cx));
                match refusal.take() {
                    Some(refusal) => Poll::Ready(Err(Box::new(refusal.status))),
                    None => Poll::Pending,
                }
            }
        }
    }
}

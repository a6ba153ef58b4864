//! The retry layer: sending a call again, to another instance, where that
//! is safe.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_util::future::Either;
use http::{Request, Response};
use http_body_util::BodyExt;
use tonic::Status;

use super::Call;
use super::balance::{Balance, Failure};
use crate::body::{RequestBody, RequestError};
use crate::client::connection::Connection;
use crate::client::observe::Observed;
use crate::client::{Error, MethodInfo};
use crate::deadline::Deadline;

/// Settings of the retry layer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Params {
    /// How many instances one call may be sent to, counting the first
    /// ([`ClientBuilder::max_attempts`](crate::client::ClientBuilder::max_attempts)).
    pub(crate) max_attempts: usize,
}

/// Sends a call again where that is safe:
///
/// * a request that never reached a server (no connection could be made,
///   or the connection was found closed before the request went out), to
///   another instance, whatever its kind;
/// * a unary request to a method marked idempotent ([`MethodInfo`]), when
///   the instance fails before answering: its message is kept, so that it
///   can be sent again.
///
/// Otherwise the caller gets `UNAVAILABLE`, naming the last instance tried.
#[derive(Debug)]
pub(crate) struct Retry {
    params: Params,
    balance: Arc<Balance>,
}

impl Retry {
    pub(crate) fn new(params: Params, balance: Arc<Balance>) -> Self {
        Self { params, balance }
    }
}

/// What is left of a request after a failed attempt.
// Short-lived and moved once per failed attempt; boxing would cost more.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Leftover {
    /// The request itself, untouched: it never left this process.
    Untouched {
        request: Request<RequestBody>,
        /// The endpoint may take it on a new connection (only the old one failed).
        same_endpoint: bool,
    },
    /// It may have been seen: only a kept copy (idempotent calls) may go again.
    Replay,
    /// The request itself is at fault: no retry, this is the answer.
    Fail(Status),
}

impl Call<Request<RequestBody>> for Retry {
    type Response = Response<Observed>;

    fn call(
        &self,
        request: Request<RequestBody>,
    ) -> impl Future<Output = Result<Self::Response, Status>> + Send {
        // The common call: the instances are known and the request is not
        // kept. Its first attempt starts now, and only a failure takes the
        // (boxed) way of sending again.
        if !self.balance.ready_now() || self.keeps(&request) {
            return Either::Right(Box::pin(self.call_slow(request)));
        }
        let (request, deadline) = with_deadline(request);
        Either::Left(ResponseFuture {
            state: State::First {
                attempt: self.balance.attempt(request, &[], 1, deadline),
            },
            retry: self,
            deadline,
        })
    }
}

type Again<'a> = Pin<Box<dyn Future<Output = Result<Response<Observed>, Status>> + Send + 'a>>;

pin_project_lite::pin_project! {
    /// A call's first attempt and, if it fails, the attempts after it.
    pub(crate) struct ResponseFuture<'a, F> {
        #[pin]
        state: State<'a, F>,
        retry: &'a Retry,
        deadline: Option<Deadline>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<'a, F> {
        First { #[pin] attempt: F },
        // Boxed: rare, and as large as the attempts it makes.
        Again { again: Again<'a> },
    }
}

impl<'a, F> Future for ResponseFuture<'a, F>
where
    F: Future<Output = Result<Response<Observed>, Failure>>,
{
    type Output = Result<Response<Observed>, Status>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let failure = match this.state.as_mut().project() {
                StateProj::First { attempt } => match std::task::ready!(attempt.poll(cx)) {
                    Ok(response) => return Poll::Ready(Ok(response)),
                    Err(failure) => failure,
                },
                StateProj::Again { again } => return again.as_mut().poll(cx),
            };
            let retry: &'a Retry = this.retry;
            let again = Box::pin(retry.again(failure, None, *this.deadline));
            this.state.set(State::Again { again });
        }
    }
}

/// The request, with the time left to its deadline in its `grpc-timeout`.
fn with_deadline(mut request: Request<RequestBody>) -> (Request<RequestBody>, Option<Deadline>) {
    let deadline = request.extensions().get::<Deadline>().copied();
    if let Some(deadline) = deadline {
        crate::deadline::set_header(request.headers_mut(), deadline);
    }
    (request, deadline)
}

impl Retry {
    /// Whether `request` is kept, so that it can be sent again: its method
    /// is idempotent, and a replay could happen, with another instance to
    /// take it (a replay never goes to the instance that failed) and
    /// attempts to spare.
    fn keeps(&self, request: &Request<RequestBody>) -> bool {
        // Cheapest first: the instance count reads the snapshot.
        self.params.max_attempts > 1
            && request
                .extensions()
                .get::<MethodInfo>()
                .is_some_and(|m| m.idempotent)
            && self.balance.endpoint_count() > 1
    }

    /// A call that waits for the first list of instances, or whose request
    /// is kept.
    async fn call_slow(&self, request: Request<RequestBody>) -> Result<Response<Observed>, Status> {
        self.balance.wait_ready().await?;
        let (request, kept) = if self.keeps(&request) {
            let (request, kept) = Kept::new(request).await?;
            (request, Some(kept))
        } else {
            (request, None)
        };
        let (request, deadline) = with_deadline(request);
        let failure = match self.balance.attempt(request, &[], 1, deadline).await {
            Ok(response) => return Ok(response),
            Err(failure) => failure,
        };
        self.again(failure, kept, deadline).await
    }

    /// After a failed first attempt: sends again while that is safe and
    /// attempts are left.
    async fn again(
        &self,
        mut failure: Failure,
        kept: Option<Kept>,
        deadline: Option<Deadline>,
    ) -> Result<Response<Observed>, Status> {
        let balance = &self.balance;
        let mut tried: Vec<Arc<Connection>> = Vec::new();
        let mut last_error: Option<(String, String)> = None;
        for number in 2..=self.params.max_attempts {
            let failed = match failure {
                Failure::NoEndpoint | Failure::NoRoute(_) => break,
                Failure::Attempt(failed) => failed,
            };
            let same_endpoint = matches!(
                failed.leftover,
                Leftover::Untouched {
                    same_endpoint: true,
                    ..
                }
            );
            if !same_endpoint {
                tried.push(failed.connection.clone());
            }
            let request = match failed.leftover {
                // Never sent: the caller's body, and its live per-message
                // choices, are still ahead.
                Leftover::Untouched { request, .. } => request,
                Leftover::Replay => match &kept {
                    Some(kept) => kept.request(),
                    None => {
                        // Not kept: the method is not idempotent, or no
                        // other instance could take a replay.
                        return Err(super::balance::unavailable(Error::Unreachable {
                            service: balance.key.clone(),
                            address: failed.address,
                            reason: format!(
                                "{}; not sent again: the request may have reached the \
                                 instance, and only a method marked idempotent in its \
                                 .proto is replayed, to another instance",
                                failed.message
                            ),
                        }));
                    }
                },
                Leftover::Fail(status) => return Err(status),
            };
            tracing::debug!(service = %balance.key, address = %failed.address,
                error = %failed.message, "sending again");
            last_error = Some((failed.address, failed.message));
            let (request, _) = with_deadline(request);
            failure = match balance.attempt(request, &tried, number, deadline).await {
                Ok(response) => return Ok(response),
                Err(failure) => failure,
            };
        }
        // Out of attempts, or of endpoints: the last failure is the answer.
        match failure {
            Failure::Attempt(failed) => {
                if let Leftover::Fail(status) = failed.leftover {
                    return Err(status);
                }
                last_error = Some((failed.address, failed.message));
            }
            Failure::NoEndpoint => {}
            Failure::NoRoute(refused) => {
                return Err(super::balance::unavailable(Error::NoRoute {
                    service: balance.key.clone(),
                    reason: refused.to_string(),
                }));
            }
        }
        Err(super::balance::unavailable(match last_error {
            None => Error::NoInstances {
                service: balance.key.clone(),
            },
            Some((address, reason)) => Error::Unreachable {
                service: balance.key.clone(),
                address,
                reason,
            },
        }))
    }
}

/// The kept copy of an idempotent request: its message, encoded, and its
/// head, to send again.
struct Kept {
    parts: http::request::Parts,
    message: Bytes,
    error: RequestError,
}

impl Kept {
    /// Reads the request's one message. Encoding errors (such as a message
    /// over the send limit, refused before it is encoded) come out here.
    /// Returns the request to send first, and the copy.
    async fn new(request: Request<RequestBody>) -> Result<(Request<RequestBody>, Self), Status> {
        let (parts, mut body) = request.into_parts();
        let error = body.error().clone();
        // Read frame by frame: a unary request is one data frame, kept as
        // it is (collecting into a list of buffers would allocate).
        // The first frame is kept as it is; later ones (a large message
        // comes in chunks) are appended, each copied once.
        let mut first = Bytes::new();
        let mut more = BytesMut::new();
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame?.into_data() else {
                continue; // a request has no trailers to keep
            };
            if first.is_empty() {
                first = data;
            } else {
                if more.is_empty() {
                    more.extend_from_slice(&first);
                }
                more.extend_from_slice(&data);
            }
        }
        let message = if more.is_empty() {
            first
        } else {
            more.freeze()
        };
        let kept = Self {
            parts: clone_parts(&parts),
            message,
            error,
        };
        let first = RequestBody::replay(kept.message.clone(), kept.error.clone());
        Ok((Request::from_parts(parts, first), kept))
    }

    /// A copy to send.
    fn request(&self) -> Request<RequestBody> {
        Request::from_parts(
            clone_parts(&self.parts),
            RequestBody::replay(self.message.clone(), self.error.clone()),
        )
    }
}

/// A copy of a request's head to send again: what the endpoint and the
/// connection read (the extensions are not, and cost an allocation each).
fn clone_parts(parts: &http::request::Parts) -> http::request::Parts {
    let mut request = Request::new(());
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    request.into_parts().0
}

//! The retry layer: sending a call again, to another instance, where that
//! is safe; and the configured retries and hedges of a service's methods
//! ([`retries`](crate::client::retries)), held to its retry budget.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_util::future::Either;
use http::{Request, Response};
use http_body::Body as _;
use http_body_util::BodyExt;
use tonic::Status;

use super::Call;
use super::balance::{AttemptFailure, Balance, Failure};
use crate::body::{RequestBody, RequestError};
use crate::client::budget::RetryBudget;
use crate::client::connection::Connection;
use crate::client::observe::DecisionKind;
use crate::client::observe::Observed;
use crate::client::retries::{
    MAX_PUSHBACK, MethodPlan, PREVIOUS_ATTEMPTS_HEADER, PlanKind, Pushback, RetryPlan,
};
use crate::client::{Error, MethodInfo};
use crate::deadline::Deadline;
use http::{HeaderName, HeaderValue};

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
///
/// A method the policy retries or hedges, when it is idempotent (by its
/// `.proto`, or the policy's word) and its request is whole at once, is
/// also sent again on the codes its policy names, with backoff and within
/// the budget ([`Retry::retrying`]), or hedged ([`hedge`](super::hedge)).
/// The methods of a service without such a policy pay one load for it.
#[derive(Debug)]
pub(crate) struct Retry {
    pub(super) params: Params,
    pub(super) balance: Arc<Balance>,
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
        if !self.balance.ready_now() || self.keeps(&request) || self.balance.is_configured() {
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
    /// is kept, or whose service retries or hedges some methods.
    async fn call_slow(&self, request: Request<RequestBody>) -> Result<Response<Observed>, Status> {
        self.balance.wait_ready().await?;
        if let Some((plan, budget)) = self.balance.plan(request.uri().path())
            && (plan.idempotent || idempotent(&request))
        {
            return self.call_planned(request, &plan, budget.as_deref()).await;
        }
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
        self.again(failure, kept.as_ref(), deadline).await
    }

    /// A call of a method the policy retries or hedges, and which may be
    /// sent again. A request that is not whole at once (a stream still
    /// being written) or too large to keep is sent as any other call.
    async fn call_planned(
        &self,
        request: Request<RequestBody>,
        plan: &MethodPlan,
        budget: Option<&RetryBudget>,
    ) -> Result<Response<Observed>, Status> {
        if let Some(budget) = budget {
            budget.call();
        }
        let limit = self
            .balance
            .config
            .limits
            .max_encoding_message_size
            .saturating_add(MESSAGE_PREFIX);
        let (request, kept) = Kept::ready_now(request, limit)?;
        let (request, deadline) = with_deadline(request);
        let Some(kept) = kept else {
            let failure = match self.balance.attempt(request, &[], 1, deadline).await {
                Ok(response) => return Ok(response),
                Err(failure) => failure,
            };
            return self.again(failure, None, deadline).await;
        };
        let planned = Planned {
            kept: &kept,
            budget,
            deadline,
        };
        match &plan.kind {
            PlanKind::Retry(retry) => self.retrying(request, retry, planned).await,
            PlanKind::Hedge(hedge) => super::hedge::hedging(self, request, hedge, planned).await,
        }
    }

    /// Attempts of a call its policy retries: the first (`request`), then
    /// retries while the answer has one of the policy's codes (a transport
    /// failure after the request went out counts as `UNAVAILABLE`),
    /// attempts are left, the server's pushback allows, the deadline is
    /// not reached by the wait, and the budget grants one. A request that
    /// never went out is sent again as for any call, without counting.
    async fn retrying(
        &self,
        request: Request<RequestBody>,
        plan: &RetryPlan,
        planned: Planned<'_>,
    ) -> Result<Response<Observed>, Status> {
        let balance = &self.balance;
        let method = request.uri().path().to_owned();
        let mut request = request;
        let mut tried: Vec<Arc<Connection>> = Vec::new();
        // Every attempt's number (observers see it), the attempts the
        // policy counts, and the retries since the backoff last started over.
        let (mut number, mut counted, mut backoff_step) = (1u32, 1u32, 0u32);
        let mut unsent = 0;
        loop {
            let (picked, attempt) =
                balance.attempt_picked(request, &tried, number as usize, planned.deadline);
            let result = attempt.await;
            number += 1;
            // The attempt's answer, if the policy may retry it, as the
            // caller gets it if it is not.
            let (last, pushback): (Result<Response<Observed>, Status>, Pushback) = match result {
                Ok(response) => match status_only(&response) {
                    Some(code) if plan.codes.contains(code) => {
                        let pushback = Pushback::of(response.headers());
                        (Ok(response), pushback)
                    }
                    _ => return Ok(response),
                },
                Err(Failure::NoEndpoint) if !tried.is_empty() => {
                    // Every instance was tried: any may take the retry.
                    tried.clear();
                    number -= 1;
                    request = planned.kept.request(counted - 1);
                    continue;
                }
                Err(Failure::Attempt(failed)) => match failed.leftover {
                    Leftover::Untouched {
                        request: unsent_request,
                        same_endpoint,
                    } if unsent < self.params.max_attempts => {
                        // Never left: sent again at once, as for any call.
                        unsent += 1;
                        if !same_endpoint {
                            tried.push(failed.connection);
                        }
                        request = unsent_request;
                        continue;
                    }
                    Leftover::Replay if plan.codes.contains(tonic::Code::Unavailable) => (
                        Err(super::balance::unavailable(Error::Unreachable {
                            service: balance.key.clone(),
                            address: failed.address,
                            reason: failed.message,
                        })),
                        Pushback::None,
                    ),
                    Leftover::Replay => {
                        // Not a code the policy retries: replayed as any
                        // idempotent call is, on a transport failure.
                        let failure = Failure::Attempt(failed);
                        return self
                            .again(failure, Some(planned.kept), planned.deadline)
                            .await;
                    }
                    _ => return Err(self.final_error(*failed)),
                },
                Err(failure) => return self.again(failure, None, planned.deadline).await,
            };
            tried.extend(picked);
            if counted >= plan.max_attempts {
                return last;
            }
            let wait = match pushback {
                Pushback::Stop => {
                    balance.decided(&method, DecisionKind::PushbackStop);
                    return last;
                }
                Pushback::Wait(wait) => wait,
                Pushback::None => {
                    backoff_step += 1;
                    plan.backoff(backoff_step)
                }
            };
            // No wait may end past the deadline (nor, with none, past the
            // longest pushback honoured).
            let room = planned.deadline.map_or(MAX_PUSHBACK, |d| d.remaining());
            if wait >= room {
                if pushback != Pushback::None {
                    balance.decided(&method, DecisionKind::PushbackStop);
                }
                return last;
            }
            if !planned.spend(balance, &method, number, false) {
                return last;
            }
            if let Pushback::Wait(wait) = pushback {
                // The backoff starts over after a server's pushback.
                backoff_step = 0;
                balance.decided(&method, DecisionKind::PushbackWait { wait });
            }
            balance.decided(
                &method,
                DecisionKind::Retry {
                    attempt: number,
                    backoff: wait,
                },
            );
            drop(last);
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            counted += 1;
            // Attempts that never left are not counted (as in gRPC).
            request = planned.kept.request(counted - 1);
        }
    }

    /// The error a failed attempt ends its call with, when it is not sent
    /// again.
    pub(super) fn final_error(&self, failed: AttemptFailure) -> Status {
        match failed.leftover {
            Leftover::Fail(status) => status,
            Leftover::Untouched { .. } | Leftover::Replay => {
                super::balance::unavailable(Error::Unreachable {
                    service: self.balance.key.clone(),
                    address: failed.address,
                    reason: failed.message,
                })
            }
        }
    }

    /// After a failed first attempt: sends again while that is safe and
    /// attempts are left.
    pub(super) async fn again(
        &self,
        mut failure: Failure,
        kept: Option<&Kept>,
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
                Leftover::Replay => match kept {
                    Some(kept) => kept.request(0),
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

/// The bytes before each gRPC message: its compressed flag and length.
const MESSAGE_PREFIX: usize = 5;

/// Whether the call's method is marked idempotent ([`MethodInfo`]).
fn idempotent(request: &Request<RequestBody>) -> bool {
    request
        .extensions()
        .get::<MethodInfo>()
        .is_some_and(|m| m.idempotent)
}

/// The code of a status-only answer (gRPC's trailers-only response: its
/// headers end the stream), which has committed nothing to the caller.
pub(super) fn status_only(response: &Response<Observed>) -> Option<tonic::Code> {
    if !response.body().is_end_stream() {
        return None;
    }
    crate::status::code_in(response.headers())
}

/// What the attempts of a planned call share.
#[derive(Clone, Copy)]
pub(super) struct Planned<'a> {
    /// The request, to send again.
    pub(super) kept: &'a Kept,
    pub(super) budget: Option<&'a RetryBudget>,
    pub(super) deadline: Option<Deadline>,
}

impl Planned<'_> {
    /// Asks the budget, if any, for attempt `number` (a retry, or a
    /// `hedge`); a denial is told to observers.
    pub(super) fn spend(&self, balance: &Balance, method: &str, number: u32, hedge: bool) -> bool {
        if self.budget.is_none_or(RetryBudget::try_spend) {
            return true;
        }
        balance.decided(
            method,
            DecisionKind::BudgetDenied {
                attempt: number,
                hedge,
            },
        );
        false
    }
}

/// The kept copy of an idempotent request: its message, encoded, and its
/// head, to send again.
pub(super) struct Kept {
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
        // Read frame by frame (collecting into a list of buffers would
        // allocate); a large message comes in chunks.
        let mut read = Collected::default();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                read.push(data); // a request has no trailers to keep
            }
        }
        let kept = Self {
            parts: clone_parts(&parts),
            message: read.finish(),
            error,
        };
        let first = RequestBody::replay(kept.message.clone(), kept.error.clone());
        Ok((Request::from_parts(parts, first), kept))
    }

    /// Keeps `request` if its whole body is ready now and at most `limit`
    /// bytes (a unary or server-streaming call's one message, or a client
    /// stream already complete). Returns the request to send first (its
    /// body as it was, if it is not kept), and the copy, if kept.
    fn ready_now(
        request: Request<RequestBody>,
        limit: usize,
    ) -> Result<(Request<RequestBody>, Option<Self>), Status> {
        let (parts, mut body) = request.into_parts();
        let error = body.error().clone();
        let mut read = Collected::default();
        let mut now = Context::from_waker(std::task::Waker::noop());
        let whole = loop {
            if read.len() > limit {
                break false;
            }
            match Pin::new(&mut body).poll_frame(&mut now) {
                Poll::Ready(None) => break true,
                Poll::Ready(Some(frame)) => {
                    if let Ok(data) = frame?.into_data() {
                        read.push(data);
                    }
                }
                Poll::Pending => break false,
            }
        };
        if !whole {
            // Not kept: what was read goes first, then the rest.
            let resumed = Resumed {
                read: Some(read.finish()),
                rest: body,
            };
            let body = RequestBody::new(tonic::body::Body::new(resumed), usize::MAX, None, error);
            return Ok((Request::from_parts(parts, body), None));
        }
        let kept = Self {
            parts: clone_parts(&parts),
            message: read.finish(),
            error,
        };
        let first = RequestBody::replay(kept.message.clone(), kept.error.clone());
        Ok((Request::from_parts(parts, first), Some(kept)))
    }

    /// A copy to send (as attempt `previous + 1`: it says how many went
    /// before in `grpc-previous-rpc-attempts`, if any did).
    pub(super) fn request(&self, previous: u32) -> Request<RequestBody> {
        let mut parts = clone_parts(&self.parts);
        if previous > 0 {
            parts.headers.insert(
                HeaderName::from_static(PREVIOUS_ATTEMPTS_HEADER),
                HeaderValue::from(previous),
            );
        }
        Request::from_parts(
            parts,
            RequestBody::replay(self.message.clone(), self.error.clone()),
        )
    }
}

/// A request body's data frames, read one by one: the first kept as it is
/// (a unary request is one frame), later ones appended, each copied once.
#[derive(Default)]
struct Collected {
    first: Bytes,
    more: BytesMut,
}

impl Collected {
    fn push(&mut self, data: Bytes) {
        if self.first.is_empty() {
            self.first = data;
        } else {
            if self.more.is_empty() {
                self.more.extend_from_slice(&self.first);
            }
            self.more.extend_from_slice(&data);
        }
    }

    fn len(&self) -> usize {
        if self.more.is_empty() {
            self.first.len()
        } else {
            self.more.len()
        }
    }

    fn finish(self) -> Bytes {
        if self.more.is_empty() {
            self.first
        } else {
            self.more.freeze()
        }
    }
}

pin_project_lite::pin_project! {
    /// A request body of which some was read already: that first, then the
    /// rest.
    struct Resumed {
        read: Option<Bytes>,
        #[pin]
        rest: RequestBody,
    }
}

impl http_body::Body for Resumed {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        let this = self.project();
        if let Some(read) = this.read.take().filter(|r| !r.is_empty()) {
            return Poll::Ready(Some(Ok(http_body::Frame::data(read))));
        }
        this.rest.poll_frame(cx)
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

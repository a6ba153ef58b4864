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
    MAX_PUSHBACK, MethodPlan, PREVIOUS_ATTEMPTS_HEADER, PlanKind, Pushback,
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
    /// Only a kept copy (idempotent calls) may go again: the request may
    /// have been seen, or (`unsent`) it never went out but HTTP/2 took its
    /// head.
    Replay { unsent: bool },
    /// The request itself is at fault: no retry, this is the answer.
    Fail(Status),
}

impl Call<Request<RequestBody>> for Retry {
    type Response = Response<Observed>;

    fn call(
        &self,
        mut request: Request<RequestBody>,
    ) -> impl Future<Output = Result<Self::Response, Status>> + Send {
        // The common call: the instances are known, and the request is not
        // kept or is kept for its method's retries (read now, without
        // waiting). Its first attempt starts now, and only a failure (or an
        // answer to retry) takes the (boxed) way of sending again.
        let slow = |request| -> Again<'_> { Box::pin(self.call_slow(request)) };
        if !self.balance.ready_now() {
            return Either::Right(slow(request));
        }
        let (retries, may_keep) = if self.balance.is_configured() {
            match self.retries_now(&mut request) {
                Ok(Planning::Retry(retries)) => (Some(retries), false),
                Ok(Planning::Plain) => (None, true),
                Ok(Planning::Unkept) => (None, false),
                Ok(Planning::Later) => return Either::Right(slow(request)),
                Err(status) => return Either::Right(Box::pin(std::future::ready(Err(status)))),
            }
        } else {
            (None, true)
        };
        if may_keep && self.keeps(&request) {
            return Either::Right(slow(request));
        }
        let (request, deadline) = with_deadline(request);
        let (picked, attempt) = self
            .balance
            .start(request, &[], 1, deadline, retries.is_some());
        Either::Left(ResponseFuture {
            state: State::First { attempt },
            retry: self,
            deadline,
            retries,
            picked,
        })
    }
}

/// How a call of a service with configured methods is sent.
enum Planning {
    /// With its method's retries, its request kept (boxed: the call's
    /// future stays as small as any call's, which each layer moves).
    Retry(Box<Retries>),
    /// As any call: its method is not configured.
    Plain,
    /// As any call, but never kept: its method's retries could not keep
    /// its request (not whole at once, or too large).
    Unkept,
    /// By the boxed way ([`Retry::call_slow`]): its method is hedged.
    Later,
}

/// A call's configured retries: its kept request, its method's plan and
/// the service's budget.
pub(crate) struct Retries {
    kept: Kept,
    plan: Arc<MethodPlan>,
    budget: Option<Arc<RetryBudget>>,
}

impl Retries {
    /// Whether `response` is an answer the plan retries.
    fn retries(&self, response: &Response<Observed>) -> bool {
        self.plan
            .retry()
            .is_some_and(|plan| status_only(response).is_some_and(|code| plan.codes.contains(code)))
    }
}

type Again<'a> = Pin<Box<dyn Future<Output = Result<Response<Observed>, Status>> + Send + 'a>>;

pin_project_lite::pin_project! {
    /// A call's first attempt and, if it fails (or is answered with a code
    /// its retries are for), the attempts after it.
    pub(crate) struct ResponseFuture<'a, F> {
        #[pin]
        state: State<'a, F>,
        retry: &'a Retry,
        deadline: Option<Deadline>,
        retries: Option<Box<Retries>>,
        // The first attempt's connection (configured retries only).
        picked: Option<Arc<Connection>>,
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
    F: Future<Output = Result<Response<Observed>, Failure>> + Send + 'a,
{
    type Output = Result<Response<Observed>, Status>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let result = match this.state.as_mut().project() {
                StateProj::First { attempt } => std::task::ready!(attempt.poll(cx)),
                StateProj::Again { again } => return again.as_mut().poll(cx),
            };
            let retry: &'a Retry = this.retry;
            let deadline = *this.deadline;
            let again: Again<'a> = match (this.retries.take(), result) {
                (Some(retries), Ok(response)) if !retries.retries(&response) => {
                    return Poll::Ready(Ok(response));
                }
                (Some(retries), first) => {
                    let picked = this.picked.take();
                    Box::pin(retry.retrying(first, picked, retries, deadline))
                }
                (None, Ok(response)) => return Poll::Ready(Ok(response)),
                (None, Err(failure)) => Box::pin(retry.again(failure, None, deadline)),
            };
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

    /// How a call of a service with configured methods goes: with its
    /// method's retries (its request kept now, and counted by the budget),
    /// as any call, or the boxed way.
    fn retries_now(&self, request: &mut Request<RequestBody>) -> Result<Planning, Status> {
        let Some((plan, budget)) = self.balance.plan(request.uri().path()) else {
            return Ok(Planning::Plain);
        };
        if !(plan.idempotent || idempotent(request)) {
            return Ok(Planning::Plain);
        }
        if plan.retry().is_none() {
            return Ok(Planning::Later); // hedged
        }
        if let Some(budget) = &budget {
            budget.call();
        }
        Ok(match Kept::ready_now(request, self.keep_limit())? {
            Some(kept) => Planning::Retry(Box::new(Retries { kept, plan, budget })),
            None => Planning::Unkept,
        })
    }

    /// The largest request kept: a message at the send limit, framed.
    fn keep_limit(&self) -> usize {
        self.balance
            .config
            .limits
            .max_encoding_message_size
            .saturating_add(MESSAGE_PREFIX)
    }

    /// A call that waits for the first list of instances, or whose request
    /// is kept, or whose method is hedged.
    async fn call_slow(
        &self,
        mut request: Request<RequestBody>,
    ) -> Result<Response<Observed>, Status> {
        self.balance.wait_ready().await?;
        if let Some((plan, budget)) = self.balance.plan(request.uri().path())
            && (plan.idempotent || idempotent(&request))
        {
            return self.call_planned(request, plan, budget).await;
        }
        let kept = if self.keeps(&request) {
            Some(Kept::read(&mut request).await?)
        } else {
            None
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
        mut request: Request<RequestBody>,
        plan: Arc<MethodPlan>,
        budget: Option<Arc<RetryBudget>>,
    ) -> Result<Response<Observed>, Status> {
        if let Some(budget) = &budget {
            budget.call();
        }
        let kept = Kept::ready_now(&mut request, self.keep_limit())?;
        let (request, deadline) = with_deadline(request);
        let Some(kept) = kept else {
            let failure = match self.balance.attempt(request, &[], 1, deadline).await {
                Ok(response) => return Ok(response),
                Err(failure) => failure,
            };
            return self.again(failure, None, deadline).await;
        };
        if let PlanKind::Hedge(hedge) = &plan.kind {
            let planned = Planned {
                kept: &kept,
                budget: budget.as_deref(),
                deadline,
            };
            return super::hedge::hedging(self, request, hedge, planned).await;
        }
        let (picked, attempt) = self.balance.attempt_picked(request, &[], 1, deadline);
        let first = attempt.await;
        let retries = Box::new(Retries { kept, plan, budget });
        self.retrying(first, picked, retries, deadline).await
    }

    /// The attempts of a call its policy retries, after its first
    /// (`first`, sent to `picked`): retries while the answer has one of
    /// the policy's codes (a transport failure after the request went out
    /// counts as `UNAVAILABLE`), attempts are left, the server's pushback
    /// allows, the deadline is not reached by the wait, and the budget
    /// grants one. A request that never went out is sent again as for any
    /// call, without counting.
    async fn retrying(
        &self,
        first: Result<Response<Observed>, Failure>,
        picked: Option<Arc<Connection>>,
        retries: Box<Retries>,
        deadline: Option<Deadline>,
    ) -> Result<Response<Observed>, Status> {
        let Retries { kept, plan, budget } = *retries;
        let planned = Planned {
            kept: &kept,
            budget: budget.as_deref(),
            deadline,
        };
        let Some(plan) = plan.retry() else {
            // Not a retry plan: answered as any call.
            return match first {
                Ok(response) => Ok(response),
                Err(failure) => self.again(failure, Some(&kept), deadline).await,
            };
        };
        let balance = &self.balance;
        let method = kept.path();
        let (mut result, mut picked) = (first, picked);
        let mut tried: Vec<Arc<Connection>> = Vec::new();
        // The next attempt's number (observers see it), the attempts the
        // policy counts, and the retries since the backoff last started over.
        let (mut number, mut counted, mut backoff_step) = (2u32, 1u32, 0u32);
        let mut unsent = 0;
        loop {
            let request = 'next: {
                // The attempt's answer, if the policy may retry it, as the
                // caller gets it if it is not.
                let (last, pushback): (Result<Response<Observed>, Status>, Pushback) = match result
                {
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
                        break 'next kept.request(counted - 1);
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
                            break 'next unsent_request;
                        }
                        Leftover::Replay { .. }
                            if plan.codes.contains(tonic::Code::Unavailable) =>
                        {
                            (
                                Err(super::balance::unavailable(Error::Unreachable {
                                    service: balance.key.clone(),
                                    address: failed.address,
                                    reason: failed.message,
                                })),
                                Pushback::None,
                            )
                        }
                        Leftover::Replay { .. } => {
                            // Not a code the policy retries: replayed as any
                            // idempotent call is, on a transport failure.
                            let failure = Failure::Attempt(failed);
                            return self.again(failure, Some(&kept), deadline).await;
                        }
                        _ => return Err(self.final_error(*failed)),
                    },
                    Err(failure) => return self.again(failure, None, deadline).await,
                };
                tried.extend(picked.take());
                if counted >= plan.max_attempts {
                    return last;
                }
                let wait = match pushback {
                    Pushback::Stop => {
                        balance.decided(method, DecisionKind::PushbackStop);
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
                let room = deadline.map_or(MAX_PUSHBACK, |d| d.remaining());
                if wait >= room {
                    if pushback != Pushback::None {
                        balance.decided(method, DecisionKind::PushbackStop);
                    }
                    return last;
                }
                if !planned.spend(balance, method, number, false) {
                    return last;
                }
                if let Pushback::Wait(wait) = pushback {
                    // The backoff starts over after a server's pushback.
                    backoff_step = 0;
                    balance.decided(method, DecisionKind::PushbackWait { wait });
                }
                balance.decided(
                    method,
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
                kept.request(counted - 1)
            };
            let (next, attempt) =
                balance.attempt_picked(request, &tried, number as usize, deadline);
            picked = next;
            result = attempt.await;
            number += 1;
        }
    }

    /// The error a failed attempt ends its call with, when it is not sent
    /// again.
    pub(super) fn final_error(&self, failed: AttemptFailure) -> Status {
        match failed.leftover {
            Leftover::Fail(status) => status,
            Leftover::Untouched { .. } | Leftover::Replay { .. } => {
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
                Leftover::Replay { unsent } => match kept {
                    Some(kept) => kept.request(0),
                    None => {
                        // Not kept: the method is not idempotent, or no
                        // other instance could take a replay.
                        let why = if unsent {
                            "none of it went out, so calling again is safe, but only a \
                             method marked idempotent in its .proto keeps a copy to \
                             send again by itself"
                        } else {
                            "the request may have reached the instance, and only a \
                             method marked idempotent in its .proto is replayed, to \
                             another instance"
                        };
                        return Err(super::balance::unavailable(Error::Unreachable {
                            service: balance.key.clone(),
                            address: failed.address,
                            reason: format!("{}; not sent again: {why}", failed.message),
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
    /// Reads the request's one message, awaiting it, and keeps a copy;
    /// the request is left to send as it was. Encoding errors (such as a
    /// message over the send limit, refused before it is encoded) come
    /// out here.
    async fn read(request: &mut Request<RequestBody>) -> Result<Self, Status> {
        let body = request.body_mut();
        // Read frame by frame (collecting into a list of buffers would
        // allocate); a large message comes in chunks.
        let mut read = Collected::default();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                read.push(data); // a request has no trailers to keep
            }
        }
        Ok(Self::keep(request, read.finish()))
    }

    /// Keeps a copy of `request` if its whole body is ready now and at
    /// most `limit` bytes (a unary or server-streaming call's one message,
    /// or a client stream already complete). The request is left to send
    /// as it was, kept or not.
    fn ready_now(request: &mut Request<RequestBody>, limit: usize) -> Result<Option<Self>, Status> {
        let body = request.body_mut();
        let mut read = Collected::default();
        let mut now = Context::from_waker(std::task::Waker::noop());
        let whole = loop {
            if read.len() > limit {
                break false;
            }
            match Pin::new(&mut *body).poll_frame(&mut now) {
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
            body.unread(read.finish());
            return Ok(None);
        }
        Ok(Some(Self::keep(request, read.finish())))
    }

    /// Keeps `request`'s head and `message`, all of its body (read from
    /// it), and makes the request's body that message again.
    fn keep(request: &mut Request<RequestBody>, message: Bytes) -> Self {
        let error = request.body().error().clone();
        let kept = Self {
            parts: clone_head(request),
            message,
            error,
        };
        *request.body_mut() = RequestBody::replay(kept.message.clone(), kept.error.clone());
        kept
    }

    /// The path of the request (`/package.Service/Method`).
    pub(super) fn path(&self) -> &str {
        self.parts.uri.path()
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

/// A copy of a request's head to send again: what the endpoint and the
/// connection read (the extensions are not, and cost an allocation each).
fn clone_parts(parts: &http::request::Parts) -> http::request::Parts {
    head(&parts.method, &parts.uri, parts.version, &parts.headers)
}

/// [`clone_parts`] of a whole request.
fn clone_head<B>(request: &Request<B>) -> http::request::Parts {
    head(
        request.method(),
        request.uri(),
        request.version(),
        request.headers(),
    )
}

fn head(
    method: &http::Method,
    uri: &http::Uri,
    version: http::Version,
    headers: &http::HeaderMap,
) -> http::request::Parts {
    let mut request = Request::new(());
    *request.method_mut() = method.clone();
    *request.uri_mut() = uri.clone();
    *request.version_mut() = version;
    *request.headers_mut() = headers.clone();
    request.into_parts().0
}

#[cfg(test)]
mod tests {
    use super::*;

    use futures_util::StreamExt;
    use tokio::sync::mpsc;

    /// A gRPC frame of `len` bytes of `fill`.
    fn frame(len: u8, fill: u8) -> Bytes {
        let mut framed = vec![0, 0, 0, 0, len];
        framed.extend(std::iter::repeat_n(fill, usize::from(len)));
        Bytes::from(framed)
    }

    /// A request whose body is the frames sent on the returned sender, and
    /// ends when it is dropped.
    fn streaming() -> (mpsc::UnboundedSender<Bytes>, Request<RequestBody>) {
        let (send, mut receive) = mpsc::unbounded_channel::<Bytes>();
        let frames = futures_util::stream::poll_fn(move |cx| receive.poll_recv(cx))
            .map(|data| Ok::<_, Status>(http_body::Frame::data(data)));
        let body = tonic::body::Body::new(http_body_util::StreamBody::new(frames));
        let mut request =
            Request::new(RequestBody::new(body, usize::MAX, None, Default::default()));
        *request.uri_mut() = http::Uri::from_static("http://a/pkg.S/Get");
        request
            .headers_mut()
            .insert("x-token", HeaderValue::from_static("t"));
        (send, request)
    }

    async fn read_all(request: Request<RequestBody>) -> Vec<u8> {
        let read = request.into_body().collect();
        let collected = tokio::time::timeout(std::time::Duration::from_secs(5), read)
            .await
            .expect("the body ends")
            .unwrap();
        collected.to_bytes().to_vec()
    }

    #[tokio::test]
    async fn a_whole_request_is_kept_and_sent_unchanged_first_and_again() {
        let (send, mut request) = streaming();
        send.send(frame(3, 7)).unwrap();
        send.send(frame(2, 9)).unwrap();
        drop(send);
        let kept = Kept::ready_now(&mut request, 1024).unwrap().expect("kept");
        let expected = [frame(3, 7), frame(2, 9)].concat();
        let again = kept.request(1);
        assert_eq!(again.uri().path(), "/pkg.S/Get");
        assert_eq!(again.headers()["x-token"], "t");
        assert_eq!(again.headers()[PREVIOUS_ATTEMPTS_HEADER], "1");
        assert_eq!(
            read_all(request).await,
            expected,
            "the first attempt's body"
        );
        assert_eq!(read_all(again).await, expected, "a retry's body");
    }

    #[tokio::test]
    async fn a_request_not_whole_now_or_over_the_limit_is_sent_as_it_is() {
        // Still being written: what was read goes first, then the rest.
        let (send, mut request) = streaming();
        send.send(frame(3, 7)).unwrap();
        assert!(Kept::ready_now(&mut request, 1024).unwrap().is_none());
        send.send(frame(1, 8)).unwrap();
        drop(send);
        assert_eq!(read_all(request).await, [frame(3, 7), frame(1, 8)].concat());

        // Whole, but larger than the limit: not kept, and not cut.
        let (send, mut request) = streaming();
        for fill in 0..4 {
            send.send(frame(10, fill)).unwrap();
        }
        drop(send);
        assert!(Kept::ready_now(&mut request, 20).unwrap().is_none());
        let whole: Vec<u8> = (0..4).flat_map(|fill| frame(10, fill).to_vec()).collect();
        assert_eq!(read_all(request).await, whole);
    }
}

//! Hedging, a part of the retry layer: more attempts of a call while the
//! first is still out, the first answer winning.
//!
//! The first attempt goes at once; while no attempt has answered, another
//! goes each hedge delay ([`HedgePlan::delay`]), to an instance the call
//! has not tried, until the plan's hedges are spent or the budget denies
//! one. An attempt that ends with one of the plan's codes (or fails on its
//! way) sends the next hedge at once; the call ends with its last such
//! failure when no attempt is left. Any other answer wins (an answer with
//! another code ends the call with it, as gRPC's A6 says): the attempts
//! still out are dropped, which resets their streams with `CANCEL`, so
//! their servers stop.

use std::future::{Future, poll_fn};
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use http::{Request, Response};
use tokio::time::Instant;
use tonic::Status;

use super::balance::Failure;
use super::retry::{Leftover, Planned, Retry, status_only};
use crate::body::RequestBody;
use crate::client::connection::Connection;
use crate::client::observe::{DecisionKind, Observed};
use crate::client::retries::HedgePlan;

/// Makes the attempts of a hedged call, `request` first.
pub(super) async fn hedging(
    retry: &Retry,
    request: Request<RequestBody>,
    plan: &HedgePlan,
    planned: Planned<'_>,
) -> Result<Response<Observed>, Status> {
    let balance = &*retry.balance;
    let method = request.uri().path().to_owned();
    let started = Instant::now();
    let mut tried: Vec<Arc<Connection>> = Vec::new();
    let mut attempts = FuturesUnordered::new();
    let (picked, first) = balance.attempt_picked(request, &tried, 1, planned.deadline);
    tried.extend(picked);
    attempts.push(first);
    let mut number = 1u32;
    let mut hedges_left = plan.max_hedges;
    let mut unsent = 0;
    // The last failure, which is the answer if no attempt succeeds.
    let mut last: Option<Result<Response<Observed>, Status>> = None;
    let mut delay = plan.delay();
    let mut timer = pin!(tokio::time::sleep(delay));
    loop {
        // An attempt ended (`Some`), or the next hedge is due (`None`).
        let ended = poll_fn(|cx| {
            if let Poll::Ready(Some(result)) = attempts.poll_next_unpin(cx) {
                return Poll::Ready(Some(result));
            }
            if hedges_left > 0 && timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await;
        let waited = match ended {
            None => delay,
            Some(Ok(response)) => match status_only(&response) {
                Some(code) if plan.codes.contains(code) => {
                    last = Some(Ok(response));
                    Duration::ZERO
                }
                _ => {
                    // The winner: the others are cancelled as they drop.
                    plan.record(started.elapsed());
                    return Ok(response);
                }
            },
            Some(Err(Failure::Attempt(failed))) => match failed.leftover {
                Leftover::Untouched { request, .. } if unsent < retry.params.max_attempts => {
                    // Never left: sent again at once, as for any call.
                    unsent += 1;
                    number += 1;
                    let (picked, attempt) =
                        balance.attempt_picked(request, &tried, number as usize, planned.deadline);
                    tried.extend(picked);
                    attempts.push(attempt);
                    continue;
                }
                Leftover::Fail(status) => return Err(status),
                _ => {
                    last = Some(Err(retry.final_error(*failed)));
                    Duration::ZERO
                }
            },
            Some(Err(failure)) => {
                if last.is_none() && attempts.is_empty() {
                    // The first attempt found no instance: said as for any call.
                    return retry.again(failure, None, planned.deadline).await;
                }
                Duration::ZERO
            }
        };
        if hedges_left > 0 {
            hedges_left -= 1;
            if planned.spend(balance, &method, number + 1, true) {
                let request = planned.kept.request(number);
                let (picked, attempt) =
                    balance.attempt_picked(request, &tried, number as usize + 1, planned.deadline);
                if let Some(picked) = picked {
                    number += 1;
                    tried.push(picked);
                    attempts.push(attempt);
                    balance.decided(
                        &method,
                        DecisionKind::Hedge {
                            attempt: number,
                            delay: waited,
                        },
                    );
                } else {
                    // No instance left untried: no more hedges.
                    hedges_left = 0;
                    if let Some(budget) = planned.budget {
                        budget.refund();
                    }
                }
            } else {
                hedges_left = 0;
            }
            delay = plan.delay();
            timer.as_mut().reset(Instant::now() + delay);
        }
        if attempts.is_empty() {
            return last.unwrap_or_else(|| {
                Err(Status::unavailable(format!(
                    "no attempt of a hedged call to `{}` answered",
                    balance.key
                )))
            });
        }
    }
}

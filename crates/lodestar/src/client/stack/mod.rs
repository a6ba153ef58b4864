//! The client stack: every layer a call goes through, built in one place.
//!
//! Outer to inner, each in its own module:
//!
//! 1. **user layers** ([`ClientBuilder::layer`](super::ClientBuilder::layer)),
//!    first added outermost; they see each call once, as the caller made
//!    it, and their errors become statuses (`status::from_layer_error`);
//! 2. [`metered`]: each call counted by method and final status;
//! 2. [`deadline`]: the earliest of the call's own timeout, the deadline of
//!    the call being served and the client's default; it bounds everything
//!    below;
//! 3. [`codec`]: how messages are encoded (JSON) and compressed, and the
//!    send and receive limits;
//! 4. [`bulkhead`]: at most so many calls to the service in flight
//!    (`Policy::bulkhead`); overflow fails at once;
//! 5. [`breaker`]: the circuit breaker of the call's method
//!    (`MethodPolicy::breaker`); an open one fails the call at once;
//! 6. [`fault`]: faults injected into the method's calls
//!    (`MethodPolicy::fault`), counted by the breaker above;
//! 7. [`retry`]: sends the call again, to another instance, where that is
//!    safe;
//! 8. [`balance`]: discovery (the instance set, kept fresh by a watch of
//!    the registry) and selection ([`Selector`](super::selector::Selector));
//!    each attempt is counted on its endpoint and reported to observers
//!    ([`observe`](super::observe));
//! 9. [`endpoint`]: the connection to the chosen instance.
//!
//! The layers below the user's are not boxed one by one: the stack is one
//! state machine, boxed once per call, so a call costs one allocation for
//! its future however many layers it passes. Each layer does its work on
//! the request when it is called, and returns a small named future that
//! holds only its inner layer's future and what it needs once the response
//! comes: over an open connection the request is on its way before the
//! call's future is first polled, and the future is a few hundred bytes,
//! not kilobytes moved at every layer. Rare paths (waiting for the first
//! list of instances, connecting, keeping a request for a replay, sending
//! again, an injected fault) are boxed on their own.
//!
//! The bulkhead, breaker and fault layers see each call once (they are
//! above retry), so what they refuse is never retried; their state lives
//! in the channel's [`Guards`], shared by every clone of the client and
//! replaced with the policy. Off (no bulkhead, no method with a breaker or
//! faults), each costs a relaxed load and a branch per call.

pub(crate) mod balance;
mod breaker;
mod bulkhead;
mod codec;
mod deadline;
mod endpoint;
mod fault;
pub(crate) mod guard;
mod hedge;
mod metered;
mod resolver;
mod retry;

use std::future::Future;
use std::sync::Arc;

use lodestar_core::ServiceKey;
use tonic::Status;

use super::ClientConfig;
use super::observe::Reporter;
use super::policy::Policy;

pub(crate) use balance::Balance;
pub(crate) use bulkhead::BulkheadPermit;
pub(crate) use deadline::Inherited;

/// One layer of the stack below the user's: like a `tower::Service` whose
/// `call` borrows it, so that the layers' futures nest into one.
pub(crate) trait Call<Request>: Send + Sync + 'static {
    /// What a call returns.
    type Response;

    /// Handles one call.
    fn call(&self, request: Request)
    -> impl Future<Output = Result<Self::Response, Status>> + Send;
}

/// The stack below the user's layers.
pub(crate) type Core = metered::Metered<
    deadline::Deadline<
        codec::Codec<bulkhead::Bulkhead<breaker::Breaker<fault::Fault<retry::Retry>>>>,
    >,
>;

/// The state of a channel's bulkhead, breakers and fault injectors: kept
/// by its [`Balance`], so shared by every clone of the client, and
/// replaced with the policy.
#[derive(Debug)]
pub(crate) struct Guards {
    reporter: Reporter,
    bulkhead: Arc<bulkhead::Live>,
    breakers: Arc<breaker::Live>,
    faults: Arc<fault::Live>,
}

impl Guards {
    pub(crate) fn new(service: ServiceKey, config: &ClientConfig, policy: &Policy) -> Self {
        let guards = Self {
            reporter: Reporter {
                service,
                observers: config.observers.clone(),
                counted: config
                    .metrics
                    .as_ref()
                    .map(crate::metrics::governance::ClientGovernance::of),
            },
            bulkhead: Arc::default(),
            breakers: Arc::default(),
            faults: Arc::default(),
        };
        guards.follow(policy);
        guards
    }

    /// Follows `policy` from the next call on.
    pub(crate) fn follow(&self, policy: &Policy) {
        self.bulkhead.set(policy);
        self.breakers.follow(policy, &self.reporter);
        self.faults.follow(policy);
    }
}

/// Builds the stack for the channel over `balance`, outer to inner.
pub(crate) fn core(balance: Arc<Balance>) -> Core {
    let guards = &balance.guards;
    let retry = retry::Retry::new(
        retry::Params {
            max_attempts: balance.config.max_attempts,
        },
        balance.clone(),
    );
    let fault = fault::Fault::new(guards.faults.clone(), guards.reporter.clone(), retry);
    let breaker = breaker::Breaker::new(guards.breakers.clone(), guards.reporter.clone(), fault);
    let bulkhead =
        bulkhead::Bulkhead::new(guards.bulkhead.clone(), guards.reporter.clone(), breaker);
    let methods = balance.config.metrics.as_ref().map(|metrics| {
        Arc::new(crate::metrics::rpc::ClientMethods::new(
            metrics,
            &balance.key.service,
        ))
    });
    metered::Metered::new(methods, deadline_and_codec(&balance, bulkhead))
}

/// The deadline and codec layers, outermost, over `inner`.
fn deadline_and_codec<S>(balance: &Balance, inner: S) -> deadline::Deadline<codec::Codec<S>> {
    let config = &balance.config;
    let codec = codec::Codec::new(
        codec::Params {
            codec: config.codec,
            limits: config.limits,
            send_compressed: config.send_compressed,
            inspect_compression: config.inspect_compression,
        },
        inner,
    );
    deadline::Deadline::new(
        deadline::Params {
            service: balance.key.clone(),
            default: config.timeout,
        },
        codec,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call's future, boxed once, is moved and copied whole: the
    /// bulkhead, breaker and fault layers add a few bytes to it (a
    /// breaker's permit is boxed, for calls that have one).
    #[tokio::test]
    async fn the_resilience_layers_add_almost_nothing_to_a_calls_future() {
        let balance = Balance::new(
            ServiceKey::new("svc"),
            Arc::new(lodestar_core::MemoryRegistry::new()),
            Arc::new(ClientConfig::default()),
        );
        let full = core(balance.clone());
        let retry = retry::Retry::new(retry::Params { max_attempts: 3 }, balance.clone());
        let without = metered::Metered::new(None, deadline_and_codec(&balance, retry));
        let request = || http::Request::new(tonic::body::Body::empty());
        let with = std::mem::size_of_val(&full.call(request()));
        let without = std::mem::size_of_val(&without.call(request()));
        assert!(with <= without + 16, "{with} bytes, {without} without them");
    }
}

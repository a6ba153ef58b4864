//! The client stack: every layer a call goes through, built in one place.
//!
//! Outer to inner, each in its own module:
//!
//! 1. **user layers** ([`ClientBuilder::layer`](super::ClientBuilder::layer)),
//!    first added outermost; they see each call once, as the caller made
//!    it, and their errors become statuses (`status::from_layer_error`);
//! 2. [`deadline`]: the earliest of the call's own timeout, the deadline of
//!    the call being served and the client's default; it bounds everything
//!    below;
//! 3. [`codec`]: how messages are encoded (JSON) and compressed, and the
//!    send and receive limits;
//! 4. [`retry`]: sends the call again, to another instance, where that is
//!    safe;
//! 5. [`balance`]: discovery (the instance set, kept fresh by a watch of
//!    the registry) and selection ([`Selector`](super::selector::Selector));
//!    each attempt is counted on its endpoint and reported to observers
//!    ([`observe`](super::observe));
//! 6. [`endpoint`]: the connection to the chosen instance.
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
//! again) are boxed on their own.

pub(crate) mod balance;
mod codec;
mod deadline;
mod endpoint;
mod hedge;
mod resolver;
mod retry;

use std::future::Future;
use std::sync::Arc;

use tonic::Status;

pub(crate) use balance::Balance;
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
pub(crate) type Core = deadline::Deadline<codec::Codec<retry::Retry>>;

/// Builds the stack for the channel over `balance`, outer to inner.
pub(crate) fn core(balance: Arc<Balance>) -> Core {
    let config = balance.config.clone();
    let retry = retry::Retry::new(
        retry::Params {
            max_attempts: config.max_attempts,
        },
        balance.clone(),
    );
    let codec = codec::Codec::new(
        codec::Params {
            codec: config.codec,
            limits: config.limits,
            send_compressed: config.send_compressed,
            inspect_compression: config.inspect_compression,
        },
        retry,
    );
    deadline::Deadline::new(
        deadline::Params {
            service: balance.key.clone(),
            default: config.timeout,
        },
        codec,
    )
}

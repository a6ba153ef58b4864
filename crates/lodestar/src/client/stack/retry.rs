//! The retry layer: sending a call again, to another instance, where that
//! is safe.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use tonic::Status;

use super::Call;
use super::balance::{Balance, Failure};
use crate::body::RequestBody;
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

    async fn call(&self, request: Request<RequestBody>) -> Result<Self::Response, Status> {
        let balance = &self.balance;
        let idempotent = request
            .extensions()
            .get::<MethodInfo>()
            .is_some_and(|m| m.idempotent);
        let deadline = request.extensions().get::<Deadline>().copied();
        // An idempotent unary request is kept, so it can be sent again. Its
        // body is the encoded message; encoding errors (such as a message
        // over the send limit, refused before it is encoded) come out here.
        let (parts, body) = request.into_parts();
        let mut replay: Option<(http::request::Parts, Bytes, _)> = None;
        let mut request = if idempotent {
            let error = body.error().clone();
            let bytes = body.collect().await?.to_bytes();
            let body = RequestBody::replay(bytes.clone(), error.clone());
            replay = Some((clone_parts(&parts), bytes, error));
            Request::from_parts(parts, body)
        } else {
            Request::from_parts(parts, body)
        };

        // Connections already tried (allocates only when a call is retried).
        let mut tried: Vec<Arc<Connection>> = Vec::new();
        let mut last_error: Option<(String, String)> = None;
        for number in 1..=self.params.max_attempts {
            if let Some(deadline) = deadline {
                crate::deadline::set_header(request.headers_mut(), deadline);
            }
            let failure = match balance.attempt(request, &tried, number, deadline).await {
                Ok(response) => return Ok(response),
                Err(Failure::NoEndpoint) => break,
                Err(Failure::Fatal(status)) => return Err(status),
                Err(Failure::Attempt(failure)) => failure,
            };
            let same_endpoint = matches!(
                failure.leftover,
                Leftover::Untouched {
                    same_endpoint: true,
                    ..
                }
            );
            if !same_endpoint {
                tried.push(failure.connection.clone());
            }
            request = match failure.leftover {
                // Never sent: the caller's body, and its live per-message
                // choices, are still ahead.
                Leftover::Untouched { request, .. } => request,
                Leftover::Replay => match &replay {
                    Some((parts, bytes, error)) => Request::from_parts(
                        clone_parts(parts),
                        RequestBody::replay(bytes.clone(), error.clone()),
                    ),
                    None => return Err(Status::unavailable(failure.message)),
                },
                Leftover::Fail(status) => return Err(status),
            };
            tracing::debug!(service = %balance.key, address = %failure.address,
                error = %failure.message, "sending again");
            last_error = Some((failure.address, failure.message));
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

fn clone_parts(parts: &http::request::Parts) -> http::request::Parts {
    let mut request = Request::new(());
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    *request.extensions_mut() = parts.extensions.clone();
    request.into_parts().0
}

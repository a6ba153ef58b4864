//! The endpoint layer: sending one attempt over the connection to the
//! chosen instance.

use std::sync::Arc;

use http::uri::{PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use lodestar_core::error::chain;

use super::balance::{AttemptFailure, Balance, Failure};
use super::retry::Leftover;
use crate::body::RequestBody;
use crate::client::connection::Sender;
use crate::client::observe::{AttemptGuard, Observed, Outcome};
use crate::client::selector::Endpoint;

/// Sends `request` to `endpoint`, connecting first if needed, and says what
/// is left of it if that fails. A refused connection ejects the endpoint.
pub(crate) async fn send(
    balance: &Balance,
    endpoint: &Arc<Endpoint>,
    mut request: Request<RequestBody>,
    mut guard: AttemptGuard,
) -> Result<Response<Observed>, Failure> {
    let config = &balance.config;
    let connection = &endpoint.connection;
    let failed = |leftover, message: String| {
        Failure::Attempt(Box::new(AttemptFailure {
            leftover,
            message,
            address: endpoint.instance.address.clone(),
            connection: connection.clone(),
        }))
    };
    let sender = match connection
        .sender(config.connect_timeout, config.tls.as_ref(), config.http2)
        .await
    {
        Ok(sender) => sender,
        Err(e) => {
            if e.attempted {
                balance.eject(endpoint);
            }
            guard.finish(Outcome::Transport(e.message.clone()));
            let leftover = Leftover::Untouched {
                request,
                same_endpoint: false,
            };
            return Err(failed(leftover, e.message));
        }
    };
    set_origin(&mut request, endpoint, config.tls.is_some());
    let request_error = request.body().error().clone();
    guard.sent();
    match Sender::clone(&sender).try_send_request(request).await {
        Ok(response) => {
            endpoint.stats.connected();
            guard.answered();
            // A trailers-only response carries its status in its headers.
            let guard = match crate::status::code_in(response.headers()) {
                Some(code) => {
                    guard.finish(Outcome::Status(code));
                    None
                }
                None => Some(guard),
            };
            Ok(response.map(|body| Observed::new(body, guard)))
        }
        Err(mut e) => {
            if let Some(status) = request_error.get().cloned() {
                // Our own request body failed (e.g. a message over the send
                // limit): that is the error, and the connection is fine.
                guard.finish(Outcome::Status(status.code()));
                return Err(failed(Leftover::Fail(status), String::new()));
            }
            if !is_stream_error(e.error()) {
                connection.reset(&sender);
            }
            // hyper's own message alone ("http2 error") rarely says what happened.
            let message = format!("{} ({})", chain(e.error()), endpoint.instance.address);
            let leftover = match e.take_message() {
                Some(request) => {
                    // It never went out: the attempt was not sent after all.
                    guard.unsent();
                    Leftover::Untouched {
                        request,
                        same_endpoint: true,
                    }
                }
                None => Leftover::Replay,
            };
            guard.finish(Outcome::Transport(message.clone()));
            Err(failed(leftover, message))
        }
    }
}

/// Whether a failure concerned only this stream (the connection is fine).
fn is_stream_error(error: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.is_reset() && !h2.is_go_away();
        }
        source = e.source();
    }
    false
}

fn set_origin(request: &mut Request<RequestBody>, endpoint: &Endpoint, tls: bool) {
    let path = request
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(if tls { Scheme::HTTPS } else { Scheme::HTTP });
    parts.authority = Some(endpoint.authority.clone());
    parts.path_and_query = Some(path);
    if let Ok(uri) = Uri::from_parts(parts) {
        *request.uri_mut() = uri;
    }
}

//! The endpoint layer: sending one attempt over the connection to the
//! chosen instance.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use h2::RecvStream;
use http::uri::{PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use lodestar_core::error::chain;

use super::balance::{AttemptFailure, Balance, Failure};
use super::retry::Leftover;
use crate::body::{RequestBody, RequestError};
use crate::client::connection::Sender;
use crate::client::observe::{AttemptGuard, Observed, Outcome};
use crate::client::selector::Endpoint;
use crate::client::stream::{self, NotSent, Received};
use crate::client::web::{self, Protocol, StatusOnly};

/// Sends `request` to `endpoint` and says what is left of it if that
/// fails. Over an open connection the request goes out now, before the
/// returned future is first polled; otherwise the future connects first
/// (boxed: it is rare, and as large as a TCP and TLS handshake). A refused
/// connection ejects the endpoint.
pub(crate) fn send<'a>(
    balance: &'a Balance,
    endpoint: Arc<Endpoint>,
    request: Request<RequestBody>,
    guard: AttemptGuard,
) -> impl Future<Output = Result<Response<Observed>, Failure>> + Send + 'a {
    if let Some(sender) = endpoint.connection.live() {
        return Either::Left(exchange(balance, endpoint, sender, request, guard));
    }
    Either::Right(Box::pin(async move {
        let config = &balance.config;
        match endpoint
            .connection
            .connect(config.connect_timeout, config.tls.as_ref(), config.http2)
            .await
        {
            Ok(sender) => {
                let mut guard = guard;
                guard.connected();
                exchange(balance, endpoint, sender, request, guard).await
            }
            Err(e) => {
                if e.attempted {
                    balance.eject(&endpoint);
                }
                guard.finish(Outcome::Transport(e.message.clone()));
                let leftover = Leftover::Untouched {
                    request,
                    same_endpoint: false,
                };
                Err(failed(&endpoint, leftover, e.message))
            }
        }
    }))
}

/// Hands `request` to the connection now; the future waits for the
/// response's headers.
fn exchange(
    balance: &Balance,
    endpoint: Arc<Endpoint>,
    sender: Arc<Sender>,
    mut request: Request<RequestBody>,
    mut guard: AttemptGuard,
) -> impl Future<Output = Result<Response<Observed>, Failure>> + Send + use<> {
    set_origin(&mut request, &endpoint, balance.config.tls.is_some());
    // The one branch native gRPC pays for the choice of protocol.
    let web = match balance.config.protocol {
        Protocol::Grpc => None,
        protocol => {
            let unary = match request.extensions().get::<web::CallKind>() {
                Some(kind) => *kind == web::CallKind::Unary,
                None => {
                    let path = request.uri().path();
                    super::metered::kind(request.extensions().get(), path)
                        == crate::metrics::rpc::Kind::Unary
                }
            };
            let limit = balance.config.limits.max_decoding_message_size;
            match web::prepare(&mut request, protocol, unary, limit) {
                Ok(decoder) => Some(decoder),
                Err(status) => {
                    guard.finish(Outcome::Status(status.code()));
                    return Either::Right(std::future::ready(Err(failed(
                        &endpoint,
                        Leftover::Fail(status),
                        String::new(),
                    ))));
                }
            }
        }
    };
    let request_error = request.body().error().clone();
    match stream::send(&sender, request) {
        Ok(sent) => {
            guard.sent();
            Either::Left(Exchange {
                response: sent.response,
                peeking: None,
                waiting: Some(Waiting {
                    endpoint,
                    sender,
                    request_error,
                    guard,
                    cancel: sent.cancel,
                    web,
                }),
            })
        }
        Err(NotSent::Connection { request, error }) => {
            // Closing or going away: the next call opens a new connection,
            // and this one may go anywhere, as it never left.
            endpoint.connection.reset(&sender);
            let message = format!("{} ({})", sender.failure(&error), endpoint.instance.address);
            guard.finish(Outcome::Transport(message.clone()));
            let leftover = Leftover::Untouched {
                request: *request,
                same_endpoint: true,
            };
            Either::Right(std::future::ready(Err(failed(
                &endpoint, leftover, message,
            ))))
        }
        Err(NotSent::Lost(error)) => {
            endpoint.connection.reset(&sender);
            let message = format!(
                "{} ({}); the connection closed as the request was handed to it, before \
                 any of it went out",
                sender.failure(&error),
                endpoint.instance.address
            );
            guard.finish(Outcome::Transport(message.clone()));
            Either::Right(std::future::ready(Err(failed(
                &endpoint,
                Leftover::Replay { unsent: true },
                message,
            ))))
        }
        Err(NotSent::Refused(error)) => {
            let status = tonic::Status::internal(format!(
                "HTTP/2 refused the request to {}: {}",
                endpoint.instance.address,
                chain(&error)
            ));
            guard.finish(Outcome::Status(status.code()));
            Either::Right(std::future::ready(Err(failed(
                &endpoint,
                Leftover::Fail(status),
                String::new(),
            ))))
        }
    }
}

pin_project_lite::pin_project! {
    /// An attempt sent, waiting for the response's headers (and, for a
    /// web call answered with an error, its short body).
    struct Exchange {
        #[pin]
        response: h2::client::ResponseFuture,
        // Taken when the response comes.
        waiting: Option<Waiting>,
        // A web answer whose first frame is being read: it may be only a
        // status.
        // (Boxed: rare, and the future stays small for native calls.)
        peeking: Option<Box<Response<RecvStream>>>,
    }
}

/// What an attempt needs to know once its response (or error) comes.
struct Waiting {
    endpoint: Arc<Endpoint>,
    sender: Arc<Sender>,
    request_error: RequestError,
    guard: AttemptGuard,
    cancel: Option<stream::OnDrop>,
    /// How to read the response back, for a call over gRPC-Web or Connect.
    web: Option<Box<web::Decoder>>,
}

impl Future for Exchange {
    type Output = Result<Response<Observed>, Failure>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let Some(waiting) = this.waiting.as_mut() else {
                // Polled after it was ready: a bug in the caller; never hang.
                return Poll::Ready(Err(Failure::NoEndpoint));
            };
            // A web answer that may be only a status: its first frame tells.
            if let (Some(response), Some(web)) = (this.peeking.as_mut(), waiting.web.as_deref_mut())
            {
                let read = std::task::ready!(web.poll_first(response.body_mut(), cx));
                let result = match this.peeking.take() {
                    Some(mut response) => read.map(|status| {
                        if let Some(status) = status {
                            response.headers_mut().extend(status);
                        }
                        *response
                    }),
                    None => return Poll::Ready(Err(Failure::NoEndpoint)),
                };
                return Poll::Ready(match this.waiting.take() {
                    Some(waiting) => waiting.outcome(result),
                    None => Err(Failure::NoEndpoint),
                });
            }
            let mut result = std::task::ready!(this.response.as_mut().poll(cx));
            if let (Ok(response), Some(web)) = (&mut result, waiting.web.as_deref_mut()) {
                web.response(response);
                if web.status_only(response.body().is_end_stream()) == StatusOnly::AfterFirstFrame {
                    *this.peeking = result.ok().map(Box::new);
                    continue;
                }
            }
            return Poll::Ready(match this.waiting.take() {
                Some(waiting) => waiting.outcome(result),
                None => Err(Failure::NoEndpoint),
            });
        }
    }
}

impl Waiting {
    fn outcome(
        self,
        result: Result<Response<RecvStream>, h2::Error>,
    ) -> Result<Response<Observed>, Failure> {
        let Waiting {
            endpoint,
            sender,
            request_error,
            mut guard,
            cancel,
            web,
        } = self;
        match result {
            Ok(response) => {
                endpoint.stats.connected();
                guard.answered();
                let (parts, stream) = response.into_parts();
                let body = match web {
                    None => Received::new(stream, cancel),
                    Some(web) => Received::web(stream, cancel, web),
                };
                // A status-only answer (gRPC's trailers-only response, or a
                // web call's status read back) carries it in its headers.
                let guard = match http_body::Body::is_end_stream(&body)
                    .then(|| crate::status::code_in(&parts.headers))
                    .flatten()
                {
                    Some(code) => {
                        guard.finish(Outcome::Status(code));
                        None
                    }
                    None => Some(guard),
                };
                Ok(Response::from_parts(parts, Observed::new(body, guard)))
            }
            Err(e) => {
                if let Some(status) = request_error.get().cloned() {
                    // Our own request body failed (e.g. a message over the
                    // send limit): that is the error, and the connection is fine.
                    guard.finish(Outcome::Status(status.code()));
                    return Err(failed(&endpoint, Leftover::Fail(status), String::new()));
                }
                if !e.is_reset() || e.is_go_away() {
                    // Not just this stream: the connection failed.
                    endpoint.connection.reset(&sender);
                }
                let message = format!("{} ({})", sender.failure(&e), endpoint.instance.address);
                guard.finish(Outcome::Transport(message.clone()));
                Err(failed(
                    &endpoint,
                    Leftover::Replay { unsent: false },
                    message,
                ))
            }
        }
    }
}

fn failed(endpoint: &Endpoint, leftover: Leftover, message: String) -> Failure {
    Failure::Attempt(Box::new(AttemptFailure {
        leftover,
        message,
        address: endpoint.instance.address.clone(),
        connection: endpoint.connection.clone(),
    }))
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

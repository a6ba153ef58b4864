//! [`Channel`]: the `tower::Service` generated clients send their calls through.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::uri::{PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tonic::Status;
use tonic::body::Body;

use super::Error;
use super::balancer::{Balancer, Endpoint};
use crate::body::{CallBody, RequestBody, Side};
use crate::deadline;

/// The body of a response received through a [`Channel`]: it fails with
/// `DEADLINE_EXCEEDED` if still open at the call's deadline, and with
/// `RESOURCE_EXHAUSTED` on a message over the client's receive limit.
pub type ResponseBody = CallBody<Incoming>;

/// Calls one named service: picks an instance per call, connects lazily,
/// applies deadlines, and sends again where that is safe.
///
/// Cheap to clone; clones share instances and connections. Get one from
/// [`Client::channel`](super::Client::channel) and put a generated client
/// on it, or use the generated `by_name` constructor, which does both.
#[derive(Clone)]
pub struct Channel {
    balancer: Arc<Balancer>,
    idempotent: &'static [&'static str],
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel")
            .field("service", &self.balancer.key)
            .finish()
    }
}

impl Channel {
    pub(crate) fn new(balancer: Arc<Balancer>) -> Self {
        Self {
            balancer,
            idempotent: &[],
        }
    }

    /// Declares the unary methods (by path, `/package.Service/Method`) that
    /// are safe to send again when an instance fails before answering.
    /// Generated clients declare the methods marked idempotent in the `.proto`.
    pub fn with_idempotent_methods(mut self, paths: &'static [&'static str]) -> Self {
        self.idempotent = paths;
        self
    }

    /// The addresses of the instances this channel currently balances over.
    pub fn addresses(&self) -> Vec<String> {
        self.balancer
            .endpoints()
            .iter()
            .map(|e| e.instance.address.clone())
            .collect()
    }
}

impl tower_service::Service<Request<Body>> for Channel {
    type Response = Response<ResponseBody>;
    type Error = Status;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Status>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let balancer = self.balancer.clone();
        let idempotent = self.idempotent.contains(&request.uri().path());
        // Read the inbound deadline here, inside the caller's task.
        let deadline = deadline::outbound(request.headers_mut(), balancer.config.timeout);
        Box::pin(async move {
            let path = request.uri().path().to_owned();
            let response = match deadline {
                None => dispatch(&balancer, request, idempotent).await?,
                Some(deadline) => tokio::time::timeout_at(
                    deadline.instant(),
                    dispatch(&balancer, request, idempotent),
                )
                .await
                .map_err(|_| {
                    deadline::exceeded(format_args!("calling {}{path}", balancer.key.service))
                })??,
            };
            let limit = balancer.config.limits.max_decoding_message_size;
            Ok(response.map(|body| CallBody::new(body, deadline, Side::Received, Some(limit))))
        })
    }
}

/// What is left of a request after a failed attempt.
// Short-lived and moved once per failed attempt; boxing would cost more.
#[allow(clippy::large_enum_variant)]
enum Retry {
    /// The request itself, untouched: it never left this process.
    Untouched(Request<Body>),
    /// It may have been seen: only a buffered copy (idempotent calls) may go again.
    Replay,
    /// The request itself is at fault: no retry, this is the answer.
    Fail(Status),
}

async fn dispatch(
    balancer: &Arc<Balancer>,
    request: Request<Body>,
    idempotent: bool,
) -> Result<Response<Incoming>, Status> {
    balancer.ready().await.map_err(unavailable)?;
    // An idempotent unary request is buffered, so it can be sent again.
    let (parts, body) = request.into_parts();
    let mut replay: Option<(http::request::Parts, Bytes)> = None;
    let mut request = if idempotent {
        // The body is the encoded message; encoding errors (such as a
        // message over the send limit) come out here as they are.
        let bytes = body.collect().await?.to_bytes();
        replay = Some((clone_parts(&parts), bytes.clone()));
        Request::from_parts(parts, Body::new(http_body_util::Full::new(bytes)))
    } else {
        Request::from_parts(parts, body)
    };

    let endpoints = balancer.endpoints();
    let mut tried = [usize::MAX; super::MAX_ATTEMPTS];
    let mut last_error: Option<(String, String)> = None;
    for attempt in 0..balancer.config.max_attempts.min(endpoints.len().max(1)) {
        let Some(index) = balancer.pick(&endpoints, &tried[..attempt]) else {
            break;
        };
        tried[attempt] = index;
        let endpoint = &endpoints[index];
        match send(balancer, endpoint, request).await {
            Ok(response) => return Ok(response),
            Err((retry, error)) => {
                request = match retry {
                    Retry::Untouched(request) => request,
                    Retry::Replay => match &replay {
                        Some((parts, bytes)) => Request::from_parts(
                            clone_parts(parts),
                            Body::new(http_body_util::Full::new(bytes.clone())),
                        ),
                        None => return Err(Status::unavailable(error)),
                    },
                    Retry::Fail(status) => return Err(status),
                };
                tracing::debug!(service = %balancer.key, address = %endpoint.instance.address,
                    %error, "sending to another instance");
                last_error = Some((endpoint.instance.address.clone(), error));
            }
        }
    }
    Err(unavailable(match last_error {
        None => Error::NoInstances {
            service: balancer.key.clone(),
        },
        Some((address, reason)) => Error::Unreachable {
            service: balancer.key.clone(),
            address,
            reason,
        },
    }))
}

async fn send(
    balancer: &Balancer,
    endpoint: &Endpoint,
    mut request: Request<Body>,
) -> Result<Response<Incoming>, (Retry, String)> {
    let mut sender = match endpoint
        .connection
        .sender(balancer.config.connect_timeout)
        .await
    {
        Ok(sender) => sender,
        Err(e) => {
            endpoint.eject(&balancer.config);
            return Err((Retry::Untouched(request), e.to_string()));
        }
    };
    set_origin(&mut request, endpoint);
    let (parts, body) = request.into_parts();
    let (body, body_error) =
        RequestBody::new(body, balancer.config.limits.max_encoding_message_size);
    match sender
        .try_send_request(Request::from_parts(parts, body))
        .await
    {
        Ok(response) => {
            endpoint.succeeded();
            Ok(response)
        }
        Err(mut e) => {
            if let Some(status) = body_error.get() {
                // Our own request body failed (e.g. a message over the send
                // limit): that is the error, and the connection is fine.
                return Err((Retry::Fail(status.clone()), String::new()));
            }
            endpoint.connection.reset();
            let message = format!("{} ({})", e.error(), endpoint.instance.address);
            match e.take_message() {
                Some(request) => {
                    let (parts, body) = request.into_parts();
                    Err((
                        Retry::Untouched(Request::from_parts(parts, body.into_inner())),
                        message,
                    ))
                }
                None => Err((Retry::Replay, message)),
            }
        }
    }
}

fn set_origin(request: &mut Request<Body>, endpoint: &Endpoint) {
    let path = request
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(endpoint.authority.clone());
    parts.path_and_query = Some(path);
    if let Ok(uri) = Uri::from_parts(parts) {
        *request.uri_mut() = uri;
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

fn unavailable(error: Error) -> Status {
    let mut status = Status::unavailable(error.to_string());
    status.set_source(Arc::new(error));
    status
}

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
use super::connection::Sender;
use crate::body::{CallBody, RequestBody, RequestError, Side};
use crate::codec::{self as json, Codec, Descriptors, Transcode};
use crate::compression::{Compress, Encoding, PerMessage, ReceivedFlags};
use crate::deadline;
use crate::frames::{Decompress, Reframer};

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
    descriptors: Option<Result<Descriptors, String>>,
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
            descriptors: None,
        }
    }

    /// Gives the channel the descriptors of the services it calls (an
    /// encoded `FileDescriptorSet`), which the JSON codec needs. Generated
    /// clients do this.
    pub fn with_descriptors(mut self, file_descriptor_set: &'static [u8]) -> Self {
        self.descriptors = Some(Descriptors::of_static(file_descriptor_set));
        self
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
        let deadline = match deadline::outbound(request.headers(), balancer.config.timeout) {
            Ok(deadline) => deadline,
            Err(status) => return Box::pin(std::future::ready(Err(status))),
        };
        // And the trace context of the call being served, likewise.
        crate::trace::TraceContext::inject_current(request.headers_mut());
        let received = balancer
            .config
            .inspect_compression
            .then(ReceivedFlags::default);
        let plan = match plan_for(&balancer.config, self.descriptors.as_ref(), &mut request) {
            Ok(plan) => plan,
            Err(status) => return Box::pin(std::future::ready(Err(status))),
        };
        Box::pin(async move {
            let request_error = RequestError::default();
            let call = dispatch(
                &balancer,
                request,
                idempotent,
                deadline,
                &plan,
                &request_error,
            );
            let response = match deadline {
                None => call.await?,
                Some(deadline) => {
                    let service = &balancer.key.service;
                    tokio::time::timeout_at(deadline.instant(), call)
                        .await
                        .map_err(|_| deadline::exceeded(format_args!("calling {service}")))??
                }
            };
            let limit = balancer.config.limits.max_decoding_message_size;
            // A JSON answer is transcoded back to protobuf for the generated client.
            let inbound = plan
                .response
                .filter(|_| json::is_json(response.headers()))
                .map(|t| {
                    let gzip = response
                        .headers()
                        .get("grpc-encoding")
                        .is_some_and(|e| e.as_bytes() == b"gzip");
                    Reframer::transcoding(t, Decompress { limit, gzip })
                });
            let mut response = response.map(|body| {
                CallBody::new(body, deadline, Side::Received, Some(limit))
                    .with_request_error(request_error)
                    .with_received_flags(received.clone())
                    .with_reframer(inbound)
            });
            if plan.response_is_json {
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/grpc"),
                );
            }
            if let Some(received) = received {
                response.extensions_mut().insert(received);
            }
            Ok(response)
        })
    }
}

/// What is left of a request after a failed attempt.
// Short-lived and moved once per failed attempt; boxing would cost more.
#[allow(clippy::large_enum_variant)]
enum Retry {
    /// The request itself, untouched: it never left this process.
    Untouched {
        request: Request<Body>,
        /// The endpoint may take it on a new connection (only the old one failed).
        same_endpoint: bool,
    },
    /// It may have been seen: only a buffered copy (idempotent calls) may go again.
    Replay,
    /// The request itself is at fault: no retry, this is the answer.
    Fail(Status),
}

/// How one call's messages are rewritten: request compression, and
/// transcoding to and from JSON.
#[derive(Debug, Default)]
struct CallPlan {
    compression: Option<(Encoding, bool, Option<PerMessage>)>,
    /// The per-message choices as they were when the call began.
    replay_plan: Option<PerMessage>,
    request: Option<Transcode>,
    response: Option<Transcode>,
    response_is_json: bool,
}

impl CallPlan {
    /// A fresh rewriter for one attempt's request body. `live`: the body is
    /// the caller's own (not yet sent); a replayed copy follows the
    /// per-message choices as they were when the call began.
    fn reframer(&self, live: bool) -> Option<Reframer> {
        if self.compression.is_none() && self.request.is_none() {
            // The common call: nothing to rewrite.
            return None;
        }
        let reframer = match &self.compression {
            Some((encoding, default, plan)) => {
                let plan = if live {
                    plan.clone()
                } else {
                    self.replay_plan.as_ref().map(PerMessage::snapshot)
                };
                Reframer::compressing(*encoding, *default, plan)
            }
            None => Reframer::default(),
        };
        Some(reframer.with_transcode(self.request.clone()))
    }
}

/// Decides how one call's messages are encoded and compressed, and sets
/// `grpc-encoding` and `content-type` accordingly.
fn plan_for(
    config: &super::ClientConfig,
    descriptors: Option<&Result<Descriptors, String>>,
    request: &mut Request<Body>,
) -> Result<CallPlan, Status> {
    let mut plan = CallPlan::default();
    if config.codec == Codec::Json {
        let path = request.uri().path();
        let method = match descriptors {
            None => {
                return Err(Status::internal(format!(
                    "the JSON codec needs the descriptors of {path}: make the client with the \
                     generated `by_name`, or give the channel `with_descriptors`"
                )));
            }
            Some(Err(e)) => {
                return Err(Status::internal(format!(
                    "the JSON codec cannot use this client's descriptors: {e}"
                )));
            }
            Some(Ok(descriptors)) => descriptors.method(path).ok_or_else(|| {
                Status::internal(format!("the client's descriptors do not declare {path}"))
            })?,
        };
        plan.request = Some(Transcode::ProtoToJson(method.input()));
        plan.response = Some(Transcode::JsonToProto {
            descriptor: method.output(),
            peer_is_at_fault: false,
        });
        plan.response_is_json = true;
        request.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(json::CONTENT_TYPE),
        );
    }
    if let Some(encoding) = config.send_compressed {
        let default = request.extensions().get::<Compress>().is_none_or(|c| c.0);
        let per_message = request.extensions().get::<PerMessage>().cloned();
        if default || per_message.is_some() {
            request
                .headers_mut()
                .insert("grpc-encoding", encoding.header_value());
            plan.replay_plan = per_message.as_ref().map(PerMessage::snapshot);
            plan.compression = Some((encoding, default, per_message));
        }
    }
    Ok(plan)
}

async fn dispatch(
    balancer: &Arc<Balancer>,
    request: Request<Body>,
    idempotent: bool,
    deadline: Option<crate::Deadline>,
    plan: &CallPlan,
    request_error: &RequestError,
) -> Result<Response<Incoming>, Status> {
    balancer.ready().await.map_err(unavailable)?;
    // An idempotent unary request is buffered, so it can be sent again.
    let (parts, body) = request.into_parts();
    let mut replay: Option<(http::request::Parts, Bytes)> = None;
    let mut request = if idempotent {
        // The body is the encoded message; encoding errors (such as a
        // message over the send limit, refused before it is encoded) come
        // out here as they are.
        let limit = balancer.config.limits.max_encoding_message_size;
        let bytes = RequestBody::new(body, limit, None, request_error.clone())
            .collect()
            .await?
            .to_bytes();
        replay = Some((clone_parts(&parts), bytes.clone()));
        Request::from_parts(parts, Body::new(http_body_util::Full::new(bytes)))
    } else {
        Request::from_parts(parts, body)
    };

    // Connections already tried (allocates only when a call is retried).
    let mut tried: Vec<Arc<super::connection::Connection>> = Vec::new();
    // Whether the body is now the buffered copy rather than the caller's.
    let mut replayed = false;
    let mut last_error: Option<(String, String)> = None;
    for _ in 0..balancer.config.max_attempts {
        // The instance set may have changed since the last attempt.
        let Some(endpoint) = balancer.pick(&tried) else {
            break;
        };
        if let Some(deadline) = deadline {
            deadline::set_header(request.headers_mut(), deadline);
        }
        let reframer = plan.reframer(!replayed);
        let (retry, error) = match send(balancer, &endpoint, request, reframer, request_error).await
        {
            Ok(response) => return Ok(response),
            Err(failure) => failure,
        };
        let same_endpoint = matches!(
            retry,
            Retry::Untouched {
                same_endpoint: true,
                ..
            }
        );
        if !same_endpoint {
            tried.push(endpoint.connection.clone());
        }
        request = match retry {
            // Never sent: the caller's body, and its live per-message
            // choices, are still ahead.
            Retry::Untouched { request, .. } => request,
            Retry::Replay => match &replay {
                Some((parts, bytes)) => {
                    replayed = true;
                    Request::from_parts(
                        clone_parts(parts),
                        Body::new(http_body_util::Full::new(bytes.clone())),
                    )
                }
                None => return Err(Status::unavailable(error)),
            },
            Retry::Fail(status) => return Err(status),
        };
        tracing::debug!(service = %balancer.key, address = %endpoint.instance.address,
            %error, "sending again");
        last_error = Some((endpoint.instance.address.clone(), error));
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
    reframer: Option<Reframer>,
    request_error: &RequestError,
) -> Result<Response<Incoming>, (Retry, String)> {
    let config = &balancer.config;
    let connection = &endpoint.connection;
    let sender = match connection
        .sender(config.connect_timeout, config.tls.as_ref(), config.http2)
        .await
    {
        Ok(sender) => sender,
        Err(e) => {
            if e.attempted {
                connection.eject(config.ejection_base, config.ejection_max);
            }
            let retry = Retry::Untouched {
                request,
                same_endpoint: false,
            };
            return Err((retry, e.message));
        }
    };
    set_origin(&mut request, endpoint, config.tls.is_some());
    let (parts, body) = request.into_parts();
    let body = RequestBody::new(
        body,
        config.limits.max_encoding_message_size,
        reframer,
        request_error.clone(),
    );
    match Sender::clone(&sender)
        .try_send_request(Request::from_parts(parts, body))
        .await
    {
        Ok(response) => {
            connection.succeeded();
            Ok(response)
        }
        Err(mut e) => {
            if let Some(status) = request_error.get() {
                // Our own request body failed (e.g. a message over the send
                // limit): that is the error, and the connection is fine.
                return Err((Retry::Fail(status.clone()), String::new()));
            }
            if !is_stream_error(e.error()) {
                connection.reset(&sender);
            }
            let message = format!("{} ({})", error_chain(e.error()), endpoint.instance.address);
            let retry = match e.take_message() {
                Some(request) => {
                    let (parts, body) = request.into_parts();
                    Retry::Untouched {
                        request: Request::from_parts(parts, body.into_inner()),
                        same_endpoint: true,
                    }
                }
                None => Retry::Replay,
            };
            Err((retry, message))
        }
    }
}

/// An error and its sources, as one line: hyper's own message alone
/// ("http2 error") rarely says what happened.
fn error_chain(error: &hyper::Error) -> String {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        message.push_str(": ");
        message.push_str(&e.to_string());
        source = e.source();
    }
    message
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

fn set_origin(request: &mut Request<Body>, endpoint: &Endpoint, tls: bool) {
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

//! The codec layer: how a call's messages are encoded and compressed, and
//! the limits on their size.

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::{HeaderValue, Request, Response};
use prost_reflect::MethodDescriptor;
use tonic::Status;
use tonic::body::Body;

use super::Call;
use crate::MessageLimits;
use crate::body::{CallBody, RequestBody, RequestError};
use crate::client::observe::Observed;
use crate::client::{MethodInfo, ResponseBody};
use crate::codec::{self, Codec as Encoding, Descriptors, Transcode};
use crate::compression::{
    ACCEPTED, Compress, Encoding as Compression, GRPC_ACCEPT_ENCODING, GRPC_ENCODING, PerMessage,
    ReceivedFlags,
};
use crate::deadline::Deadline;
use crate::frames::{Decompress, Reframer};

/// Settings of the codec layer (from the [`ClientBuilder`](crate::client::ClientBuilder)).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Params {
    pub(crate) codec: Encoding,
    pub(crate) limits: MessageLimits,
    pub(crate) send_compressed: Option<Compression>,
    pub(crate) inspect_compression: bool,
}

/// Encodes the request's messages as the client is set to (JSON is
/// transcoded from the generated client's protobuf; messages are
/// compressed), refusing any over the send limit before it is encoded; and
/// decodes the response's back, refusing any over the receive limit, and
/// ending it at the call's deadline.
#[derive(Debug)]
pub(crate) struct Codec<S> {
    params: Params,
    /// The descriptors the channel's JSON calls last used, by address of
    /// the encoded set, so that a call finds them without a shared lock.
    descriptors: OnceLock<(usize, Result<Descriptors, String>)>,
    inner: S,
}

impl<S> Codec<S> {
    pub(crate) fn new(params: Params, inner: S) -> Self {
        Self {
            params,
            descriptors: OnceLock::new(),
            inner,
        }
    }

    /// The descriptor of the method `request` calls, which the JSON codec needs.
    fn json_method(&self, request: &Request<Body>) -> Result<MethodDescriptor, Status> {
        let path = request.uri().path();
        let Some(set) = request
            .extensions()
            .get::<MethodInfo>()
            .and_then(|m| m.descriptors)
        else {
            return Err(Status::internal(format!(
                "the JSON codec needs the descriptors of {path}: call through a client \
                 lodestar-build generated, or give the channel `with_descriptors`"
            )));
        };
        let key = set.as_ptr() as usize;
        let cached = self
            .descriptors
            .get_or_init(|| (key, Descriptors::of_static(set)));
        let loaded;
        let descriptors = if cached.0 == key {
            &cached.1
        } else {
            // Another generated client on the same channel: rare, and cached globally.
            loaded = Descriptors::of_static(set);
            &loaded
        };
        let descriptors = descriptors.as_ref().map_err(|e| {
            Status::internal(format!(
                "the JSON codec cannot use this client's descriptors: {e}"
            ))
        })?;
        descriptors.method(path).ok_or_else(|| {
            Status::internal(format!("the client's descriptors do not declare {path}"))
        })
    }
}

impl<S> Call<Request<Body>> for Codec<S>
where
    S: Call<Request<RequestBody>, Response = Response<Observed>>,
{
    type Response = Response<ResponseBody>;

    fn call(
        &self,
        mut request: Request<Body>,
    ) -> impl Future<Output = Result<Self::Response, Status>> + Send {
        let params = &self.params;
        let plan = match Plan::new(params, &mut request, |r| self.json_method(r)) {
            Ok(plan) => plan,
            Err(status) => return Either::Right(std::future::ready(Err(status))),
        };
        let deadline = request.extensions().get::<Deadline>().copied();
        let received = params.inspect_compression.then(ReceivedFlags::default);
        let request_error = RequestError::default();
        let count_sent = request
            .extensions_mut()
            .remove::<super::metered::CountSent>();
        let request = request.map(|body| {
            let mut body = RequestBody::new(
                body,
                params.limits.max_encoding_message_size,
                plan.request,
                request_error.clone(),
            );
            if let Some(super::metered::CountSent(series)) = count_sent {
                body.messages()
                    .count_in(series, crate::metrics::rpc::Way::Sent);
            }
            body
        });
        Either::Left(ResponseFuture {
            inner: self.inner.call(request),
            receiving: Some(Receiving {
                deadline,
                limit: params.limits.max_decoding_message_size,
                transcode: plan.response,
                json: plan.json,
                received,
                request_error,
            }),
        })
    }
}

pin_project_lite::pin_project! {
    /// The response of a call, its body wrapped as [`Receiving`] says.
    pub(crate) struct ResponseFuture<F> {
        #[pin]
        inner: F,
        // Taken when the response comes.
        receiving: Option<Receiving>,
    }
}

/// How a call's response body is received.
struct Receiving {
    /// The call's deadline, at which an open body fails.
    deadline: Option<Deadline>,
    /// The receive limit.
    limit: usize,
    /// The transcoding of a JSON answer back to protobuf, if the call is JSON.
    transcode: Option<Transcode>,
    /// Whether the call is JSON, and its answer is given to the generated
    /// client as protobuf.
    json: bool,
    /// Where the compressed flag of each message received is recorded, if anywhere.
    received: Option<ReceivedFlags>,
    /// The request body's own failure, if any, which is the call's error.
    request_error: RequestError,
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Observed>, Status>>,
{
    type Output = Result<Response<ResponseBody>, Status>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = std::task::ready!(this.inner.poll(cx))?;
        match this.receiving.take() {
            Some(receiving) => Poll::Ready(Ok(receiving.wrap(response))),
            None => Poll::Ready(Err(Status::internal(
                "a call's response was polled after it came",
            ))),
        }
    }
}

impl Receiving {
    fn wrap(self, mut response: Response<Observed>) -> Response<ResponseBody> {
        let limit = self.limit;
        let gzip = crate::headers::find_header(response.headers(), &GRPC_ENCODING)
            .is_some_and(|e| e.as_bytes() == b"gzip");
        let decompress = Decompress { limit, gzip };
        // A JSON answer is transcoded back to protobuf for the generated
        // client; compressed messages are decompressed here, so the client
        // need not accept any encoding itself.
        let inbound = match self
            .transcode
            .filter(|_| codec::is_json(response.headers()))
        {
            Some(transcode) => Some(Reframer::transcoding(transcode, decompress)),
            None if gzip => Some(Reframer::decompressing(decompress)),
            None => None,
        };
        if gzip {
            response.headers_mut().remove(GRPC_ENCODING);
        }
        let mut response = response.map(|body| {
            CallBody::new(body, self.deadline, Some(limit))
                .with_request_error(self.request_error)
                .with_received_flags(self.received.clone())
                .with_reframer(inbound)
        });
        if self.json {
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
        }
        if let Some(received) = self.received {
            response.extensions_mut().insert(received);
        }
        response
    }
}

/// How one call's messages are rewritten.
#[derive(Default)]
struct Plan {
    /// Compression and transcoding of the request's messages, if any.
    request: Option<Reframer>,
    /// Transcoding of the response's messages (JSON to protobuf).
    response: Option<Transcode>,
    json: bool,
}

impl Plan {
    /// Decides how the call's messages are encoded and compressed, and sets
    /// `grpc-encoding` and `content-type` accordingly; says in
    /// `grpc-accept-encoding` what the response may be compressed with.
    fn new(
        params: &Params,
        request: &mut Request<Body>,
        json_method: impl FnOnce(&Request<Body>) -> Result<MethodDescriptor, Status>,
    ) -> Result<Self, Status> {
        request.headers_mut().insert(GRPC_ACCEPT_ENCODING, ACCEPTED);
        let mut plan = Plan::default();
        let mut transcode = None;
        if params.codec == Encoding::Json {
            let method = json_method(request)?;
            transcode = Some(Transcode::ProtoToJson(method.input()));
            plan.response = Some(Transcode::JsonToProto {
                descriptor: method.output(),
                peer_is_at_fault: false,
            });
            plan.json = true;
            request.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static(codec::CONTENT_TYPE),
            );
        }
        let mut reframer = None;
        if let Some(encoding) = params.send_compressed {
            let default = request.extensions().get::<Compress>().is_none_or(|c| c.0);
            let per_message = request.extensions().get::<PerMessage>().cloned();
            if default || per_message.is_some() {
                request
                    .headers_mut()
                    .insert(GRPC_ENCODING, encoding.header_value());
                reframer = Some(Reframer::compressing(encoding, default, per_message));
            }
        }
        if transcode.is_some() {
            plan.request = Some(reframer.unwrap_or_default().with_transcode(transcode));
        } else {
            plan.request = reframer;
        }
        Ok(plan)
    }
}

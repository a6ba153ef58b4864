//! The codec layer: JSON transcoding and response compression.
//!
//! A JSON call (`application/grpc+json`) is transcoded to protobuf on the
//! way in (decompressing its messages first) and its response back to JSON
//! on the way out, with the descriptors of the services. Responses are
//! compressed when the server sends compressed, the client accepts the
//! encoding, and the handler did not opt out. The routes' future applies
//! the response's part ([`Reply`]).

use std::task::{Context, Poll};

use http::{HeaderValue, Request, Response};
use tonic::codec::SingleMessageCompressionOverride;
use tower::{Layer, Service};

use super::ResponseBody;
use super::request::RequestBody;
use crate::codec::{self as json, Descriptors, Transcode};
use crate::compression::{Compress, Encoding, PerMessage, ReceivedFlags};
use crate::frames::{Decompress, Reframer};

/// Transcodes JSON calls and compresses responses.
#[derive(Debug, Clone)]
pub(crate) struct CodecLayer {
    /// Compress responses with this, for clients that accept it.
    pub(crate) send_compressed: Option<Encoding>,
    /// Record each request message's compressed flag (`ReceivedFlags`).
    pub(crate) inspect_compression: bool,
    /// The methods JSON calls can be transcoded for.
    pub(crate) descriptors: Descriptors,
    /// The largest request message a JSON call may decompress to.
    pub(crate) max_decoding_message_size: usize,
}

impl<S> Layer<S> for CodecLayer {
    type Service = CodecService<S>;

    fn layer(&self, inner: S) -> CodecService<S> {
        CodecService {
            inner,
            settings: self.clone(),
        }
    }
}

/// See [`CodecLayer`].
#[derive(Debug, Clone)]
pub(crate) struct CodecService<S> {
    inner: S,
    settings: CodecLayer,
}

impl<S> Service<Request<RequestBody>> for CodecService<S>
where
    S: Service<Request<RequestBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<RequestBody>) -> S::Future {
        let settings = &self.settings;
        // Compress only for a client that accepts the encoding.
        let encoding = settings
            .send_compressed
            .filter(|e| e.accepted_by(request.headers().get("grpc-accept-encoding")));
        if settings.inspect_compression {
            let received = ReceivedFlags::default();
            request.extensions_mut().insert(received.clone());
            request
                .body_mut()
                .messages()
                .set_received_flags(Some(received));
        }
        if !request.body().json {
            request.body_mut().plan.codec = Reply {
                encoding,
                outbound: None,
            };
            return self.inner.call(request);
        }
        let (method, gzip) = match json_method(&settings.descriptors, &request) {
            Ok(method) => method,
            Err(status) => {
                // A refusal from above (a malformed deadline) comes first.
                request.body_mut().plan.refusal.get_or_insert(status);
                return self.inner.call(request);
            }
        };
        let headers = request.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.remove("grpc-encoding"); // decompressed here, before transcoding
        let inbound = Reframer::transcoding(
            Transcode::JsonToProto {
                descriptor: method.input(),
                peer_is_at_fault: true,
            },
            Decompress {
                limit: settings.max_decoding_message_size,
                gzip,
            },
        );
        let body = request.body_mut();
        body.messages().set_reframer(Some(inbound));
        body.plan.codec = Reply {
            encoding,
            outbound: Some(Box::new(Transcode::ProtoToJson(method.output()))),
        };
        self.inner.call(request)
    }
}

/// What the codec does to a call's response: compress it (with this
/// encoding, unless the handler opts out), and transcode it back to JSON.
#[derive(Debug, Default)]
pub(crate) struct Reply {
    encoding: Option<Encoding>,
    outbound: Option<Box<Transcode>>,
}

impl Reply {
    /// Applies this to `response`, as the handler answered it.
    pub(super) fn apply(self, response: &mut Response<ResponseBody>) {
        let mut reframer = compress_response(self.encoding, response);
        if let Some(transcode) = self.outbound {
            reframer = Some(
                reframer
                    .unwrap_or_default()
                    .with_transcode(Some(*transcode)),
            );
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static(json::CONTENT_TYPE),
            );
        }
        if reframer.is_some() {
            response.body_mut().set_reframer(reframer);
        }
    }
}

/// Compresses a response if the server sends compressed, the client
/// accepts the encoding, and the handler did not opt out.
fn compress_response<B>(
    encoding: Option<Encoding>,
    response: &mut Response<B>,
) -> Option<Reframer> {
    let encoding = encoding?;
    let extensions = response.extensions();
    let disabled = extensions.get::<Compress>().is_some_and(|c| !c.0)
        || extensions.get::<SingleMessageCompressionOverride>()
            == Some(&SingleMessageCompressionOverride::Disable);
    let plan = extensions.get::<PerMessage>().cloned();
    if disabled && plan.is_none() {
        return None;
    }
    response
        .headers_mut()
        .insert("grpc-encoding", encoding.header_value());
    Some(Reframer::compressing(encoding, !disabled, plan))
}

/// The method of a JSON request, and whether its messages may be
/// gzip-compressed; or why it cannot be served as JSON.
fn json_method<B>(
    descriptors: &Descriptors,
    request: &Request<B>,
) -> Result<(prost_reflect::MethodDescriptor, bool), tonic::Status> {
    let path = request.uri().path();
    let method = descriptors.method(path).ok_or_else(|| {
        tonic::Status::unimplemented(format!(
            "JSON is not available for {path}: this server has no descriptors for it \
             (an unknown method, or a service added without them: see ServiceBuilder::reflect)"
        ))
    })?;
    let gzip = match request
        .headers()
        .get("grpc-encoding")
        .map(HeaderValue::as_bytes)
    {
        None | Some(b"identity") => false,
        Some(b"gzip") => true,
        Some(other) => {
            let mut status = tonic::Status::unimplemented(format!(
                "this server cannot decompress `{}` (it accepts gzip)",
                String::from_utf8_lossy(other)
            ));
            status.metadata_mut().insert(
                "grpc-accept-encoding",
                tonic::metadata::MetadataValue::from_static("gzip,identity"),
            );
            return Err(status);
        }
    };
    Ok((method, gzip))
}

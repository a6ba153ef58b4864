//! The gRPC interoperability tests on lodestar: the `grpc.testing.TestService`
//! server behaviour and the client test cases, as the public interop test
//! descriptions specify them, built on lodestar's `Service` and `Client`.
//!
//! The binaries `lodestar-interop-server` and `lodestar-interop-client`
//! wrap this library with the conventional flags.

use std::pin::Pin;
use std::time::Duration;

use lodestar::compression::{Compress, PerMessage, ReceivedFlags};
use lodestar::metadata::{MetadataMap, MetadataValue};
use lodestar::{Client, Code, Request, Response, Status, Streaming, Trailers};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};

/// Generated code for the `grpc.testing` package.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod pb {
    lodestar::include_proto!("grpc.testing");
}

use pb::test_service_client::TestServiceClient;
pub use pb::test_service_server::{TestService, TestServiceServer};
use pb::unimplemented_service_client::UnimplementedServiceClient;
use pb::{
    BoolValue, EchoStatus, Empty, Payload, ResponseParameters, SimpleRequest, SimpleResponse,
    StreamingInputCallRequest, StreamingInputCallResponse, StreamingOutputCallRequest,
    StreamingOutputCallResponse,
};

/// The service name the interop server registers under and the client calls.
pub const SERVICE_NAME: &str = "interop";

/// Every client test case, in the order `all` runs them.
pub const CASES: &[&str] = &[
    "empty_unary",
    "large_unary",
    "client_compressed_unary",
    "server_compressed_unary",
    "client_streaming",
    "client_compressed_streaming",
    "server_streaming",
    "server_compressed_streaming",
    "ping_pong",
    "empty_stream",
    "timeout_on_sleeping_server",
    "cancel_after_begin",
    "cancel_after_first_response",
    "custom_metadata",
    "status_code_and_message",
    "special_status_message",
    "unimplemented_method",
    "unimplemented_service",
];

const ECHO_INITIAL: &str = "x-grpc-test-echo-initial";
const ECHO_TRAILING: &str = "x-grpc-test-echo-trailing-bin";

fn zeros(size: i32) -> Option<Payload> {
    Some(Payload {
        r#type: 0,
        body: vec![0; usize::try_from(size).unwrap_or(0)],
    })
}

/// The largest response payload the server makes, in bytes: the default
/// send limit (4 MiB), since a larger message could not be sent anyway.
pub const MAX_RESPONSE_SIZE: usize = 4 * 1024 * 1024;

/// The payload a request asks the server to answer with; a negative size,
/// or one over [`MAX_RESPONSE_SIZE`], is refused before anything is allocated.
fn response_payload(size: i32) -> Result<Option<Payload>, Status> {
    match usize::try_from(size) {
        Err(_) => Err(Status::invalid_argument(format!(
            "response size {size} is negative"
        ))),
        Ok(len) if len > MAX_RESPONSE_SIZE => Err(Status::resource_exhausted(format!(
            "response size {len} is over this server's limit of {MAX_RESPONSE_SIZE} bytes"
        ))),
        Ok(_) => Ok(zeros(size)),
    }
}

fn yes(value: bool) -> Option<BoolValue> {
    Some(BoolValue { value })
}

// ----------------------------------------------------------------- server --

/// The interop server behaviour. Serve it with
/// `send_compressed(Encoding::Gzip)` and `inspect_compression(true)` so that
/// the compression cases can be checked.
#[derive(Debug, Default, Clone, Copy)]
pub struct InteropServer;

/// Fails with INVALID_ARGUMENT if a message expected to arrive compressed did not.
fn check_compressed(
    expect: Option<BoolValue>,
    flags: Option<&ReceivedFlags>,
) -> Result<(), Status> {
    let was = flags.and_then(ReceivedFlags::next);
    if expect.is_some_and(|e| e.value) && was != Some(true) {
        return Err(Status::invalid_argument(
            "expected a compressed request message",
        ));
    }
    if expect.is_some_and(|e| !e.value) && was == Some(true) {
        return Err(Status::invalid_argument(
            "expected an uncompressed request message",
        ));
    }
    Ok(())
}

fn echo_status(status: Option<&EchoStatus>) -> Option<Status> {
    status
        .filter(|s| s.code != 0)
        .map(|s| Status::new(Code::from_i32(s.code), s.message.clone()))
}

/// Echo Metadata: the initial key back as initial metadata, the trailing
/// key back as trailing metadata.
fn echo_metadata<T>(request: &MetadataMap, response: &mut Response<T>) {
    if let Some(value) = request.get(ECHO_INITIAL) {
        response.metadata_mut().insert(ECHO_INITIAL, value.clone());
    }
    if let Some(value) = request.get_bin(ECHO_TRAILING) {
        let mut trailers = MetadataMap::new();
        trailers.insert_bin(ECHO_TRAILING, value.clone());
        response.extensions_mut().insert(Trailers(trailers));
    }
}

type ResponseStream =
    Pin<Box<dyn Stream<Item = Result<StreamingOutputCallResponse, Status>> + Send>>;

/// Sends the responses `parameters` ask for, honouring `interval_us` and
/// per-message compression; false when the client went away or a size
/// was refused (the stream then ends with why).
async fn respond(
    tx: &mpsc::Sender<Result<StreamingOutputCallResponse, Status>>,
    plan: &PerMessage,
    parameters: &[ResponseParameters],
) -> bool {
    for p in parameters {
        if p.interval_us > 0 {
            tokio::time::sleep(Duration::from_micros(
                u64::try_from(p.interval_us).unwrap_or(0),
            ))
            .await;
        }
        let payload = match response_payload(p.size) {
            Ok(payload) => payload,
            Err(status) => {
                let _ = tx.send(Err(status)).await;
                return false;
            }
        };
        plan.push(p.compressed.is_some_and(|c| c.value));
        if tx
            .send(Ok(StreamingOutputCallResponse { payload }))
            .await
            .is_err()
        {
            return false;
        }
    }
    true
}

fn streaming_response(
    rx: mpsc::Receiver<Result<StreamingOutputCallResponse, Status>>,
    plan: PerMessage,
    metadata: &MetadataMap,
) -> Response<ResponseStream> {
    let mut response = Response::new(Box::pin(ReceiverStream::new(rx)) as ResponseStream);
    // Compress only the messages the client asks to have compressed.
    response.extensions_mut().insert(Compress(false));
    response.extensions_mut().insert(plan);
    echo_metadata(metadata, &mut response);
    response
}

#[lodestar::async_trait]
impl TestService for InteropServer {
    async fn empty_call(&self, _request: Request<Empty>) -> Result<Response<Empty>, Status> {
        Ok(Response::new(Empty {}))
    }

    async fn unary_call(
        &self,
        request: Request<SimpleRequest>,
    ) -> Result<Response<SimpleResponse>, Status> {
        let flags = ReceivedFlags::of(&request);
        let metadata = request.metadata().clone();
        let request = request.into_inner();
        check_compressed(request.expect_compressed, flags.as_ref())?;
        if let Some(status) = echo_status(request.response_status.as_ref()) {
            return Err(status);
        }
        let mut response = Response::new(SimpleResponse {
            payload: response_payload(request.response_size)?,
            ..SimpleResponse::default()
        });
        response.extensions_mut().insert(Compress(
            request.response_compressed.is_some_and(|c| c.value),
        ));
        echo_metadata(&metadata, &mut response);
        Ok(response)
    }

    async fn cacheable_unary_call(
        &self,
        request: Request<SimpleRequest>,
    ) -> Result<Response<SimpleResponse>, Status> {
        self.unary_call(request).await
    }

    type StreamingOutputCallStream = ResponseStream;

    async fn streaming_output_call(
        &self,
        request: Request<StreamingOutputCallRequest>,
    ) -> Result<Response<Self::StreamingOutputCallStream>, Status> {
        let metadata = request.metadata().clone();
        let request = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let plan = PerMessage::new();
        let sender_plan = plan.clone();
        tokio::spawn(async move {
            if respond(&tx, &sender_plan, &request.response_parameters).await
                && let Some(status) = echo_status(request.response_status.as_ref())
            {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(streaming_response(rx, plan, &metadata))
    }

    async fn streaming_input_call(
        &self,
        request: Request<Streaming<StreamingInputCallRequest>>,
    ) -> Result<Response<StreamingInputCallResponse>, Status> {
        let flags = ReceivedFlags::of(&request);
        let mut stream = request.into_inner();
        let mut total = 0usize;
        while let Some(message) = stream.next().await {
            let message = message?;
            check_compressed(message.expect_compressed, flags.as_ref())?;
            total += message.payload.map_or(0, |p| p.body.len());
        }
        Ok(Response::new(StreamingInputCallResponse {
            aggregated_payload_size: i32::try_from(total).unwrap_or(i32::MAX),
        }))
    }

    type FullDuplexCallStream = ResponseStream;

    async fn full_duplex_call(
        &self,
        request: Request<Streaming<StreamingOutputCallRequest>>,
    ) -> Result<Response<Self::FullDuplexCallStream>, Status> {
        let metadata = request.metadata().clone();
        let mut requests = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let plan = PerMessage::new();
        let sender_plan = plan.clone();
        tokio::spawn(async move {
            while let Some(request) = requests.next().await {
                let request = match request {
                    Ok(request) => request,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                if let Some(status) = echo_status(request.response_status.as_ref()) {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
                if !respond(&tx, &sender_plan, &request.response_parameters).await {
                    return;
                }
            }
        });
        Ok(streaming_response(rx, plan, &metadata))
    }

    type HalfDuplexCallStream = ResponseStream;

    async fn half_duplex_call(
        &self,
        request: Request<Streaming<StreamingOutputCallRequest>>,
    ) -> Result<Response<Self::HalfDuplexCallStream>, Status> {
        let metadata = request.metadata().clone();
        let mut requests = request.into_inner();
        let mut all = Vec::new();
        while let Some(request) = requests.next().await {
            all.push(request?);
        }
        let (tx, rx) = mpsc::channel(4);
        let plan = PerMessage::new();
        let sender_plan = plan.clone();
        tokio::spawn(async move {
            for request in all {
                if !respond(&tx, &sender_plan, &request.response_parameters).await {
                    return;
                }
            }
        });
        Ok(streaming_response(rx, plan, &metadata))
    }

    async fn unimplemented_call(
        &self,
        _request: Request<Empty>,
    ) -> Result<Response<Empty>, Status> {
        Err(Status::unimplemented(
            "UnimplementedCall is not implemented, on purpose",
        ))
    }
}

// ----------------------------------------------------------------- client --

/// A request stream that never yields, and says when it is first polled
/// (which happens once the call's headers went out).
struct SignalOnPoll(Option<tokio::sync::oneshot::Sender<()>>);

impl Stream for SignalOnPoll {
    type Item = StreamingInputCallRequest;

    fn poll_next(
        mut self: Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        if let Some(started) = self.0.take() {
            let _ = started.send(());
        }
        std::task::Poll::Pending
    }
}

/// Runs the client test cases against a server reachable through `client`
/// as [`SERVICE_NAME`]. `client` should have `inspect_compression` on;
/// `compressing` is the same client set to send gzip.
#[derive(Debug, Clone)]
pub struct InteropClient {
    plain: Client,
    compressing: Client,
}

type Outcome = Result<(), String>;

fn ensure(condition: bool, message: impl FnOnce() -> String) -> Outcome {
    if condition { Ok(()) } else { Err(message()) }
}

fn payload_len(payload: &Option<Payload>) -> usize {
    payload.as_ref().map_or(0, |p| p.body.len())
}

/// Checks that a response's payload has the size the case asked for.
fn expect_len(payload: &Option<Payload>, expected: usize) -> Outcome {
    let len = payload_len(payload);
    ensure(len == expected, || {
        format!("response payload is {len} bytes, expected {expected}")
    })
}

fn was_compressed<T>(response: &Response<T>) -> Option<bool> {
    response
        .extensions()
        .get::<ReceivedFlags>()
        .and_then(ReceivedFlags::next)
}

impl InteropClient {
    /// Cases run over `plain`, and the client-compression cases over `compressing`.
    pub fn new(plain: Client, compressing: Client) -> Self {
        Self { plain, compressing }
    }

    fn test(&self) -> TestServiceClient<lodestar::client::Channel> {
        TestServiceClient::by_name(&self.plain, SERVICE_NAME)
    }

    /// Runs one case by its interop name.
    pub async fn run(&self, case: &str) -> Outcome {
        match case {
            "empty_unary" => self.empty_unary().await,
            "large_unary" => self.large_unary().await,
            "client_compressed_unary" => self.client_compressed_unary().await,
            "server_compressed_unary" => self.server_compressed_unary().await,
            "client_streaming" => self.client_streaming().await,
            "client_compressed_streaming" => self.client_compressed_streaming().await,
            "server_streaming" => self.server_streaming(false).await,
            "server_compressed_streaming" => self.server_streaming(true).await,
            "ping_pong" => self.ping_pong().await,
            "empty_stream" => self.empty_stream().await,
            "timeout_on_sleeping_server" => self.timeout_on_sleeping_server().await,
            "cancel_after_begin" => self.cancel_after_begin().await,
            "cancel_after_first_response" => self.cancel_after_first_response().await,
            "custom_metadata" => self.custom_metadata().await,
            "status_code_and_message" => self.status_code_and_message("test status message").await,
            "special_status_message" => {
                self.status_code_and_message(
                    "\t\ntest with whitespace\r\nand Unicode BMP ☺ and non-BMP 😈\t\n",
                )
                .await
            }
            "unimplemented_method" => self.unimplemented_method().await,
            "unimplemented_service" => self.unimplemented_service().await,
            other => Err(format!(
                "unknown test case `{other}`; known: {}",
                CASES.join(", ")
            )),
        }
    }

    async fn empty_unary(&self) -> Outcome {
        let response = self
            .test()
            .empty_call(Empty {})
            .await
            .map_err(|s| s.to_string())?;
        ensure(response.into_inner() == Empty {}, || {
            "the response was not empty".into()
        })
    }

    fn large_request() -> SimpleRequest {
        SimpleRequest {
            response_size: 314_159,
            payload: zeros(271_828),
            ..SimpleRequest::default()
        }
    }

    async fn large_unary(&self) -> Outcome {
        let response = self
            .test()
            .unary_call(Self::large_request())
            .await
            .map_err(|s| s.to_string())?;
        expect_len(&response.get_ref().payload, 314_159)
    }

    async fn client_compressed_unary(&self) -> Outcome {
        let mut client = TestServiceClient::by_name(&self.compressing, SERVICE_NAME);
        let request = |expect: bool, compress: bool| {
            let mut request = Request::new(SimpleRequest {
                expect_compressed: yes(expect),
                ..Self::large_request()
            });
            request.extensions_mut().insert(Compress(compress));
            request
        };
        // The probe: an uncompressed message that claims to be compressed.
        let probe = client.unary_call(request(true, false)).await;
        ensure(
            matches!(&probe, Err(s) if s.code() == Code::InvalidArgument),
            || format!("the probe should fail with INVALID_ARGUMENT, got {probe:?}"),
        )?;
        for (expect, compress) in [(true, true), (false, false)] {
            let response = client
                .unary_call(request(expect, compress))
                .await
                .map_err(|s| s.to_string())?;
            expect_len(&response.get_ref().payload, 314_159)?;
        }
        Ok(())
    }

    async fn server_compressed_unary(&self) -> Outcome {
        for compressed in [true, false] {
            let request = SimpleRequest {
                response_compressed: yes(compressed),
                ..Self::large_request()
            };
            let response = self
                .test()
                .unary_call(request)
                .await
                .map_err(|s| s.to_string())?;
            let flag = was_compressed(&response);
            ensure(flag == Some(compressed), || {
                format!("asked for compressed={compressed}, the response's flag said {flag:?}")
            })?;
            expect_len(&response.get_ref().payload, 314_159)?;
        }
        Ok(())
    }

    async fn client_streaming(&self) -> Outcome {
        let messages = [27_182, 8, 1_828, 45_904].map(|size| StreamingInputCallRequest {
            payload: zeros(size),
            expect_compressed: None,
        });
        let response = self
            .test()
            .streaming_input_call(tokio_stream::iter(messages))
            .await
            .map_err(|s| s.to_string())?;
        let total = response.get_ref().aggregated_payload_size;
        ensure(total == 74_922, || {
            format!("aggregated_payload_size is {total}, expected 74922")
        })
    }

    async fn client_compressed_streaming(&self) -> Outcome {
        let mut client = TestServiceClient::by_name(&self.compressing, SERVICE_NAME);
        let message = |expect, size| StreamingInputCallRequest {
            payload: zeros(size),
            expect_compressed: yes(expect),
        };
        let mut probe = Request::new(tokio_stream::iter([message(true, 27_182)]));
        probe.extensions_mut().insert(Compress(false));
        let result = client.streaming_input_call(probe).await;
        ensure(
            matches!(&result, Err(s) if s.code() == Code::InvalidArgument),
            || format!("the probe should fail with INVALID_ARGUMENT, got {result:?}"),
        )?;
        let plan = PerMessage::new();
        plan.push(true);
        plan.push(false);
        let mut request = Request::new(tokio_stream::iter([
            message(true, 27_182),
            message(false, 45_904),
        ]));
        request.extensions_mut().insert(plan);
        let response = client
            .streaming_input_call(request)
            .await
            .map_err(|s| s.to_string())?;
        let total = response.get_ref().aggregated_payload_size;
        ensure(total == 73_086, || {
            format!("aggregated_payload_size is {total}, expected 73086")
        })
    }

    async fn server_streaming(&self, compression: bool) -> Outcome {
        let sizes: &[(i32, bool)] = if compression {
            &[(31_415, true), (92_653, false)]
        } else {
            &[(31_415, false), (9, false), (2_653, false), (58_979, false)]
        };
        let request = StreamingOutputCallRequest {
            response_parameters: sizes
                .iter()
                .map(|&(size, compressed)| ResponseParameters {
                    size,
                    interval_us: 0,
                    compressed: compression.then_some(BoolValue { value: compressed }),
                })
                .collect(),
            ..StreamingOutputCallRequest::default()
        };
        let response = self
            .test()
            .streaming_output_call(request)
            .await
            .map_err(|s| s.to_string())?;
        let flags = response.extensions().get::<ReceivedFlags>().cloned();
        let mut stream = response.into_inner();
        let mut received = Vec::new();
        while let Some(message) = stream.next().await {
            let message = message.map_err(|s| s.to_string())?;
            let flag = flags.as_ref().and_then(ReceivedFlags::next);
            received.push((payload_len(&message.payload) as i32, flag == Some(true)));
        }
        let expected: Vec<(i32, bool)> = sizes.to_vec();
        ensure(received == expected, || {
            format!("received (size, compressed) {received:?}, expected {expected:?}")
        })
    }

    async fn ping_pong(&self) -> Outcome {
        let steps = [(27_182, 31_415), (8, 9), (1_828, 2_653), (45_904, 58_979)];
        let request = |(request_size, response_size): (i32, i32)| StreamingOutputCallRequest {
            response_parameters: vec![ResponseParameters {
                size: response_size,
                ..ResponseParameters::default()
            }],
            payload: zeros(request_size),
            ..StreamingOutputCallRequest::default()
        };
        let (tx, rx) = mpsc::channel(1);
        // The first request goes out with the call: many servers send their
        // response headers only with the first response, which needs a request.
        tx.send(request(steps[0]))
            .await
            .map_err(|_| "the request stream closed early".to_owned())?;
        let mut responses = self
            .test()
            .full_duplex_call(ReceiverStream::new(rx))
            .await
            .map_err(|s| s.to_string())?
            .into_inner();
        for (i, &(_, response_size)) in steps.iter().enumerate() {
            if i > 0 {
                tx.send(request(steps[i]))
                    .await
                    .map_err(|_| "the request stream closed early".to_owned())?;
            }
            let response = responses
                .next()
                .await
                .ok_or("the response stream ended early")?
                .map_err(|s| s.to_string())?;
            expect_len(&response.payload, response_size as usize)?;
        }
        drop(tx);
        let end = responses.next().await;
        ensure(end.is_none(), || {
            format!("expected the end of the stream, got {end:?}")
        })
    }

    async fn empty_stream(&self) -> Outcome {
        let requests = tokio_stream::empty::<StreamingOutputCallRequest>();
        let mut responses = self
            .test()
            .full_duplex_call(requests)
            .await
            .map_err(|s| s.to_string())?
            .into_inner();
        let first = responses.next().await;
        ensure(first.is_none(), || {
            format!("expected no responses, got {first:?}")
        })
    }

    async fn timeout_on_sleeping_server(&self) -> Outcome {
        let (tx, rx) = mpsc::channel(1);
        let mut request = Request::new(ReceiverStream::new(rx));
        request.set_timeout(Duration::from_millis(1));
        let _ = tx
            .send(StreamingOutputCallRequest {
                payload: zeros(27_182),
                ..StreamingOutputCallRequest::default()
            })
            .await;
        let status = match self.test().full_duplex_call(request).await {
            Err(status) => status,
            Ok(response) => {
                let mut responses = response.into_inner();
                match responses.next().await {
                    Some(Err(status)) => status,
                    other => return Err(format!("expected DEADLINE_EXCEEDED, got {other:?}")),
                }
            }
        };
        drop(tx);
        ensure(status.code() == Code::DeadlineExceeded, || {
            format!("expected DEADLINE_EXCEEDED, got {status:?}")
        })
    }

    async fn cancel_after_begin(&self) -> Outcome {
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let mut client = self.test();
        let call = tokio::spawn(async move {
            // The request's messages are asked for once its headers are sent.
            client
                .streaming_input_call(SignalOnPoll(Some(started_tx)))
                .await
        });
        tokio::select! {
            started = started_rx => {
                started.map_err(|_| "the call ended before it began".to_owned())?;
            }
            () = tokio::time::sleep(Duration::from_secs(10)) => {
                call.abort();
                return Err("the call did not begin within 10 s".into());
            }
        }
        // Cancelling a call is dropping it.
        call.abort();
        let outcome = call.await;
        ensure(matches!(&outcome, Err(e) if e.is_cancelled()), || {
            format!("expected the call to end CANCELLED, it ended with {outcome:?}")
        })
    }

    async fn cancel_after_first_response(&self) -> Outcome {
        let (tx, rx) = mpsc::channel(1);
        let mut client = self.test();
        let (first_tx, first_rx) = tokio::sync::oneshot::channel();
        let call = tokio::spawn(async move {
            let mut responses = client
                .full_duplex_call(ReceiverStream::new(rx))
                .await?
                .into_inner();
            let first = responses.next().await;
            let _ = first_tx.send(first.map(|r| r.map(|m| payload_len(&m.payload))));
            // Wait, as a stalled client would, until cancelled.
            std::future::pending::<()>().await;
            Ok::<(), Status>(())
        });
        let request = StreamingOutputCallRequest {
            response_parameters: vec![ResponseParameters {
                size: 31_415,
                ..ResponseParameters::default()
            }],
            payload: zeros(27_182),
            ..StreamingOutputCallRequest::default()
        };
        tx.send(request)
            .await
            .map_err(|_| "the request stream closed early".to_owned())?;
        let first = first_rx
            .await
            .map_err(|_| "the call ended before its first response".to_owned())?;
        ensure(matches!(first, Some(Ok(31_415))), || {
            format!("unexpected first response {first:?}")
        })?;
        call.abort();
        let outcome = call.await;
        ensure(matches!(&outcome, Err(e) if e.is_cancelled()), || {
            format!("expected the call to end CANCELLED, it ended with {outcome:?}")
        })
    }

    async fn custom_metadata(&self) -> Outcome {
        fn attach<T>(request: &mut Request<T>) {
            request.metadata_mut().insert(
                ECHO_INITIAL,
                MetadataValue::from_static("test_initial_metadata_value"),
            );
            request.metadata_mut().insert_bin(
                ECHO_TRAILING,
                MetadataValue::from_bytes(&[0xab, 0xab, 0xab]),
            );
        }
        fn check(initial: &MetadataMap, trailing: &MetadataMap, call: &str) -> Outcome {
            let value = initial.get(ECHO_INITIAL).and_then(|v| v.to_str().ok());
            ensure(value == Some("test_initial_metadata_value"), || {
                format!("{call}: initial metadata {value:?}")
            })?;
            let bin = trailing
                .get_bin(ECHO_TRAILING)
                .and_then(|v| v.to_bytes().ok());
            ensure(bin.as_deref() == Some(&[0xab, 0xab, 0xab][..]), || {
                format!("{call}: trailing metadata {bin:?}")
            })
        }
        // tonic's unary API merges trailers into the headers; the
        // server-streaming API on the same method keeps them apart.
        let mut request = Request::new(Self::large_request());
        attach(&mut request);
        let mut grpc =
            lodestar::codegen::tonic::client::Grpc::new(self.plain.channel(SERVICE_NAME));
        grpc.ready().await.map_err(|e| e.to_string())?;
        let path = lodestar::codegen::tonic::codegen::http::uri::PathAndQuery::from_static(
            "/grpc.testing.TestService/UnaryCall",
        );
        let codec =
            lodestar::codegen::tonic_prost::ProstCodec::<SimpleRequest, SimpleResponse>::default();
        let response = grpc
            .server_streaming(request, path, codec)
            .await
            .map_err(|s| s.to_string())?;
        let initial = response.metadata().clone();
        let mut stream = response.into_inner();
        let message = stream
            .message()
            .await
            .map_err(|s| s.to_string())?
            .ok_or("UnaryCall: no response message")?;
        expect_len(&message.payload, 314_159)?;
        let trailing = stream
            .trailers()
            .await
            .map_err(|s| s.to_string())?
            .unwrap_or_default();
        check(&initial, &trailing, "UnaryCall")?;

        let message = StreamingOutputCallRequest {
            response_parameters: vec![ResponseParameters {
                size: 314_159,
                ..ResponseParameters::default()
            }],
            payload: zeros(271_828),
            ..StreamingOutputCallRequest::default()
        };
        let mut request = Request::new(tokio_stream::iter([message]));
        attach(&mut request);
        let response = self
            .test()
            .full_duplex_call(request)
            .await
            .map_err(|s| s.to_string())?;
        let initial = response.metadata().clone();
        let mut stream = response.into_inner();
        while let Some(message) = stream.message().await.map_err(|s| s.to_string())? {
            let len = payload_len(&message.payload);
            ensure(len == 314_159, || {
                format!("FullDuplexCall: response is {len} bytes")
            })?;
        }
        let trailing = stream
            .trailers()
            .await
            .map_err(|s| s.to_string())?
            .unwrap_or_default();
        check(&initial, &trailing, "FullDuplexCall")
    }

    async fn status_code_and_message(&self, message: &str) -> Outcome {
        let echo = EchoStatus {
            code: 2,
            message: message.to_owned(),
        };
        let request = SimpleRequest {
            response_status: Some(echo.clone()),
            ..SimpleRequest::default()
        };
        let status = self
            .test()
            .unary_call(request)
            .await
            .err()
            .ok_or("UnaryCall succeeded")?;
        ensure(
            status.code() == Code::Unknown && status.message() == message,
            || format!("UnaryCall: got {:?} {:?}", status.code(), status.message()),
        )?;
        let request = StreamingOutputCallRequest {
            response_status: Some(echo),
            ..StreamingOutputCallRequest::default()
        };
        let status = match self
            .test()
            .full_duplex_call(tokio_stream::iter([request]))
            .await
        {
            Err(status) => status,
            Ok(response) => response
                .into_inner()
                .next()
                .await
                .and_then(Result::err)
                .ok_or("FullDuplexCall ended without the status")?,
        };
        ensure(
            status.code() == Code::Unknown && status.message() == message,
            || {
                format!(
                    "FullDuplexCall: got {:?} {:?}",
                    status.code(),
                    status.message()
                )
            },
        )
    }

    async fn unimplemented_method(&self) -> Outcome {
        let status = self
            .test()
            .unimplemented_call(Empty {})
            .await
            .err()
            .ok_or("the call succeeded")?;
        ensure(status.code() == Code::Unimplemented, || {
            format!("expected UNIMPLEMENTED, got {status:?}")
        })
    }

    async fn unimplemented_service(&self) -> Outcome {
        let mut client = UnimplementedServiceClient::by_name(&self.plain, SERVICE_NAME);
        let status = client
            .unimplemented_call(Empty {})
            .await
            .err()
            .ok_or("the call succeeded")?;
        ensure(status.code() == Code::Unimplemented, || {
            format!("expected UNIMPLEMENTED, got {status:?}")
        })
    }
}

//! `lodestar call TARGET METHOD [-d JSON | -d @file | -d @-]`.
//!
//! Every call kind goes out as one gRPC stream (the wire is the same for
//! all four): a unary or server-streaming call sends its one message and
//! closes; a client-streaming or bidi call sends each value as soon as it
//! is read, and closes at the end of the input. Replies are printed as
//! they arrive, whatever the kind.

use std::process::ExitCode;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use http::uri::PathAndQuery;
use lodestar::MessageLimits;
use lodestar::registry::limits::printable;
use prost_reflect::{DescriptorPool, DynamicMessage, MethodDescriptor};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{
    AsciiMetadataKey, AsciiMetadataValue, BinaryMetadataKey, BinaryMetadataValue, KeyAndValueRef,
    MetadataMap,
};

use super::codec::DynamicCodec;
use super::json_io::{Input, OutputFormat, Printer, ToMessage, Values};
use super::reflection::Reflection;
use super::status::exit_code_table;
use super::target::TargetArgs;
use super::{Failure, FailureKind, method, status};
use crate::args::Span;

/// The default of `--max-message-size`: gRPC's usual 4 MiB.
const DEFAULT_MAX_MESSAGE: usize = 4 * 1024 * 1024;

/// Each reflection round may take this long beyond --connect-timeout.
const REFLECTION_SLACK: Duration = Duration::from_secs(20);

/// How long an error's unknown detail types may be looked up for.
const DETAILS_LOOKUP: Duration = Duration::from_secs(2);

/// Options of `lodestar call`.
#[derive(clap::Args, Debug)]
#[command(after_help = concat!(
    "Examples:\n",
    "  lodestar call route-guide GetFeature -d '{\"latitude\":409146138,\"longitude\":-746188906}'\n",
    "  lodestar call 127.0.0.1:10000 routeguide.RouteGuide/ListFeatures -d @rect.json\n",
    "  printf '{\"latitude\":1}\\n{\"latitude\":2}\\n' | lodestar call route-guide RecordRoute -d @-\n",
    "  lodestar call https://api.example.com:443 Greeter/SayHello -H 'authorization: Bearer …' --timeout 5s\n",
    "\n",
    "Without -d, a unary or server-streaming call sends one empty message ({}),\n",
    "and a client-streaming or bidi call sends none.\n",
    "Errors are one JSON object on stderr: {\"code\":\"not_found\",\"message\":…,\"details\":[…]}\n",
    "for a status from the server, {\"error\":\"input\",\"message\":…} for a failure on this side.\n",
    "\n",
    exit_code_table!()
))]
pub(crate) struct CallArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// The method: pkg.Service/Method, pkg.Service.Method, Service/Method,
    /// or Method alone when one service has it.
    method: String,
    /// Request messages: JSON values separated by whitespace, inline, from
    /// @FILE, or from stdin (@-), read and sent as they arrive.
    #[arg(short = 'd', long = "data", value_name = "JSON|@FILE|@-")]
    data: Option<String>,
    /// Request metadata, `KEY: VALUE` or `KEY:VALUE` (repeatable); the
    /// value of a key ending in -bin is base64.
    #[arg(short = 'H', long = "header", value_name = "KEY: VALUE", value_parser = parse_header)]
    headers: Vec<Header>,
    /// Deadline of the call (sent as grpc-timeout), e.g. 500ms, 5s, 1m.
    /// Default: none.
    #[arg(long, value_name = "DURATION")]
    timeout: Option<Span>,
    /// How replies are printed. Default: pretty on a terminal, jsonl otherwise.
    #[arg(long, value_enum)]
    output: Option<OutputFormat>,
    /// Print fields at their default values (0, "", false, empty) too.
    #[arg(long)]
    emit_defaults: bool,
    /// Ignore input fields the request type does not have (default: refuse them).
    #[arg(long)]
    allow_unknown_fields: bool,
    /// Largest message sent or received, and largest JSON value read, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_MESSAGE)]
    max_message_size: usize,
    /// Print the response headers and trailers on stderr.
    #[arg(short = 'v', long)]
    verbose: bool,
    /// The wire protocol of the call: grpc, grpc-web (binary),
    /// grpc-web-text (gRPC-Web in base64) or connect, all over HTTP/2
    /// (`grpcweb` and `grpcwebtext` are taken too). Reflection, which finds
    /// the method, always goes over native gRPC, so the server must serve
    /// that too.
    #[arg(long, value_name = "PROTOCOL", default_value = "grpc", value_parser = parse_protocol)]
    protocol: lodestar::client::Protocol,
}

/// Reads `--protocol`.
fn parse_protocol(text: &str) -> Result<lodestar::client::Protocol, String> {
    text.parse()
        .map_err(|e: lodestar::client::UnknownProtocol| e.to_string())
}

/// One `-H` metadata entry.
#[derive(Debug, Clone)]
pub(crate) enum Header {
    /// A text entry.
    Ascii(AsciiMetadataKey, AsciiMetadataValue),
    /// A binary entry (`-bin` key), decoded from base64.
    Binary(BinaryMetadataKey, BinaryMetadataValue),
}

/// Reads `KEY: VALUE` or `KEY:VALUE`.
pub(crate) fn parse_header(text: &str) -> Result<Header, String> {
    let Some((key, value)) = text.split_once(':') else {
        return Err(format!(
            "`{}` is not KEY: VALUE (expected e.g. `x-request-id: 42`)",
            printable(text)
        ));
    };
    let key = key.trim().to_ascii_lowercase();
    let value = value.trim();
    let bad_key = |e: &dyn std::fmt::Display| {
        format!(
            "`{}` is not a metadata key ({e}; expected lowercase letters, digits, `-`, `_`, `.`)",
            printable(&key)
        )
    };
    if key.ends_with("-bin") {
        let key = BinaryMetadataKey::from_bytes(key.as_bytes()).map_err(|e| bad_key(&e))?;
        let bytes = STANDARD
            .decode(value)
            .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(value))
            .map_err(|e| format!("the value of `{key}` is not base64: {e}"))?;
        Ok(Header::Binary(key, BinaryMetadataValue::from_bytes(&bytes)))
    } else {
        let key = AsciiMetadataKey::from_bytes(key.as_bytes()).map_err(|e| bad_key(&e))?;
        let not_ascii = || {
            format!(
                "the value of `{key}` must be printable ASCII (a -bin key takes base64 of any bytes)"
            )
        };
        if !value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(not_ascii());
        }
        let value = AsciiMetadataValue::try_from(value).map_err(|_| not_ascii())?;
        Ok(Header::Ascii(key, value))
    }
}

/// How a call ended when it did not end OK.
enum Ended {
    /// On this side.
    Local(Failure),
    /// With a status from the server.
    Status(tonic::Status),
}

impl From<Failure> for Ended {
    fn from(failure: Failure) -> Self {
        Ended::Local(failure)
    }
}

/// Runs `lodestar call`; prints the error JSON and returns the exit code.
pub(crate) async fn run(args: CallArgs) -> ExitCode {
    let mut session = None;
    let result = call(&args, &mut session).await;
    let code = match result {
        Ok(()) => 0,
        Err(Ended::Local(failure)) => {
            eprintln!("{}", failure.to_json());
            status::LOCAL_FAILURE_EXIT
        }
        Err(Ended::Status(status)) => {
            let pool = match session {
                Some((mut reflection, pool)) => detail_pool(&mut reflection, pool, &status).await,
                None => DescriptorPool::global(),
            };
            if args.verbose {
                print_metadata("response trailers", status.metadata());
            }
            eprintln!("{}", status::to_json(&status, &pool));
            status::exit_code(status.code())
        }
    };
    ExitCode::from(code)
}

/// `pool`, with the detail types of `status` it lacks added where the
/// server describes them (best effort, briefly).
async fn detail_pool(
    reflection: &mut Reflection,
    pool: DescriptorPool,
    status: &tonic::Status,
) -> DescriptorPool {
    let unknown: Vec<String> = status::details(status)
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| pool.get_message_by_name(name).is_none())
        .collect();
    if unknown.is_empty() {
        return pool;
    }
    match tokio::time::timeout(DETAILS_LOOKUP, reflection.pool_with(&unknown)).await {
        Ok(Ok(more)) => more,
        _ => pool,
    }
}

async fn call(
    args: &CallArgs,
    session: &mut Option<(Reflection, DescriptorPool)>,
) -> Result<(), Ended> {
    let limits = MessageLimits {
        max_decoding_message_size: args.max_message_size,
        max_encoding_message_size: args.max_message_size,
    };
    let waiting = super::waiting(format!(
        "finding {} and reading its schema",
        printable(&args.target.target)
    ));
    let connection = args.target.connect().await?;
    let mut reflection = Reflection::new(
        connection.clone(),
        args.max_message_size,
        args.target.connect_timeout() + REFLECTION_SLACK,
    );
    let services = reflection.services().await?;
    // Only the service METHOD names, when the server has it; else all, so
    // that the error can list the closest methods.
    let named: Vec<String> = match method::service_part(&args.method) {
        Some(wanted) => services
            .iter()
            .filter(|s| *s == wanted || s.strip_suffix(wanted).is_some_and(|p| p.ends_with('.')))
            .cloned()
            .collect(),
        None => Vec::new(),
    };
    let load = if named.is_empty() { services } else { named };
    let pool = reflection.pool(&load).await?;
    let methods = super::reflection::methods(&pool, &load);
    let chosen = method::resolve(&args.method, &methods)?;
    let descriptor = pool
        .get_service_by_name(&chosen.service)
        .and_then(|s| s.methods().find(|m| m.name() == chosen.method))
        .ok_or_else(|| {
            Failure::new(
                FailureKind::Reflection,
                format!("the schema lost {}", chosen.full()),
            )
        })?;
    *session = Some((reflection, pool));
    drop(waiting);
    let input = Input::from_flag(args.data.as_deref());
    let to_message = ToMessage::new(descriptor.input(), args.allow_unknown_fields);
    let (requests, input_failed) = if descriptor.is_client_streaming() {
        stream_input(input.open(args.max_message_size)?, to_message)?
    } else {
        let message = single_input(&input, args.max_message_size, to_message, &descriptor).await?;
        let (sender, receiver) = mpsc::channel(1);
        // Room for one: never waits.
        let _ = sender.try_send(message);
        let (_, never) = oneshot::channel();
        (receiver, never)
    };
    let exchange = exchange(
        args,
        connection.channel_over(limits, args.protocol),
        &descriptor,
        &chosen,
        requests,
    );
    tokio::select! {
        biased;
        Ok(failure) = input_failed => Err(Ended::Local(failure)),
        result = exchange => result,
    }
}

/// The one request of a unary or server-streaming call: `{}` without
/// input; else the input's one value.
async fn single_input(
    input: &Input,
    max: usize,
    to_message: ToMessage,
    method: &MethodDescriptor,
) -> Result<DynamicMessage, Failure> {
    let Some(values) = input.open(max)? else {
        return Ok(DynamicMessage::new(method.input()));
    };
    let (tx, mut rx) = mpsc::channel(2);
    spawn_reader(values, to_message, tx)?;
    let kind = if method.is_server_streaming() {
        "a server-streaming"
    } else {
        "a unary"
    };
    let first = match rx.recv().await {
        Some(first) => first?,
        None => {
            return Err(Failure::new(
                FailureKind::Input,
                format!("{kind} method takes one request message; the input has none"),
            ));
        }
    };
    match rx.recv().await {
        None => Ok(first),
        Some(Err(failure)) => Err(failure),
        Some(Ok(_)) => Err(Failure::new(
            FailureKind::Input,
            format!(
                "{kind} method takes one request message; the input has a second value \
                 (client-streaming and bidi methods take several)"
            ),
        )),
    }
}

/// The requests of a client-streaming or bidi call, sent as they are read,
/// and where a failure to read one is reported. On such a failure the
/// stream stays open (the server must not take a cut input for a whole
/// one); the caller ends the call.
fn stream_input(
    values: Option<Values>,
    to_message: ToMessage,
) -> Result<(mpsc::Receiver<DynamicMessage>, oneshot::Receiver<Failure>), Failure> {
    let (requests_tx, requests) = mpsc::channel(1);
    let (failed_tx, failed) = oneshot::channel();
    let Some(values) = values else {
        // No input: no messages, and the stream closes at once.
        return Ok((requests, failed));
    };
    let (read_tx, mut read) = mpsc::channel(1);
    spawn_reader(values, to_message, read_tx)?;
    tokio::spawn(async move {
        while let Some(item) = read.recv().await {
            match item {
                Ok(message) => {
                    if requests_tx.send(message).await.is_err() {
                        return;
                    }
                }
                Err(failure) => {
                    let _ = failed_tx.send(failure);
                    requests_tx.closed().await;
                    return;
                }
            }
        }
    });
    Ok((requests, failed))
}

/// Reads `values` on a thread of its own (stdin blocks), converting each
/// to a message and sending it on `tx` as soon as it is complete; stops
/// after the first failure. The thread is not joined: a process ending
/// while it waits for more input is not held up by it.
fn spawn_reader(
    mut values: Values,
    to_message: ToMessage,
    tx: mpsc::Sender<Result<DynamicMessage, Failure>>,
) -> Result<(), Failure> {
    std::thread::Builder::new()
        .name("lodestar-call-input".into())
        .spawn(move || {
            loop {
                let item = match values.next_value() {
                    Ok(None) => return,
                    Ok(Some(value)) => to_message.convert(value, values.count(), values.name()),
                    Err(failure) => Err(failure),
                };
                let failed = item.is_err();
                if tx.blocking_send(item).is_err() || failed {
                    return;
                }
            }
        })
        .map(drop)
        .map_err(|e| {
            Failure::new(
                FailureKind::Input,
                format!("cannot start the input reader: {e}"),
            )
        })
}

/// Makes the call and prints each reply as it arrives.
async fn exchange(
    args: &CallArgs,
    channel: lodestar::client::Channel,
    descriptor: &MethodDescriptor,
    chosen: &method::MethodRef,
    requests: mpsc::Receiver<DynamicMessage>,
) -> Result<(), Ended> {
    let path = PathAndQuery::try_from(chosen.path()).map_err(|e| {
        Failure::new(
            FailureKind::Method,
            format!("`{}` is not a request path: {e}", printable(&chosen.path())),
        )
    })?;
    let mut request = tonic::Request::new(ReceiverStream::new(requests));
    for header in &args.headers {
        match header.clone() {
            Header::Ascii(key, value) => {
                request.metadata_mut().append(key, value);
            }
            Header::Binary(key, value) => {
                request.metadata_mut().append_bin(key, value);
            }
        }
    }
    if let Some(Span(timeout)) = args.timeout {
        request.set_timeout(timeout);
    }
    // Connect sends unary calls unlike streams.
    request
        .extensions_mut()
        .insert(lodestar::client::CallKind::of(
            descriptor.is_client_streaming(),
            descriptor.is_server_streaming(),
        ));
    let mut grpc = tonic::client::Grpc::new(channel)
        .max_decoding_message_size(args.max_message_size)
        .max_encoding_message_size(args.max_message_size);
    grpc.ready().await.map_err(ended)?;
    let response = grpc
        .streaming(request, path, DynamicCodec::new(descriptor.output()))
        .await
        .map_err(ended)?;
    if args.verbose {
        print_metadata("response headers", response.metadata());
    }
    let mut replies = response.into_inner();
    let mut printer = Printer::new(
        std::io::stdout(),
        OutputFormat::or_default(args.output),
        args.emit_defaults,
    );
    while let Some(reply) = replies.message().await.map_err(ended)? {
        printer.print(&reply)?;
    }
    if args.verbose {
        let trailers = replies.trailers().await.map_err(ended)?;
        print_metadata("response trailers", &trailers.unwrap_or_default());
    }
    Ok(())
}

/// A status the call ended with: the server's, or the connection's failure.
fn ended(status: tonic::Status) -> Ended {
    if super::is_transport(&status) {
        Ended::Local(super::status_failure(
            FailureKind::Transport,
            "the call",
            &status,
        ))
    } else {
        Ended::Status(status)
    }
}

/// Writes `metadata` on stderr under `title`, binary values in base64.
fn print_metadata(title: &str, metadata: &MetadataMap) {
    eprintln!("{title}:");
    for entry in metadata.iter() {
        match entry {
            KeyAndValueRef::Ascii(key, value) => eprintln!(
                "  {key}: {}",
                printable(&String::from_utf8_lossy(value.as_encoded_bytes()))
            ),
            KeyAndValueRef::Binary(key, value) => {
                let bytes = value.to_bytes().map(|b| STANDARD.encode(b));
                eprintln!(
                    "  {key}: {}",
                    bytes.unwrap_or_else(|_| "(not base64)".to_owned())
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_take_either_spacing_and_binary_values_in_base64() {
        let Header::Ascii(key, value) = parse_header("X-Request-Id: 42").unwrap() else {
            panic!("a text header")
        };
        assert_eq!(key.as_str(), "x-request-id");
        assert_eq!(value, "42");
        let Header::Ascii(_, value) = parse_header("x-a:b: c").unwrap() else {
            panic!("a text header")
        };
        assert_eq!(value, "b: c");
        let Header::Binary(key, value) = parse_header("trace-bin: AQID").unwrap() else {
            panic!("a binary header")
        };
        assert_eq!(key.as_str(), "trace-bin");
        assert_eq!(value.to_bytes().unwrap().as_ref(), [1, 2, 3]);
    }

    #[test]
    fn bad_headers_say_what_was_expected() {
        assert!(parse_header("no-colon").unwrap_err().contains("KEY: VALUE"));
        assert!(
            parse_header("bad key: 1")
                .unwrap_err()
                .contains("not a metadata key")
        );
        assert!(
            parse_header("x-bin: !!!")
                .unwrap_err()
                .contains("not base64")
        );
        assert!(
            parse_header("x-a: caf\u{e9}")
                .unwrap_err()
                .contains("ASCII")
        );
    }
}

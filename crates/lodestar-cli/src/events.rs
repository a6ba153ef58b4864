//! `lodestar publish` and `lodestar subscribe`.

use std::error::Error;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use lodestar::broker::{Broker, Durable, Message, SubscribeOptions};

/// Where the broker is.
#[derive(clap::Args, Debug)]
pub(crate) struct BrokerArg {
    /// Broker URL (memory://, http://, nats://host:4222[,host:4222]).
    #[arg(
        long,
        env = "LODESTAR_BROKER",
        default_value = "nats://127.0.0.1:4222",
        value_parser = crate::args::broker_url
    )]
    broker: String,
    /// Registry URL, for the http:// broker (which finds subscribers
    /// there). Default: lodestar://127.0.0.1:7070.
    #[arg(long, env = "LODESTAR_REGISTRY", value_parser = crate::args::registry_url)]
    registry: Option<String>,
}

impl BrokerArg {
    async fn connect(&self) -> Result<Arc<dyn Broker>, Box<dyn Error>> {
        // Only the HTTP broker finds subscribers through a registry; the
        // others must not fail over a registry setting they never use.
        let registry: Arc<dyn lodestar::Registry> = if self.broker.starts_with("http://") {
            match &self.registry {
                Some(url) => lodestar_registry::from_url(url)?,
                None => lodestar_registry::from_env()?,
            }
        } else {
            Arc::new(lodestar::MemoryRegistry::new())
        };
        Ok(lodestar_broker::from_url(&self.broker, registry).await?)
    }
}

/// `lodestar publish`.
#[derive(clap::Args, Debug)]
pub(crate) struct PublishArgs {
    /// The topic, e.g. orders.created.
    topic: String,
    /// The message body (UTF-8 text; use `-` to read it from standard
    /// input, at most 16 MiB, the HTTP broker's limit).
    data: String,
    /// A header, as name=value; repeatable.
    #[arg(long = "header", value_name = "NAME=VALUE")]
    headers: Vec<crate::args::NameValue>,
    /// The body's content type.
    #[arg(long, default_value = "text/plain")]
    content_type: String,
    #[command(flatten)]
    broker: BrokerArg,
}

pub(crate) async fn publish(args: PublishArgs) -> Result<ExitCode, Box<dyn Error>> {
    let body = if args.data == "-" {
        let limit = lodestar_broker::http::DEFAULT_MAX_BODY;
        let mut body = Vec::new();
        std::io::Read::read_to_end(
            &mut std::io::Read::take(std::io::stdin(), limit as u64 + 1),
            &mut body,
        )?;
        if body.len() > limit {
            return Err(
                format!("the message on standard input is larger than {limit} bytes").into(),
            );
        }
        body
    } else {
        args.data.into_bytes()
    };
    let mut message = Message::new(&args.topic, body);
    for header in args.headers {
        message = message.with_header(header.name, header.value);
    }
    let message = lodestar::events::stamp(message, &args.content_type);
    let id = message.id().unwrap_or_default().to_owned();
    let broker = args.broker.connect().await?;
    broker.publish(message).await?;
    // Make sure a NATS publish has left before the process exits.
    broker.flush().await?;
    eprintln!("published {id} on {}", args.topic);
    Ok(ExitCode::SUCCESS)
}

/// `lodestar subscribe`.
#[derive(clap::Args, Debug)]
pub(crate) struct SubscribeArgs {
    /// The topic, e.g. orders.created.
    topic: String,
    /// Join this queue group (each message goes to one member).
    #[arg(long, conflicts_with = "durable")]
    queue: Option<String>,
    /// Subscribe durably (NATS JetStream) under this consumer name: at
    /// least once, each message acked once printed.
    #[arg(long)]
    durable: Option<String>,
    /// With --durable: how long a delivery may stay unacked before it is
    /// delivered again.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "30s",
        requires = "durable"
    )]
    ack_wait: crate::args::Span,
    /// With --durable: deliveries before a message is dead-lettered.
    #[arg(long, default_value_t = 5, requires = "durable")]
    max_deliver: u32,
    /// Exit after this many messages. Default: run until interrupted.
    #[arg(long)]
    count: Option<u64>,
    #[command(flatten)]
    broker: BrokerArg,
}

pub(crate) async fn subscribe(args: SubscribeArgs) -> Result<ExitCode, Box<dyn Error>> {
    let broker = args.broker.connect().await?;
    let options = match (args.queue, args.durable) {
        (_, Some(name)) => SubscribeOptions::durable(
            Durable::new(name)
                .ack_wait(args.ack_wait.0)
                .max_deliver(args.max_deliver),
        ),
        (Some(queue), None) => SubscribeOptions::queue(queue),
        (None, None) => SubscribeOptions::broadcast(),
    };
    let mut subscription = broker.subscribe(&args.topic, options).await?;
    eprintln!("subscribed to {}", args.topic);
    let interrupted = lodestar::server::shutdown_signal();
    tokio::pin!(interrupted);
    let mut seen = 0;
    while args.count.is_none_or(|count| seen < count) {
        let delivery = tokio::select! {
            _ = &mut interrupted => break,
            delivery = subscription.next() => delivery,
        };
        let Some(delivery) = delivery else {
            return Err("the subscription ended (the broker closed it)".into());
        };
        // One JSON line per message: topic, headers, body as text if it is
        // UTF-8, else base64-free hex.
        let body = match std::str::from_utf8(&delivery.message.body) {
            Ok(text) => serde_json::json!({ "text": text }),
            Err(_) => serde_json::json!({ "hex": hex(&delivery.message.body) }),
        };
        let line = serde_json::json!({
            "topic": delivery.message.topic,
            "headers": delivery.message.headers,
            "body": body,
            "attempt": delivery.attempt,
        });
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{line}")?;
        stdout.flush()?;
        drop(stdout);
        delivery.ack().await?;
        seen += 1;
    }
    subscription.unsubscribe().await?;
    Ok(ExitCode::SUCCESS)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

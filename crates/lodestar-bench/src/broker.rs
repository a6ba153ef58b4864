//! The broker scenario: publish → subscribe messages/s and latency for
//! lodestar's brokers, each against raw `async-nats` doing the same work
//! on the same nats-server.
//!
//! # Cases
//!
//! Every case runs at full speed (throughput) and at a fixed rate well
//! below every variant's ceiling (latency). The first variant is always
//! lodestar; the case's name says which broker.
//!
//! * **NATS core**: lodestar's `NatsBroker` (publish, plain broadcast
//!   subscription) against `async_nats::Client::publish` and `subscribe`;
//!   fixed rate 5,000 messages/s.
//! * **JetStream, durable, at least once**: a lodestar durable subscription
//!   (`SubscribeOptions::durable`; lodestar pulls 16 at a time and acks each
//!   message without waiting for the server's answer, confirming them all
//!   when the subscription ends) against a raw durable pull consumer
//!   (`consumer.messages()`, explicit acks, `ack`: fire and forget, what a
//!   user writes first). Both sides publish through JetStream and wait for
//!   each publish ack, as lodestar does for a topic a stream holds, from 32
//!   concurrent publishers; both streams have JetStream's default
//!   configuration (file storage); fixed rate 2,000 messages/s.
//! * **HTTP broker**: lodestar's `HttpBroker` (subscribers found through a
//!   registry server process, each message a POST to the subscriber), from
//!   16 concurrent publishers (an HTTP publish waits for the subscriber's
//!   answer); fixed rate 5,000 messages/s. Alone: it has no broker process,
//!   so publisher, subscriber and broker all run on the client core, and a
//!   NATS peer would have a second core to itself. The NATS cases are the
//!   comparison to read it against.
//! * **Memory broker**: lodestar's in-process `MemoryBroker`, alone, as the
//!   floor the other backends can be read against.
//!
//! # Method and fairness
//!
//! One load process (`lodestar-bench broker load`, pinned to the client
//! core) holds both the publisher and the subscriber, each with its own
//! connection (its own broker), so that one clock stamps the send time in
//! the body (first 8 bytes of a 128-byte body) and reads it at delivery.
//! The infrastructure runs alone on the server core: a fresh nats-server
//! (`-js`, its own store directory) per run for the NATS variants, a fresh
//! registry server per run for the HTTP broker (idle while measuring: the
//! HTTP broker has no broker process; its whole cost is in the load
//! process, so its "server" numbers are the registry's).
//!
//! Both sides of every case run the same load code; only the publish call
//! and the receive (and ack) call differ. Publishers never run ahead of the
//! subscriber by more than a window of messages (1,000 here): a publisher
//! takes a permit before each publish and the subscriber returns one per
//! delivery. Without it, core NATS publishers outrun the subscriber until
//! the server drops it as a slow consumer, and what would be measured is
//! the size of buffers. Full-speed cases are closed loops over that window,
//! so their latencies are mostly queueing (about window ÷ throughput).
//! Fixed-rate cases add an open-loop schedule: a ticker issues publishes
//! on time, late ticks catching up in a burst; the window then only stops
//! a backend that cannot keep up from queueing without bound, which shows
//! as throughput below the rate. A latency is from just before the publish
//! call to the subscriber taking the message (before its ack): the
//! ticker's millisecond granularity is left out, and so is time a message
//! waited behind a publish call that blocked. Throughput counts messages
//! delivered (and, for durable subscriptions, acked) inside the measured
//! window. Messages carry no headers on either side (lodestar's
//! `EventPublisher` would add a content type and a message id; this
//! measures `Broker::publish`). Before measuring, one message goes through
//! end to end (subscription in place, discovery done, streams created),
//! then the warm-up runs.
//!
//! Reported per run: messages/s, latency p50/p99/p99.9, CPU time per
//! message of the load process and of the server (between the warm and
//! measured markers), and peak RSS of both.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use futures_util::StreamExt;
use lodestar_broker::{Broker, Durable, Message, SubscribeOptions, Subscription};
use tokio::sync::{Notify, Semaphore};

use crate::harness::{self, Case, Latencies, Proc, Result, Sample, Settings, Tally};

/// The scenario's name in the report.
const SCENARIO: &str = "broker";
/// The topic (NATS subject) every case publishes on.
const TOPIC: &str = "bench.broker";
/// The durable consumer's name, on both sides.
const DURABLE: &str = "bench";
/// The raw side's JetStream stream.
const RAW_STREAM: &str = "BENCH";
/// Message body bytes.
const BODY: usize = 128;
/// Messages published but not yet delivered, at most.
const WINDOW: usize = 1000;
/// How long the first message may take to get through.
const PRIME: Duration = Duration::from_secs(10);
/// Latencies kept per run, at most (a uniform sample beyond): 512 KiB, so
/// that the recorder's memory is not what the load process's peak RSS
/// measures at a million messages per second.
const LATENCY_SAMPLES: usize = 64 * 1024;

/// Which side of a comparison a load process runs.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// lodestar's `NatsBroker`: core publish, broadcast subscription.
    LodestarNats,
    /// Raw async-nats core publish and subscribe.
    Nats,
    /// lodestar's `NatsBroker`: a durable (JetStream) subscription, each
    /// delivery acked.
    LodestarDurable,
    /// Raw async-nats JetStream: durable pull consumer, `ack`.
    Jetstream,
    /// lodestar's `HttpBroker`, subscribers found through a registry.
    LodestarHttp,
    /// lodestar's in-process `MemoryBroker`.
    Memory,
}

impl Side {
    /// What runs on the server core for this side.
    fn infra(self) -> Infra {
        match self {
            Side::LodestarNats | Side::Nats | Side::LodestarDurable | Side::Jetstream => {
                Infra::Nats
            }
            Side::LodestarHttp => Infra::Registry,
            Side::Memory => Infra::None,
        }
    }

    /// Its `--side` argument.
    fn arg(self) -> Result<String> {
        clap::ValueEnum::to_possible_value(&self)
            .map(|v| v.get_name().to_owned())
            .ok_or_else(|| format!("no name for {self:?}").into())
    }
}

/// What a run needs on the server core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Infra {
    /// A nats-server with JetStream.
    Nats,
    /// A lodestar registry server (for the HTTP broker's discovery).
    Registry,
    /// Nothing (the in-process broker).
    None,
}

/// The child processes of this scenario.
#[derive(clap::Subcommand, Debug)]
pub(crate) enum Child {
    /// Publishes and subscribes through one side; says `{"warm": true}`
    /// when the warm-up ends, `{"measured": true}` when the measured window
    /// does, then `{"result": {…}}`.
    Load(LoadArgs),
}

/// What a load process does.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct LoadArgs {
    #[arg(long, value_enum)]
    side: Side,
    /// The nats-server's `nats://` URL, or the registry's `lodestar://` URL
    /// (HTTP broker); unused for the memory broker.
    #[arg(long, default_value = "")]
    url: String,
    /// Body bytes per message (at least 8: the send time).
    #[arg(long, default_value_t = BODY)]
    size: usize,
    /// Publishing tasks, each with one publish in flight.
    #[arg(long, default_value_t = 1)]
    publishers: usize,
    /// Messages published but not yet delivered, at most.
    #[arg(long, default_value_t = WINDOW)]
    window: usize,
    /// Messages per second on a fixed schedule, instead of full speed.
    #[arg(long)]
    rate: Option<u64>,
    #[arg(long)]
    warmup_ms: u64,
    #[arg(long)]
    duration_ms: u64,
    /// How long, after the measured window, to wait for messages still in
    /// flight.
    #[arg(long)]
    drain_ms: u64,
}

/// Runs a child process of this scenario.
pub(crate) async fn child(child: Child) -> Result<()> {
    match child {
        Child::Load(args) => load(args).await,
    }
}

// ---- the two ends of a side ----

/// Publishes one body on the topic.
#[derive(Clone)]
enum Publisher {
    /// Any lodestar broker.
    Lodestar(Arc<dyn Broker>),
    /// Raw core NATS.
    Nats(async_nats::Client, async_nats::Subject),
    /// Raw JetStream, waiting for the publish ack.
    JetStream(jetstream::Context, async_nats::Subject),
}

impl Publisher {
    async fn publish(&self, body: Bytes) -> Result<()> {
        match self {
            Publisher::Lodestar(broker) => broker.publish(Message::new(TOPIC, body)).await?,
            Publisher::Nats(client, subject) => client.publish(subject.clone(), body).await?,
            Publisher::JetStream(context, subject) => {
                context.publish(subject.clone(), body).await?.await?;
            }
        }
        Ok(())
    }
}

/// Receives (and settles) messages on the topic.
enum Receiver {
    /// Any lodestar subscription; durable deliveries are acked.
    Lodestar(Subscription),
    /// Raw core NATS.
    Nats(async_nats::Subscriber),
    /// Raw JetStream pull consumer, acking each message.
    JetStream(Box<jetstream::consumer::pull::Stream>),
}

impl Receiver {
    /// The next message's body and when it arrived; a message that needs
    /// an ack is acked before this returns. `None` when the subscription
    /// has ended.
    async fn next(&mut self) -> Result<Option<(Bytes, Instant)>> {
        match self {
            Receiver::Lodestar(subscription) => {
                let Some(delivery) = subscription.next().await else {
                    return Ok(None);
                };
                let arrived = Instant::now();
                // A no-op for at-most-once deliveries.
                delivery.ack().await?;
                Ok(Some((delivery.message.body, arrived)))
            }
            Receiver::Nats(subscriber) => Ok(subscriber
                .next()
                .await
                .map(|message| (message.payload, Instant::now()))),
            Receiver::JetStream(messages) => {
                let Some(message) = messages.next().await else {
                    return Ok(None);
                };
                let message = message?;
                let arrived = Instant::now();
                message.ack().await?;
                Ok(Some((message.message.payload, arrived)))
            }
        }
    }
}

/// Connects both ends of `side`, each with its own connection (broker).
async fn connect(args: &LoadArgs) -> Result<(Publisher, Receiver)> {
    let subject = async_nats::Subject::from_static(TOPIC);
    Ok(match args.side {
        Side::LodestarNats | Side::LodestarDurable => {
            let publisher = lodestar_broker::NatsBroker::connect(&args.url).await?;
            let subscriber = lodestar_broker::NatsBroker::connect(&args.url).await?;
            let options = if args.side == Side::LodestarDurable {
                SubscribeOptions::durable(Durable::new(DURABLE))
            } else {
                SubscribeOptions::broadcast()
            };
            let subscription = subscriber.subscribe(TOPIC, options).await?;
            (
                Publisher::Lodestar(Arc::new(publisher)),
                Receiver::Lodestar(subscription),
            )
        }
        Side::Nats => {
            let publisher = async_nats::connect(&args.url).await?;
            let subscriber = async_nats::connect(&args.url).await?;
            let subscription = subscriber.subscribe(subject.clone()).await?;
            (
                Publisher::Nats(publisher, subject),
                Receiver::Nats(subscription),
            )
        }
        Side::Jetstream => {
            let publisher = jetstream::new(async_nats::connect(&args.url).await?);
            let subscriber = jetstream::new(async_nats::connect(&args.url).await?);
            let stream = subscriber
                .get_or_create_stream(jetstream::stream::Config {
                    name: RAW_STREAM.to_owned(),
                    subjects: vec![TOPIC.to_owned()],
                    ..Default::default()
                })
                .await?;
            let consumer: jetstream::consumer::PullConsumer = stream
                .get_or_create_consumer(
                    DURABLE,
                    jetstream::consumer::pull::Config {
                        durable_name: Some(DURABLE.to_owned()),
                        ack_policy: jetstream::consumer::AckPolicy::Explicit,
                        ..Default::default()
                    },
                )
                .await?;
            let messages = Box::new(consumer.messages().await?);
            (
                Publisher::JetStream(publisher, subject),
                Receiver::JetStream(messages),
            )
        }
        Side::LodestarHttp => {
            let publisher =
                lodestar_broker::HttpBroker::new(lodestar_registry::from_url(&args.url)?);
            let subscriber =
                lodestar_broker::HttpBroker::new(lodestar_registry::from_url(&args.url)?);
            let subscription = subscriber
                .subscribe(TOPIC, SubscribeOptions::broadcast())
                .await?;
            (
                Publisher::Lodestar(Arc::new(publisher)),
                Receiver::Lodestar(subscription),
            )
        }
        Side::Memory => {
            let broker = lodestar::MemoryBroker::new();
            let subscription = broker
                .subscribe(TOPIC, SubscribeOptions::broadcast())
                .await?;
            (
                Publisher::Lodestar(Arc::new(broker)),
                Receiver::Lodestar(subscription),
            )
        }
    })
}

/// Sends messages until one gets through: the subscription is in place,
/// discovery and stream lookups are done.
async fn prime(publisher: &Publisher, receiver: &mut Receiver, size: usize) -> Result<()> {
    let deadline = Instant::now() + PRIME;
    loop {
        publisher.publish(Bytes::from(vec![0u8; size])).await?;
        match tokio::time::timeout(Duration::from_millis(200), receiver.next()).await {
            Ok(Ok(Some(_))) => return Ok(()),
            Ok(Ok(None)) => return Err("the subscription ended at once".into()),
            Ok(Err(e)) => return Err(e),
            Err(_) if Instant::now() >= deadline => {
                return Err(format!("no message got through within {PRIME:?}").into());
            }
            Err(_) => {}
        }
    }
}

// ---- the load ----

/// What the publishers and the subscriber of one run share.
struct Shared {
    /// Send times are nanoseconds since this.
    epoch: Instant,
    /// Permits to publish: `window` at first, one back per delivery.
    window: Semaphore,
    /// Messages published (the call returned).
    published: AtomicU64,
    /// Messages delivered (and settled).
    delivered: AtomicU64,
    /// Woken after each delivery, for the drain at the end.
    progress: Notify,
    /// The measured window.
    from: Instant,
    to: Instant,
}

impl Shared {
    fn stamp(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }
}

/// One publishing task: takes a permit (and, at a fixed rate, a token from
/// the ticker), stamps the body with the time, publishes; until `to`.
async fn publish_loop(
    publisher: Publisher,
    shared: Arc<Shared>,
    tokens: Option<Arc<Semaphore>>,
    size: usize,
) -> Result<()> {
    let mut body = vec![0u8; size];
    let to = shared.to;
    // Checked each time: a permit that is free at once is taken even past
    // a timeout's deadline.
    while Instant::now() < to {
        match tokio::time::timeout_at(to.into(), shared.window.acquire()).await {
            Ok(Ok(permit)) => permit.forget(),
            _ => return Ok(()),
        }
        if let Some(tokens) = &tokens {
            match tokio::time::timeout_at(to.into(), tokens.acquire()).await {
                Ok(Ok(permit)) => permit.forget(),
                _ => return Ok(()),
            }
        }
        let stamp = shared.stamp(Instant::now());
        body[..8].copy_from_slice(&stamp.to_le_bytes());
        publisher.publish(Bytes::copy_from_slice(&body)).await?;
        shared.published.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// Issues `rate` tokens per second from `start` until `to`; a late tick
/// issues every token that has come due (open loop).
async fn tick(tokens: Arc<Semaphore>, rate: u64, start: Instant, to: Instant) {
    let rate = rate.max(1);
    let mut issued: u64 = 0;
    loop {
        let now = Instant::now();
        if now >= to {
            return;
        }
        let due = (now.duration_since(start).as_secs_f64() * rate as f64) as u64;
        if due > issued {
            tokens.add_permits(usize::try_from(due - issued).unwrap_or(usize::MAX >> 4));
            issued = due;
        }
        // The next token's time on the schedule.
        let next = start + Duration::from_secs_f64((issued + 1) as f64 / rate as f64);
        tokio::time::sleep_until(next.into()).await;
    }
}

/// The subscriber: takes every delivery, returns its permit, and records
/// it into `tally`.
async fn receive_loop(
    mut receiver: Receiver,
    shared: Arc<Shared>,
    tally: Arc<std::sync::Mutex<Tally>>,
) -> Result<()> {
    while let Some((body, arrived)) = receiver.next().await? {
        let settled = Instant::now();
        shared.window.add_permits(1);
        let sent = body
            .get(..8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
            .ok_or("a message without a send time")?;
        {
            let mut tally = tally.lock().map_err(|_| "tally lock poisoned")?;
            if settled >= shared.from && settled < shared.to {
                tally.ops += 1;
            }
            if sent >= shared.stamp(shared.from) && sent < shared.stamp(shared.to) {
                let latency = shared.stamp(arrived).saturating_sub(sent);
                tally.latencies.record(Duration::from_nanos(latency));
            }
        }
        shared.delivered.fetch_add(1, Ordering::Relaxed);
        shared.progress.notify_one();
    }
    Err("the subscription ended".into())
}

async fn load(args: LoadArgs) -> Result<()> {
    if args.size < 8 {
        return Err("--size must be at least 8 (the send time)".into());
    }
    let warmup = Duration::from_millis(args.warmup_ms);
    let duration = Duration::from_millis(args.duration_ms);
    let drain = Duration::from_millis(args.drain_ms);
    let (publisher, mut receiver) = connect(&args).await?;
    prime(&publisher, &mut receiver, args.size).await?;

    let epoch = Instant::now();
    let from = epoch + warmup;
    let to = from + duration;
    let shared = Arc::new(Shared {
        epoch,
        window: Semaphore::new(args.window.max(1)),
        published: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        progress: Notify::new(),
        from,
        to,
    });
    let tally = Arc::new(std::sync::Mutex::new(Tally {
        ops: 0,
        latencies: Latencies::sampled(LATENCY_SAMPLES),
    }));
    let subscriber = tokio::spawn(receive_loop(receiver, shared.clone(), tally.clone()));
    let tokens = args.rate.map(|rate| {
        let tokens = Arc::new(Semaphore::new(0));
        tokio::spawn(tick(tokens.clone(), rate, epoch, to));
        tokens
    });
    let mut publishers = tokio::task::JoinSet::new();
    for _ in 0..args.publishers.max(1) {
        publishers.spawn(publish_loop(
            publisher.clone(),
            shared.clone(),
            tokens.clone(),
            args.size,
        ));
    }

    tokio::time::sleep_until(from.into()).await;
    let cpu_from = harness::self_cpu_time();
    harness::say(serde_json::json!({ "warm": true }));
    tokio::time::sleep_until(to.into()).await;
    let cpu_to = harness::self_cpu_time();
    harness::say(serde_json::json!({ "measured": true }));

    // Publishers stop at `to`; one publish may still be waiting for its
    // answer (every lodestar and async-nats publish has its own timeout).
    let stopped = tokio::time::timeout(drain + Duration::from_secs(10), async {
        while let Some(done) = publishers.join_next().await {
            done??;
        }
        Ok::<(), harness::Error>(())
    })
    .await;
    stopped.map_err(|_| "publishers still busy long after the measured window")??;
    // Then the messages still in flight, for the latencies of the last ones.
    let published = shared.published.load(Ordering::Relaxed);
    let _ = tokio::time::timeout(drain, async {
        while shared.delivered.load(Ordering::Relaxed) < published && !subscriber.is_finished() {
            shared.progress.notified().await;
        }
    })
    .await;
    subscriber.abort();
    match subscriber.await {
        Ok(Err(e)) => return Err(e),
        Err(e) if e.is_panic() => return Err("the subscriber panicked".into()),
        _ => {}
    }
    let delivered = shared.delivered.load(Ordering::Relaxed);

    let mut tally = std::mem::take(&mut *tally.lock().map_err(|_| "tally lock poisoned")?);
    let sample = tally.sample(duration, cpu_to - cpu_from)?;
    harness::say(serde_json::json!({
        "result": sample.to_json(),
        "ops": tally.ops,
        "published": published,
        "undelivered": published.saturating_sub(delivered),
    }));
    Ok(())
}

// ---- the orchestration ----

/// One case: the same load for each of its variants.
struct BrokerCase {
    name: &'static str,
    /// lodestar first.
    variants: &'static [(&'static str, Side)],
    publishers: usize,
    rate: Option<u64>,
}

// The first variant of every case is named "lodestar" (the report and its
// smoke test expect it); what it is comes from the case's name.
const CORE: &[(&str, Side)] = &[("lodestar", Side::LodestarNats), ("async-nats", Side::Nats)];
const HTTP: &[(&str, Side)] = &[("lodestar", Side::LodestarHttp)];

const CASES: &[BrokerCase] = &[
    BrokerCase {
        name: "nats core, 128 B, full speed (1 publisher, ≤1,000 in flight; ops = msgs delivered)",
        variants: CORE,
        publishers: 1,
        rate: None,
    },
    BrokerCase {
        name: "nats core, 128 B, fixed 5,000 msgs/s",
        variants: CORE,
        publishers: 1,
        rate: Some(5000),
    },
    BrokerCase {
        name: "jetstream durable, 128 B, full speed (32 publishers awaiting publish acks, \
               ≤1,000 in flight; ops = msgs delivered and acked)",
        variants: &[
            ("lodestar", Side::LodestarDurable),
            ("async-nats (ack)", Side::Jetstream),
        ],
        publishers: 32,
        rate: None,
    },
    BrokerCase {
        name: "jetstream durable, 128 B, fixed 2,000 msgs/s",
        variants: &[
            ("lodestar", Side::LodestarDurable),
            ("async-nats (ack)", Side::Jetstream),
        ],
        publishers: 32,
        rate: Some(2000),
    },
    BrokerCase {
        name: "http broker (alone: all on one core), 128 B, full speed (16 publishers, \
               ≤1,000 in flight; ops = msgs delivered)",
        variants: HTTP,
        publishers: 16,
        rate: None,
    },
    BrokerCase {
        name: "http broker (alone: all on one core), 128 B, fixed 5,000 msgs/s",
        variants: HTTP,
        publishers: 16,
        rate: Some(5000),
    },
    BrokerCase {
        name: "lodestar memory broker (in-process reference), 128 B, full speed \
               (1 publisher, ≤1,000 in flight)",
        variants: &[("lodestar", Side::Memory)],
        publishers: 1,
        rate: None,
    },
];

/// How long the parts of one run last.
#[derive(Debug, Clone, Copy)]
struct Timing {
    warmup: Duration,
    duration: Duration,
    drain: Duration,
}

impl Timing {
    /// A smoke run has 14 runs to fit in a few seconds of a debug build:
    /// shorter than the harness's smoke settings.
    fn of(settings: &Settings) -> Timing {
        if settings.smoke {
            Timing {
                warmup: Duration::from_millis(30),
                duration: Duration::from_millis(100),
                drain: Duration::from_millis(500),
            }
        } else {
            Timing {
                warmup: settings.warmup,
                duration: settings.duration,
                drain: Duration::from_secs(3),
            }
        }
    }
}

/// Runs the scenario: every case, its variants alternately, fresh
/// infrastructure (nats-server or registry server) for every run.
pub(crate) async fn run(settings: &Settings) -> Result<Vec<Case>> {
    eprintln!("broker: lodestar's brokers vs raw async-nats on the same nats-server");
    let timing = Timing::of(settings);
    let mut cases = Vec::new();
    for case in CASES {
        let names: Vec<&str> = case.variants.iter().map(|(name, _)| *name).collect();
        let result = harness::alternate(settings, SCENARIO, case.name, &names, |name| async move {
            let side = case
                .variants
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, side)| *side)
                .ok_or_else(|| format!("unknown variant `{name}`"))?;
            one_run(settings, timing, case, side).await
        })
        .await?;
        cases.push(result);
    }
    Ok(cases)
}

/// The server-core process of one run.
enum Server {
    Nats(NatsServer),
    Registry(Proc),
}

impl Server {
    fn proc(&self) -> &Proc {
        match self {
            Server::Nats(nats) => &nats.proc,
            Server::Registry(proc) => proc,
        }
    }

    async fn stop(self) -> Result<()> {
        match self {
            Server::Nats(nats) => nats.stop().await,
            Server::Registry(mut proc) => proc.terminate().await,
        }
    }
}

async fn one_run(
    settings: &Settings,
    timing: Timing,
    case: &BrokerCase,
    side: Side,
) -> Result<Sample> {
    let (server, url) = match side.infra() {
        Infra::Nats => {
            let nats = NatsServer::start(settings.server_cpu()).await?;
            let url = nats.url.clone();
            (Some(Server::Nats(nats)), url)
        }
        Infra::Registry => {
            let (proc, url) = crate::registry::start_server(settings.server_cpu()).await?;
            (Some(Server::Registry(proc)), url)
        }
        Infra::None => (None, String::new()),
    };
    let mut args = vec![
        "broker".to_owned(),
        "load".to_owned(),
        "--side".to_owned(),
        side.arg()?,
        "--url".to_owned(),
        url,
        "--size".to_owned(),
        BODY.to_string(),
        "--publishers".to_owned(),
        case.publishers.to_string(),
        "--window".to_owned(),
        WINDOW.to_string(),
        "--warmup-ms".to_owned(),
        timing.warmup.as_millis().to_string(),
        "--duration-ms".to_owned(),
        timing.duration.as_millis().to_string(),
        "--drain-ms".to_owned(),
        timing.drain.as_millis().to_string(),
    ];
    if let Some(rate) = case.rate {
        args.extend(["--rate".to_owned(), rate.to_string()]);
    }
    let mut client = Proc::spawn_self("broker load", settings.client_cpu(), &args)?;
    let patience = PRIME + timing.warmup + timing.duration + timing.drain + Duration::from_secs(20);
    client.expect("warm", patience).await?;
    let cpu_from = server.as_ref().map(|s| s.proc().cpu_time()).transpose()?;
    client.expect("measured", patience).await?;
    let cpu_to = server.as_ref().map(|s| s.proc().cpu_time()).transpose()?;
    let result = client.message(patience).await?;
    client.wait(Duration::from_secs(10)).await?;
    if let Some(lost) = result["undelivered"].as_u64().filter(|n| *n > 0) {
        // At most once may lose messages; say so rather than hide it.
        eprintln!("    {lost} published message(s) were not delivered");
    }
    let (mut sample, ops) = Sample::from_load(&result)?;
    // The registry behind the HTTP broker is not a broker: no server column.
    let broker_server = matches!(side.infra(), Infra::Nats);
    if let (true, Some(server), Some(from), Some(to)) = (broker_server, &server, cpu_from, cpu_to) {
        sample
            .set(harness::SERVER_CPU, (to - from).as_secs_f64() * 1e6 / ops)
            .set(harness::SERVER_RSS, harness::mib(server.proc().peak_rss()?));
    }
    if let Some(server) = server {
        server.stop().await?;
    }
    Ok(sample)
}

// ---- nats-server ----

/// A nats-server with JetStream on a free loopback port, its store (and
/// log) in a fresh temporary directory, pinned to a core. Killed, and its
/// directory removed, when dropped; [`NatsServer::stop`] shuts it down
/// gracefully first.
struct NatsServer {
    proc: Proc,
    dir: PathBuf,
    url: String,
    stopped: bool,
}

impl NatsServer {
    async fn start(cpu: Option<usize>) -> Result<NatsServer> {
        let binary = nats_binary()?;
        let port = lodestar_tests::free_port();
        let dir = std::env::temp_dir().join(format!(
            "lodestar-bench-nats-{}",
            lodestar_tests::unique_name()
        ));
        std::fs::create_dir_all(&dir)?;
        let path = |p: PathBuf| p.to_string_lossy().into_owned();
        let args = [
            "-js".to_owned(),
            "-a".to_owned(),
            "127.0.0.1".to_owned(),
            "-p".to_owned(),
            port.to_string(),
            "-sd".to_owned(),
            path(dir.join("store")),
            // Its log goes to a file, not into the report's stderr.
            "-l".to_owned(),
            path(dir.join("nats.log")),
        ];
        let proc = match Proc::spawn("nats-server", cpu, &binary, &args) {
            Ok(proc) => proc,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        // From here on, dropping it cleans up.
        let server = NatsServer {
            proc,
            dir,
            url: format!("nats://127.0.0.1:{port}"),
            stopped: false,
        };
        let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        tokio::time::timeout(Duration::from_secs(10), async {
            // Polling: nats-server says nothing on stdout when it is ready.
            while tokio::net::TcpStream::connect(address).await.is_err() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .map_err(|_| format!("nats-server did not accept connections on {address} within 10 s"))?;
        Ok(server)
    }

    /// SIGTERM, wait for it to exit (bounded), remove its directory.
    async fn stop(mut self) -> Result<()> {
        let stopped = self.proc.terminate().await;
        self.stopped = true;
        std::fs::remove_dir_all(&self.dir)?;
        stopped
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        if let Ok(pid) = libc::pid_t::try_from(self.proc.pid()) {
            // SAFETY: kill(2) with a pid we started and have not reaped (the
            // Proc, reaping it, is dropped after this).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The nats-server binary (see `lodestar_tests::nats::binary`), or an
/// error saying how to get one.
fn nats_binary() -> Result<String> {
    std::panic::catch_unwind(lodestar_tests::nats::binary).map_err(|_| {
        "the broker scenario needs nats-server (Debian: apt-get install nats-server, or set \
         LODESTAR_NATS_SERVER)"
            .into()
    })
}

//! The registry scenario: the lodestar registry server against etcd, doing
//! the same work, and the registry server child that other scenarios use
//! for discovery.
//!
//! # What is measured
//!
//! For N instances (1k, 10k and 100k; 200 in a smoke run), spread over
//! N/10 services of 10 instances each, every run starts a fresh server
//! (lodestar's, or etcd) pinned to the server core and a load generator
//! pinned to the client core, which does four steps in turn, each its own
//! case in the report:
//!
//! 1. **Registration**: all N instances registered with K requests in
//!    flight. lodestar: `Register` with a TTL. etcd: what lodestar's etcd
//!    backend does per instance, `LeaseGrant` then `Put` of the instance
//!    as JSON under `/lodestar/registry/{namespace}/{group}/{service}/{id}`
//!    bound to the lease. Besides throughput, latency and CPU, the server's
//!    resident memory before and after gives its **memory per instance**.
//! 2. **Heartbeats**: every lease renewed over and over, K in flight
//!    (closed loop). lodestar: the `Heartbeat` RPC. etcd: `LeaseKeepAlive`,
//!    one bidi stream per worker, one lease at a time (ping-pong), as
//!    etcd's own client keeps leases alive.
//! 3. **Lookups** of a random service (10 instances), K in flight.
//!    lodestar: `GetInstances`. etcd: a `Range` over the service's prefix.
//!    Both clients turn the answer into instances (protobuf, or the JSON
//!    lodestar's etcd backend stores).
//! 4. **Watch fan-out**: W watchers follow one service (lodestar `Watch`,
//!    etcd `Watch` on its prefix), then a few writers register new
//!    instances in it. Each delivery's latency runs from the start of the
//!    registration (for etcd, the `LeaseGrant`) to its arrival at a
//!    watcher; operations are deliveries (W per change).
//!
//! # Why it is a fair comparison
//!
//! Both sides are driven by the same load generator with the same
//! concurrency, over the same kind of connections: raw tonic channels
//! (one per worker or watcher, as separate instances would have) and
//! generated clients, so the only difference is the server. Both servers
//! get one core (Go and Tokio both size themselves to it), and run as they
//! ship: lodestar's with its defaults (in memory, self-preservation on),
//! etcd as a single member with its defaults (a raft log and an fsync per
//! batch of writes: the durability a team running etcd gets), except
//! shorter election timeouts so that it starts in a fraction of a second.
//! Leases last 10 minutes, so nothing expires during a run. In a full run,
//! heartbeats and lookups warm up for a quarter of the usual time and are
//! measured for a third of it (six runs per repetition, and registering
//! 100k instances alone takes half a minute in etcd). Server CPU
//! and memory come from `/proc` (the orchestrator reads them between a
//! step's warm-up and its end), never from the servers' own reports.
//! Variants alternate, one fresh server per run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use lodestar::{Instance, ServiceKey};
use lodestar_etcd::pb::etcdserverpb as etcd;
use lodestar_registry::pb;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::Streaming;
use tonic::transport::Channel;

use crate::harness::{self, Case, Latencies, Metric, Proc, Result, Sample, Settings, Tally};

/// The child processes of this scenario.
#[derive(clap::Subcommand, Debug)]
pub(crate) enum Child {
    /// A lodestar registry server (in-memory, no warm-up) on a free port;
    /// says `{"ready": {"addr": …}}`, then serves until killed.
    Server,
    /// Loads a registry server or etcd: every step in turn, each reported
    /// with `{"warm": step}`, `{"measured": step}`, `{"result": …}`.
    Load(LoadArgs),
}

/// Runs a child process of this scenario.
pub(crate) async fn child(child: Child) -> Result<()> {
    match child {
        Child::Server => serve().await,
        Child::Load(args) => load(args).await,
    }
}

async fn serve() -> Result<()> {
    let config = lodestar_registry_server::Config {
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        http_addr: None,
        warmup: Duration::ZERO,
        ..Default::default()
    };
    let running = lodestar_registry_server::start(config).await?;
    harness::say(serde_json::json!({ "ready": { "addr": running.local_addr().to_string() } }));
    std::future::pending::<()>().await;
    Ok(())
}

/// A registry server process for discovery, on `cpu`; returns it and its
/// `lodestar://` URL.
pub(crate) async fn start_server(cpu: Option<usize>) -> Result<(harness::Proc, String)> {
    let mut server = harness::Proc::spawn_self(
        "registry server",
        cpu,
        &["registry".into(), "server".into()],
    )?;
    let ready = server.expect("ready", Duration::from_secs(10)).await?;
    let addr = ready["addr"]
        .as_str()
        .ok_or("registry server: no address")?;
    let url = format!("lodestar://{addr}");
    Ok((server, url))
}

// ---- the workload: instances, services, and the two kinds of server ----

/// Which server is loaded.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// The lodestar registry server.
    Lodestar,
    /// A single etcd member, used as lodestar's etcd backend uses it.
    Etcd,
}

/// Instances per service.
const PER_SERVICE: usize = 10;
/// Every lease: long enough that nothing expires during a run.
const TTL: Duration = Duration::from_secs(600);
/// The prefix lodestar's etcd backend keeps instances under.
const ETCD_PREFIX: &str = lodestar_etcd::DEFAULT_PREFIX;

/// What services are called (then numbered).
const NAMES: [&str; 8] = [
    "orders",
    "payments",
    "inventory",
    "users",
    "search",
    "billing",
    "shipping",
    "catalog",
];
/// The zones instances run in.
const ZONES: [&str; 3] = ["eu-west-1a", "eu-west-1b", "eu-west-1c"];

/// Service number `s`.
fn service(s: usize) -> ServiceKey {
    ServiceKey::new(format!("{}-{s:05}", NAMES[s % NAMES.len()]))
}

/// A realistic instance: version, zone and two labels.
fn labelled(key: ServiceKey, address: String, s: usize, i: usize) -> Instance {
    let commit = (s as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 36;
    Instance::new(key.service.clone(), address)
        .with_service_key(key)
        .with_version(format!("1.{}.{}", s % 7, i % 3))
        .with_zone(ZONES[i % ZONES.len()])
        .with_label(
            "canary",
            if i.is_multiple_of(PER_SERVICE) {
                "true"
            } else {
                "false"
            },
        )
        .with_label("commit", format!("{commit:07x}"))
}

/// Instance number `i` (of service `i / 10`), with its own address; its id
/// is lodestar's default, `{service}-{address}`.
fn instance(i: usize) -> Instance {
    let s = i / PER_SERVICE;
    let address = format!(
        "10.{}.{}.{}:8080",
        (i >> 16) & 0xff,
        (i >> 8) & 0xff,
        i & 0xff
    );
    labelled(service(s), address, s, i)
}

/// The service the watch step follows and changes.
fn watched() -> ServiceKey {
    service(0)
}

/// Change number `j` of the watch step: a new instance of [`watched`].
fn change(j: usize) -> Instance {
    let address = format!("172.16.{}.{}:8080", (j >> 8) & 0xff, j & 0xff);
    let id = format!("{}-change-{j}", watched().service);
    labelled(watched(), address, 0, j).with_id(id)
}

/// Which change an instance id stands for, if it is one.
fn change_number(id: &str) -> Option<usize> {
    id.strip_prefix(&watched().service)?
        .strip_prefix("-change-")?
        .parse()
        .ok()
}

/// Where lodestar's etcd backend keeps the instances of `key`.
fn etcd_service_prefix(key: &ServiceKey) -> String {
    lodestar_etcd::service_prefix(ETCD_PREFIX, key)
}

/// One connection to the server, with the generated clients of its side.
#[derive(Clone)]
enum Conn {
    Lodestar(pb::registry_client::RegistryClient<Channel>),
    Etcd {
        kv: etcd::kv_client::KvClient<Channel>,
        lease: etcd::lease_client::LeaseClient<Channel>,
    },
}

impl Conn {
    /// A new connection (its own TCP connection) to `target`.
    async fn connect(side: Side, target: &str) -> Result<Conn> {
        let channel = connect(target).await?;
        Ok(match side {
            Side::Lodestar => Conn::Lodestar(pb::registry_client::RegistryClient::new(channel)),
            Side::Etcd => Conn::Etcd {
                kv: etcd::kv_client::KvClient::new(channel.clone()),
                lease: etcd::lease_client::LeaseClient::new(channel),
            },
        })
    }

    /// Registers `instance` with a [`TTL`]; returns its etcd lease (0 for
    /// lodestar).
    async fn register(&mut self, instance: &Instance) -> Result<i64> {
        match self {
            Conn::Lodestar(client) => {
                client
                    .register(pb::RegisterRequest {
                        instance: Some(lodestar_registry::to_pb(instance)),
                        ttl_ms: TTL.as_millis() as u32,
                        ..Default::default()
                    })
                    .await?;
                Ok(0)
            }
            Conn::Etcd { kv, lease } => {
                let granted = lease
                    .lease_grant(etcd::LeaseGrantRequest {
                        ttl: TTL.as_secs() as i64,
                        id: 0,
                    })
                    .await?
                    .into_inner();
                if !granted.error.is_empty() {
                    return Err(format!("lease grant: {}", granted.error).into());
                }
                let key = format!("{}{}", etcd_service_prefix(&instance.key), instance.id);
                kv.put(etcd::PutRequest {
                    key: key.into_bytes(),
                    value: serde_json::to_vec(instance)?,
                    lease: granted.id,
                    prev_kv: false,
                })
                .await?;
                Ok(granted.id)
            }
        }
    }

    /// The instances of `key`.
    async fn lookup(&mut self, key: &ServiceKey) -> Result<Vec<Instance>> {
        match self {
            Conn::Lodestar(client) => {
                let reply = client
                    .get_instances(pb::GetInstancesRequest {
                        service: Some(lodestar_registry::key_to_pb(key)),
                    })
                    .await?
                    .into_inner();
                Ok(reply
                    .instances
                    .into_iter()
                    .map(lodestar_registry::from_pb)
                    .collect())
            }
            Conn::Etcd { kv, .. } => {
                let prefix = etcd_service_prefix(key).into_bytes();
                let reply = kv
                    .range(etcd::RangeRequest {
                        range_end: lodestar_etcd::prefix_end(&prefix),
                        key: prefix,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                reply
                    .kvs
                    .iter()
                    .map(|kv| Ok(serde_json::from_slice(&kv.value)?))
                    .collect()
            }
        }
    }
}

/// A new tonic channel (one TCP connection) to `target`, `host:port`.
async fn connect(target: &str) -> Result<Channel> {
    Ok(
        tonic::transport::Endpoint::from_shared(format!("http://{target}"))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await?,
    )
}

// ---- the load generator ----

/// What the load generator does.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct LoadArgs {
    #[arg(long, value_enum)]
    side: Side,
    /// The server, `host:port`.
    #[arg(long)]
    target: String,
    /// How many instances to register (N).
    #[arg(long)]
    instances: usize,
    /// Requests in flight (K), each worker on its own connection.
    #[arg(long)]
    concurrency: usize,
    /// Load before measuring, for heartbeats and lookups.
    #[arg(long)]
    warmup_ms: u64,
    /// How long heartbeats and lookups are measured.
    #[arg(long)]
    duration_ms: u64,
    /// Watchers of the watched service (W).
    #[arg(long)]
    watchers: usize,
    /// Changes measured in the watch step.
    #[arg(long)]
    changes: usize,
    /// Changes made (and delivered) before measuring.
    #[arg(long)]
    warm_changes: usize,
    /// Concurrent writers making the changes.
    #[arg(long)]
    writers: usize,
}

/// The steps, in the order the load generator does them.
const STEPS: [&str; 4] = ["registration", "heartbeats", "lookups", "watch"];

async fn load(args: LoadArgs) -> Result<()> {
    let mut conns = Vec::with_capacity(args.concurrency);
    for _ in 0..args.concurrency.max(1) {
        conns.push(Conn::connect(args.side, &args.target).await?);
    }
    let leases = register_all(&args, &conns).await?;
    let warmup = Duration::from_millis(args.warmup_ms);
    let duration = Duration::from_millis(args.duration_ms);

    let k = conns.len();
    let heartbeats = conns
        .iter()
        .enumerate()
        .map(|(w, conn)| Heartbeats {
            conn: conn.clone(),
            keep_alive: None,
            targets: (w..args.instances)
                .step_by(k)
                .map(|i| {
                    let key = instance(i).instance_key();
                    let reference = pb::InstanceRef {
                        service: Some(lodestar_registry::key_to_pb(&key.service)),
                        id: key.id,
                    };
                    (reference, leases[i])
                })
                .collect(),
            next: 0,
        })
        .filter(|h| !h.targets.is_empty())
        .collect();
    closed_loop(STEPS[1], heartbeats, warmup, duration).await?;

    let services = args.instances.div_ceil(PER_SERVICE);
    let lookups = conns
        .iter()
        .enumerate()
        .map(|(w, conn)| Lookups {
            conn: conn.clone(),
            services,
            random: fastrand::Rng::with_seed(w as u64),
        })
        .collect();
    closed_loop(STEPS[2], lookups, warmup, duration).await?;

    watch_fan_out(&args).await
}

/// Says that a step's measured part starts (its load already running),
/// and returns the CPU time so far.
fn warm(step: &str) -> Duration {
    let cpu = harness::self_cpu_time();
    harness::say(serde_json::json!({ "warm": step }));
    cpu
}

/// Says that a step's work is about to start, waits until the orchestrator
/// has taken its readings, and returns the CPU time so far.
async fn ready(step: &str) -> Result<Duration> {
    harness::say_and_wait(
        serde_json::json!({ "warm": step, "wait": true }),
        Duration::from_secs(60),
    )
    .await?;
    Ok(harness::self_cpu_time())
}

/// Says that a step's measured part ended, and returns the CPU time it
/// took since `cpu_from`.
fn measured(step: &str, cpu_from: Duration) -> Duration {
    let cpu = harness::self_cpu_time().saturating_sub(cpu_from);
    harness::say(serde_json::json!({ "measured": step }));
    cpu
}

/// Reports a step: `ops` operations in `elapsed`, using `cpu` here.
fn report(
    step: &str,
    ops: u64,
    elapsed: Duration,
    latencies: &mut Latencies,
    cpu: Duration,
) -> Result<()> {
    let mut tally = Tally {
        ops,
        latencies: std::mem::take(latencies),
    };
    let sample = tally
        .sample(elapsed, cpu)
        .map_err(|e| format!("{step}: {e}"))?;
    harness::say(serde_json::json!({ "result": sample.to_json(), "ops": ops, "step": step }));
    Ok(())
}

/// Registers instances 0..N, K at a time; returns each one's lease.
async fn register_all(args: &LoadArgs, conns: &[Conn]) -> Result<Vec<i64>> {
    // Every connection answers once before the clock starts.
    for conn in conns {
        conn.clone().lookup(&ServiceKey::new("warm-up")).await?;
    }
    let next = Arc::new(AtomicUsize::new(0));
    let cpu_from = ready(STEPS[0]).await?;
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for conn in conns {
        let (mut conn, next, n) = (conn.clone(), next.clone(), args.instances);
        tasks.spawn(async move {
            let mut latencies = Latencies::with_capacity(n / 32 + 1);
            let mut leases = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let began = Instant::now();
                let lease = conn.register(&instance(i)).await?;
                latencies.record(began.elapsed());
                leases.push((i, lease));
            }
            Ok::<_, harness::Error>((latencies, leases))
        });
    }
    let mut latencies = Latencies::with_capacity(args.instances);
    let mut leases = vec![0; args.instances];
    while let Some(done) = tasks.join_next().await {
        let (mine, registered) = done??;
        latencies.merge(mine);
        for (i, lease) in registered {
            leases[i] = lease;
        }
    }
    let elapsed = start.elapsed();
    let cpu = measured(STEPS[0], cpu_from);
    report(
        STEPS[0],
        args.instances as u64,
        elapsed,
        &mut latencies,
        cpu,
    )?;
    Ok(leases)
}

/// One worker of a timed step: one operation at a time.
trait Worker: Send + 'static {
    /// Does one operation.
    fn op(&mut self) -> impl std::future::Future<Output = Result<()>> + Send;
}

/// Runs `workers` in a closed loop for `warmup`, then measures them for
/// `duration`, and reports the step.
async fn closed_loop<W: Worker>(
    step: &str,
    workers: Vec<W>,
    warmup: Duration,
    duration: Duration,
) -> Result<()> {
    let from = Instant::now() + warmup;
    let to = from + duration;
    let mut tasks = JoinSet::new();
    for mut worker in workers {
        tasks.spawn(async move {
            let mut latencies = Latencies::with_capacity(64 * 1024);
            loop {
                let began = Instant::now();
                if began >= to {
                    break;
                }
                worker.op().await?;
                if began >= from && Instant::now() <= to {
                    latencies.record(began.elapsed());
                }
            }
            Ok::<_, harness::Error>(latencies)
        });
    }
    tokio::time::sleep_until(from).await;
    let cpu_from = warm(step);
    tokio::time::sleep_until(to).await;
    let cpu = measured(step, cpu_from);
    let mut latencies = Latencies::default();
    while let Some(done) = tasks.join_next().await {
        latencies.merge(done??);
    }
    let ops = latencies.len() as u64;
    report(step, ops, duration, &mut latencies, cpu)
}

/// Renews its share of the leases, one after another, round and round,
/// on one keep-alive stream per worker: lodestar's `KeepAlive` (what
/// `RemoteRegistry` sends heartbeats on) and etcd's `LeaseKeepAlive`.
struct Heartbeats {
    conn: Conn,
    /// This worker's keep-alive stream, opened on first use.
    keep_alive: Option<KeepAlive>,
    /// lodestar's reference to each instance, and its etcd lease.
    targets: Vec<(pb::InstanceRef, i64)>,
    next: usize,
}

/// A bidi stream of requests out and answers back (keep-alives, watches).
struct Stream<Q, A> {
    requests: mpsc::Sender<Q>,
    responses: Streaming<A>,
}

impl<Q, A> Stream<Q, A> {
    /// Opens the stream with `open` (the side's generated call), `first`
    /// request already on its way: etcd answers the call only once it has
    /// something to say.
    async fn open<F, Fut>(first: Q, open: F) -> Result<Self>
    where
        F: FnOnce(tokio_stream::wrappers::ReceiverStream<Q>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<Streaming<A>>, tonic::Status>>,
    {
        let (requests, rx) = mpsc::channel(1);
        requests
            .send(first)
            .await
            .map_err(|_| "the request stream closed")?;
        let responses = open(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Stream {
            requests,
            responses,
        })
    }

    /// Sends `request` (unless it went when the stream was opened) and
    /// waits for its answer.
    async fn round_trip(&mut self, request: Q, sent: bool) -> Result<A> {
        if !sent {
            self.requests
                .send(request)
                .await
                .map_err(|_| "the request stream closed")?;
        }
        Ok(self
            .responses
            .message()
            .await?
            .ok_or("the server ended the stream")?)
    }
}

enum KeepAlive {
    Lodestar(Stream<pb::InstanceRef, pb::KeepAliveResponse>),
    Etcd(Stream<etcd::LeaseKeepAliveRequest, etcd::LeaseKeepAliveResponse>),
}

impl Heartbeats {
    /// Opens this worker's stream, with the first heartbeat on it.
    async fn open(&mut self, reference: &pb::InstanceRef, lease: i64) -> Result<KeepAlive> {
        Ok(match &mut self.conn {
            Conn::Lodestar(client) => KeepAlive::Lodestar(
                Stream::open(reference.clone(), |rx| client.keep_alive(rx)).await?,
            ),
            Conn::Etcd { lease: client, .. } => KeepAlive::Etcd(
                Stream::open(etcd::LeaseKeepAliveRequest { id: lease }, |rx| {
                    client.lease_keep_alive(rx)
                })
                .await?,
            ),
        })
    }
}

impl Worker for Heartbeats {
    async fn op(&mut self) -> Result<()> {
        let (reference, lease) = self.targets[self.next % self.targets.len()].clone();
        self.next += 1;
        let (stream, first) = match self.keep_alive.take() {
            Some(stream) => (stream, false),
            None => (self.open(&reference, lease).await?, true),
        };
        let stream = self.keep_alive.insert(stream);
        match stream {
            KeepAlive::Lodestar(stream) => {
                let answer = stream.round_trip(reference.clone(), first).await?;
                if answer.code != 0 {
                    return Err(format!("{}: not renewed: {}", reference.id, answer.message).into());
                }
            }
            KeepAlive::Etcd(stream) => {
                let answer = stream
                    .round_trip(etcd::LeaseKeepAliveRequest { id: lease }, first)
                    .await?;
                if answer.id != lease || answer.ttl <= 0 {
                    return Err(format!("lease {lease}: renewed {answer:?}").into());
                }
            }
        }
        Ok(())
    }
}

/// Looks up random services.
struct Lookups {
    conn: Conn,
    services: usize,
    random: fastrand::Rng,
}

impl Worker for Lookups {
    async fn op(&mut self) -> Result<()> {
        let s = self.random.usize(..self.services);
        let found = self.conn.lookup(&service(s)).await?;
        if found.len() != PER_SERVICE {
            return Err(format!(
                "service {s}: {} instances, expected {PER_SERVICE}",
                found.len()
            )
            .into());
        }
        Ok(())
    }
}

/// A watch of one service, established.
enum Watch {
    Lodestar(Streaming<pb::WatchResponse>),
    /// Its request side is kept open for as long as the watch lasts.
    Etcd(Stream<etcd::WatchRequest, etcd::WatchResponse>),
}

impl Watch {
    /// Opens a watch of `key` on its own connection, and waits until the
    /// server has set it up (lodestar's first snapshot; etcd's `created`).
    async fn open(side: Side, target: &str, key: &ServiceKey) -> Result<Watch> {
        let channel = connect(target).await?;
        match side {
            Side::Lodestar => {
                let mut responses = pb::registry_client::RegistryClient::new(channel)
                    .watch(pb::WatchRequest {
                        service: Some(lodestar_registry::key_to_pb(key)),
                        since: 0,
                    })
                    .await?
                    .into_inner();
                let first = responses
                    .message()
                    .await?
                    .ok_or("the watch ended at once")?;
                let snapshot = first.events.first().and_then(|e| e.kind.as_ref());
                if !matches!(snapshot, Some(pb::watch_event::Kind::Snapshot(_))) {
                    return Err(format!("a watch began with {first:?}, not a snapshot").into());
                }
                Ok(Watch::Lodestar(responses))
            }
            Side::Etcd => {
                let prefix = etcd_service_prefix(key).into_bytes();
                let create = etcd::WatchRequest {
                    request_union: Some(etcd::watch_request::RequestUnion::CreateRequest(
                        etcd::WatchCreateRequest {
                            range_end: lodestar_etcd::prefix_end(&prefix),
                            key: prefix,
                            ..Default::default()
                        },
                    )),
                };
                let mut client = etcd::watch_client::WatchClient::new(channel);
                let mut stream = Stream::open(create, |rx| client.watch(rx)).await?;
                let first = stream
                    .responses
                    .message()
                    .await?
                    .ok_or("the watch ended at once")?;
                if !first.created {
                    return Err(format!("a watch began with {first:?}, not `created`").into());
                }
                Ok(Watch::Etcd(stream))
            }
        }
    }

    /// Waits for the next message and adds the ids of the instances it
    /// brings (put, or in a snapshot) to `ids`.
    async fn next(&mut self, ids: &mut Vec<String>) -> Result<()> {
        match self {
            Watch::Lodestar(responses) => {
                let response = responses.message().await?.ok_or("the watch ended")?;
                for event in response.events {
                    match event.kind {
                        Some(pb::watch_event::Kind::Put(instance)) => ids.push(instance.id),
                        // A watcher that fell behind gets a snapshot instead.
                        Some(pb::watch_event::Kind::Snapshot(snapshot)) => {
                            ids.extend(snapshot.instances.into_iter().map(|i| i.id));
                        }
                        Some(pb::watch_event::Kind::Delete(_)) | None => {}
                    }
                }
            }
            Watch::Etcd(stream) => {
                let response = stream.responses.message().await?.ok_or("the watch ended")?;
                if response.canceled || response.compact_revision > 0 {
                    return Err(format!("etcd cancelled a watch: {response:?}").into());
                }
                let put = lodestar_etcd::pb::mvccpb::event::EventType::Put as i32;
                for event in response.events.into_iter().filter(|e| e.r#type == put) {
                    if let Some(kv) = event.kv {
                        ids.push(serde_json::from_slice::<Instance>(&kv.value)?.id);
                    }
                }
            }
        }
        Ok(())
    }
}

/// A change delivered to a watcher (its number, and when), or why a
/// watcher or writer stopped.
type Delivery = Result<(usize, Instant)>;

/// The watch step: W watchers of one service, writers registering new
/// instances in it, every delivery timed.
async fn watch_fan_out(args: &LoadArgs) -> Result<()> {
    let key = watched();
    let total = args.warm_changes + args.changes;
    let (deliveries, mut delivered) = mpsc::unbounded_channel::<Delivery>();
    let mut watchers = JoinSet::new();
    for _ in 0..args.watchers.max(1) {
        let mut watch = Watch::open(args.side, &args.target, &key).await?;
        let deliveries = deliveries.clone();
        watchers.spawn(async move {
            let mut seen = vec![false; total];
            let mut left = total;
            let mut ids = Vec::new();
            while left > 0 {
                ids.clear();
                if let Err(e) = watch.next(&mut ids).await {
                    let _ = deliveries.send(Err(e));
                    return;
                }
                let at = Instant::now();
                for j in ids.iter().filter_map(|id| change_number(id)) {
                    if j < total && !seen[j] {
                        seen[j] = true;
                        left -= 1;
                        let _ = deliveries.send(Ok((j, at)));
                    }
                }
            }
        });
    }
    let mut writers = Vec::with_capacity(args.writers);
    for _ in 0..args.writers.max(1) {
        writers.push(Conn::connect(args.side, &args.target).await?);
    }
    let started: Arc<Vec<OnceLock<Instant>>> =
        Arc::new((0..total).map(|_| OnceLock::new()).collect());
    let fan_out = args.watchers.max(1);
    let patience = Duration::from_secs(60);

    // Warm-up: some changes, all delivered, none measured.
    write_changes(&writers, 0..args.warm_changes, &started, &deliveries);
    collect(
        &mut delivered,
        fan_out * args.warm_changes,
        patience,
        |_, _| Ok(()),
    )
    .await?;

    let cpu_from = ready(STEPS[3]).await?;
    let start = Instant::now();
    write_changes(&writers, args.warm_changes..total, &started, &deliveries);
    drop(deliveries);
    let mut latencies = Latencies::with_capacity(fan_out * args.changes);
    let mut last = start;
    collect(&mut delivered, fan_out * args.changes, patience, |j, at| {
        let began = started
            .get(j)
            .and_then(OnceLock::get)
            .ok_or_else(|| format!("change {j} was delivered before it was made"))?;
        latencies.record(at.saturating_duration_since(*began));
        last = last.max(at);
        Ok(())
    })
    .await?;
    let cpu = measured(STEPS[3], cpu_from);
    let ops = latencies.len() as u64;
    report(STEPS[3], ops, last - start, &mut latencies, cpu)?;
    watchers.shutdown().await;
    Ok(())
}

/// Starts writers that make changes `range` between them, each noting when
/// it began; a writer that fails says so on `deliveries`.
fn write_changes(
    writers: &[Conn],
    range: std::ops::Range<usize>,
    started: &Arc<Vec<OnceLock<Instant>>>,
    deliveries: &mpsc::UnboundedSender<Delivery>,
) {
    let next = Arc::new(AtomicUsize::new(range.start));
    for conn in writers {
        let (mut conn, next, end) = (conn.clone(), next.clone(), range.end);
        let (started, deliveries) = (started.clone(), deliveries.clone());
        tokio::spawn(async move {
            loop {
                let j = next.fetch_add(1, Ordering::Relaxed);
                if j >= end {
                    return;
                }
                let _ = started[j].set(Instant::now());
                if let Err(e) = conn.register(&change(j)).await {
                    let _ = deliveries.send(Err(e));
                    return;
                }
            }
        });
    }
}

/// Takes `count` deliveries, each to `each`, within `patience`.
async fn collect(
    delivered: &mut mpsc::UnboundedReceiver<Delivery>,
    count: usize,
    patience: Duration,
    mut each: impl FnMut(usize, Instant) -> Result<()>,
) -> Result<()> {
    let deadline = Instant::now() + patience;
    for n in 0..count {
        let delivery = tokio::time::timeout_at(deadline, delivered.recv())
            .await
            .map_err(|_| format!("only {n} of {count} deliveries arrived within {patience:?}"))?
            .ok_or("every watcher stopped")??;
        each(delivery.0, delivery.1)?;
    }
    Ok(())
}

// ---- the orchestration ----

/// Server memory per registered instance.
const MEMORY_PER_INSTANCE: Metric = Metric::lower("memory/instance", "B");

/// How big and how long, for smoke and full runs.
struct Plan {
    /// The values of N.
    sizes: Vec<usize>,
    /// K: requests in flight, each worker on its own connection.
    concurrency: usize,
    /// W: watchers of the watched service.
    watchers: usize,
    /// Changes measured in the watch step.
    changes: usize,
    /// Changes made before measuring the watch step.
    warm_changes: usize,
    /// Concurrent writers making the changes.
    writers: usize,
    /// Warm-up of heartbeats and lookups.
    warmup: Duration,
    /// How long heartbeats and lookups are measured.
    duration: Duration,
}

impl Plan {
    fn new(settings: &Settings) -> Plan {
        if settings.smoke {
            Plan {
                sizes: vec![200],
                concurrency: 16,
                watchers: 10,
                changes: 20,
                warm_changes: 5,
                writers: 2,
                warmup: settings.warmup,
                duration: settings.duration,
            }
        } else {
            Plan {
                sizes: vec![1_000, 10_000, 100_000],
                concurrency: 64,
                watchers: 100,
                changes: 200,
                warm_changes: 20,
                writers: 4,
                // Six runs per repetition, and registering 100k instances
                // takes half a minute in etcd (and, for now, 20 s in
                // lodestar): heartbeats and lookups get a quarter of the
                // usual warm-up and a third of the measuring time (250 ms
                // and 1 s by default, 15,000 operations and more).
                warmup: settings.warmup / 4,
                duration: settings.duration / 3,
            }
        }
    }

    /// The name of each step's case, in [`STEPS`] order.
    fn case_names(&self, n: usize) -> Vec<String> {
        let (n, k) = (count(n), self.concurrency);
        vec![
            format!("registration, N={n}, {k} in flight"),
            format!("heartbeats, N={n}, {k} in flight"),
            format!("lookups of a 10-instance service, N={n}, {k} in flight"),
            format!(
                "watch fan-out, N={n}, {} watchers × {} registrations by {} writers (ops = deliveries; latency = registration start → seen by a watcher; etcd: lease grant + put)",
                self.watchers, self.changes, self.writers
            ),
        ]
    }

    /// How long a step may take before the run is given up.
    fn patience(&self, step: &str, n: usize) -> Duration {
        let base = Duration::from_secs(30);
        match step {
            "registration" => base + Duration::from_millis(3) * n as u32,
            "heartbeats" | "lookups" => base + self.warmup + self.duration,
            _ => base + Duration::from_secs(60),
        }
    }
}

/// 1000 as "1k", 200 as "200".
fn count(n: usize) -> String {
    if n >= 1000 && n.is_multiple_of(1000) {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}

/// Runs the scenario: for each N, the lodestar registry server and etcd
/// alternately, a fresh server for every run.
pub(crate) async fn run(settings: &Settings) -> Result<Vec<Case>> {
    eprintln!("registry: the lodestar registry server vs etcd (leases, keep-alive, range, watch)");
    let plan = Plan::new(settings);
    let etcd_binary = lodestar_tests::etcd::binary();
    let mut cases = Vec::new();
    for &n in &plan.sizes {
        let names = plan.case_names(n);
        let steps = harness::alternate_steps(
            settings,
            "registry",
            &names,
            &["lodestar", "etcd"],
            |side| {
                let (plan, etcd_binary) = (&plan, &etcd_binary);
                async move {
                    let side = match side.as_str() {
                        "lodestar" => Side::Lodestar,
                        "etcd" => Side::Etcd,
                        other => return Err(format!("unknown variant `{other}`").into()),
                    };
                    one_run(settings, plan, n, side, etcd_binary).await
                }
            },
        )
        .await?;
        cases.extend(steps);
    }
    Ok(cases)
}

/// One run: a fresh server, the load generator's four steps against it;
/// one sample per step.
async fn one_run(
    settings: &Settings,
    plan: &Plan,
    n: usize,
    side: Side,
    etcd_binary: &str,
) -> Result<Vec<Sample>> {
    let mut server = match side {
        Side::Lodestar => {
            let (proc, url) = start_server(settings.server_cpu()).await?;
            let addr = url.trim_start_matches("lodestar://").to_owned();
            Server {
                proc,
                addr,
                _data: None,
            }
        }
        Side::Etcd => start_etcd(settings, etcd_binary).await?,
    };
    let args: Vec<String> = [
        "registry",
        "load",
        "--side",
        match side {
            Side::Lodestar => "lodestar",
            Side::Etcd => "etcd",
        },
        "--target",
        &server.addr,
        "--instances",
        &n.to_string(),
        "--concurrency",
        &plan.concurrency.to_string(),
        "--warmup-ms",
        &plan.warmup.as_millis().to_string(),
        "--duration-ms",
        &plan.duration.as_millis().to_string(),
        "--watchers",
        &plan.watchers.to_string(),
        "--changes",
        &plan.changes.to_string(),
        "--warm-changes",
        &plan.warm_changes.to_string(),
        "--writers",
        &plan.writers.to_string(),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let mut load = Proc::spawn_self("registry load", settings.client_cpu(), &args)?;
    let mut samples = Vec::with_capacity(STEPS.len());
    for step in STEPS {
        let patience = plan.patience(step, n);
        let marker = load.expect_message("warm", patience).await?;
        let (cpu_from, rss_from) = (server.proc.cpu_time()?, server.proc.anon_rss()?);
        if marker.get("wait").is_some() {
            load.go().await?;
        }
        load.expect("measured", patience).await?;
        let (cpu_to, rss_to) = (server.proc.cpu_time()?, server.proc.anon_rss()?);
        let result = load.message(patience).await?;
        let (mut sample, ops) =
            Sample::from_load(&result).map_err(|e| format!("registry load, {step}: {e}"))?;
        sample.set(
            harness::SERVER_CPU,
            (cpu_to - cpu_from).as_secs_f64() * 1e6 / ops,
        );
        if step == "registration" {
            let grown = rss_to as f64 - rss_from as f64;
            sample.set(MEMORY_PER_INSTANCE, grown / n as f64);
        }
        sample.set(harness::SERVER_RSS, harness::mib(server.proc.peak_rss()?));
        samples.push(sample);
    }
    load.wait(Duration::from_secs(10)).await?;
    server.proc.kill().await?;
    Ok(samples)
}

/// A server under test: its process, its `host:port`, and its data
/// directory (etcd), removed when dropped.
struct Server {
    proc: Proc,
    addr: String,
    _data: Option<DataDir>,
}

/// A temporary directory, removed when dropped.
struct DataDir(PathBuf);

impl Drop for DataDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A single etcd member on free loopback ports with a fresh data
/// directory, pinned like lodestar's server, answering.
async fn start_etcd(settings: &Settings, binary: &str) -> Result<Server> {
    let client = SocketAddr::from(([127, 0, 0, 1], lodestar_tests::free_port()));
    let peer = format!("http://127.0.0.1:{}", lodestar_tests::free_port());
    let data = DataDir(std::env::temp_dir().join(format!(
        "lodestar-bench-etcd-{}",
        lodestar_tests::unique_name()
    )));
    let client_url = format!("http://{client}");
    let args: Vec<String> = [
        "--name",
        "bench",
        "--data-dir",
        &data.0.to_string_lossy(),
        "--listen-client-urls",
        &client_url,
        "--advertise-client-urls",
        &client_url,
        "--listen-peer-urls",
        &peer,
        "--initial-advertise-peer-urls",
        &peer,
        "--initial-cluster",
        &format!("bench={peer}"),
        "--initial-cluster-state",
        "new",
        // A single member elects itself after one election timeout.
        "--heartbeat-interval",
        "50",
        "--election-timeout",
        "300",
        "--logger",
        "zap",
        "--log-level",
        "error",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let proc = Proc::spawn("etcd", settings.server_cpu(), binary, &args)?;
    let addr = client.to_string();
    etcd_ready(&addr, Duration::from_secs(20)).await?;
    Ok(Server {
        proc,
        addr,
        _data: Some(data),
    })
}

/// Waits until etcd at `addr` answers and has a leader, for at most
/// `patience`.
async fn etcd_ready(addr: &str, patience: Duration) -> Result<()> {
    let deadline = Instant::now() + patience;
    loop {
        let answer = tokio::time::timeout_at(deadline, etcd_has_leader(addr))
            .await
            .map_err(|_| format!("etcd at {addr} not ready within {patience:?}"))?;
        if matches!(answer, Ok(true)) {
            return Ok(());
        }
        // Not listening yet, or no leader yet: ask again shortly.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether etcd at `addr` answers, with a leader.
async fn etcd_has_leader(addr: &str) -> Result<bool> {
    let status = etcd::maintenance_client::MaintenanceClient::new(connect(addr).await?)
        .status(etcd::StatusRequest {})
        .await?
        .into_inner();
    Ok(status.leader != 0)
}

//! The resilience scenario: what configured retries cost a failing service
//! with and without a retry budget, and what hedging does to a tail.
//!
//! - **Retry storm**: client → A → B → C, each a lodestar service (its own
//!   process, registered in a fresh registry server per run); A and B
//!   serve `Unary` by calling the next hop, C fails every call with
//!   `UNAVAILABLE`. Every hop (the client included) retries `Unary` up to
//!   3 attempts (backoff 1 to 5 ms). The client calls A at a fixed rate.
//!   Reported: calls reaching C per client call (no budget: up to 3³ =
//!   27; with the default budget of 20% + 10/s at each hop, about 1.2³ ≈
//!   1.7 plus the floors).
//! - **Tail**: three instances, each holding 1% of its calls 500 ms; the
//!   client calls at a fixed rate ([`TAIL_RATE`]). Reported: latency
//!   percentiles of the calls started in the window (however late they
//!   end), and the extra calls hedging sent (hedged at the method's p95, at
//!   least 10 ms, one hedge per call, within the default budget).
//! - **Cost**: lodestar's client and server with their resilience layers on
//!   at their defaults, and nothing tripping them, against the same stack
//!   with them off: throughput, CPU and the client's allocations per call.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lodestar::client::observe::{Attempt, Decision, DecisionKind, Observer};
use lodestar::client::policy::{HedgeSettings, MethodPolicy, Policy, RetrySettings};
use tonic::{Request, Response, Status, Streaming};

use crate::harness::{self, Case, Latencies, Metric, Proc, Result, Sample, Settings};
use crate::rpc::{self, pb};

/// Client calls per second in the storm case.
const STORM_RATE: u32 = 200;
/// Client calls per second in the tail case: a fixed rate, so that both
/// variants load the servers alike (in a closed loop, the calls held
/// without hedging would slow the whole load down).
const TAIL_RATE: u32 = 2_000;
/// The hops of the storm, the last failing.
const HOPS: [&str; 3] = ["storm-a", "storm-b", "storm-c"];
/// The service of the tail case.
const TAIL: &str = "tail";
/// The share of its calls each tail instance holds.
const STALL_SHARE: f64 = 0.01;
/// How long it holds them.
const STALL: Duration = Duration::from_millis(500);

/// Calls that reached C, per call the client made.
const AMPLIFICATION: Metric = Metric::lower("calls reaching C per call", "calls");
/// Extra attempts (hedges) per call.
const EXTRA: Metric = Metric::lower("extra calls", "%");

/// The child processes of this scenario.
#[derive(clap::Subcommand, Debug)]
pub(crate) enum Child {
    /// One instance; says `{"ready": {"addr": …}}`.
    Server {
        #[arg(long)]
        registry: String,
        #[arg(long)]
        service: String,
        #[arg(long)]
        id: String,
        /// Fail every call with `UNAVAILABLE`.
        #[arg(long)]
        fail: bool,
        /// Serve each call by calling this service (with retries).
        #[arg(long)]
        next: Option<String>,
        /// Hold this share of the calls for [`STALL`].
        #[arg(long, default_value_t = 0.0)]
        stall_share: f64,
        /// Whether its retries are held to a budget.
        #[arg(long)]
        budget: bool,
    },
    /// The load; says `{"warm": true}`, then `{"result": {…}}`.
    Client {
        #[arg(long)]
        registry: String,
        /// The storm case (else the tail case).
        #[arg(long)]
        storm: bool,
        /// Storm: budgets on; tail: hedging on.
        #[arg(long)]
        on: bool,
        #[arg(long)]
        warmup_ms: u64,
        #[arg(long)]
        duration_ms: u64,
    },
}

/// Runs a child process of this scenario.
pub(crate) async fn child(child: Child) -> Result<()> {
    match child {
        Child::Server {
            registry,
            service,
            id,
            fail,
            next,
            stall_share,
            budget,
        } => serve(&registry, &service, id, fail, next, stall_share, budget).await,
        Child::Client {
            registry,
            storm,
            on,
            warmup_ms,
            duration_ms,
        } => {
            let (warmup, duration) = (
                Duration::from_millis(warmup_ms),
                Duration::from_millis(duration_ms),
            );
            if storm {
                storm_load(&registry, on, warmup, duration).await
            } else {
                tail_load(&registry, on, warmup, duration).await
            }
        }
    }
}

/// The policy of every client of the scenario: round robin (so that the
/// tail's stalls are spread as the instances hold them), `Unary` retried
/// (`retry`) or hedged, with or without a `budget`.
fn policy(retry: bool, hedge: bool, budget: bool) -> Policy {
    let mut policy = Policy::default();
    policy.strategy = lodestar::client::Strategy::RoundRobin;
    policy.outlier.enabled = false;
    let mut entry = MethodPolicy::default();
    entry.names = vec!["Unary".to_owned()];
    if retry {
        let mut settings = RetrySettings::default();
        settings.max_attempts = 3;
        settings.initial_backoff_ms = 1;
        settings.max_backoff_ms = 5;
        entry.retry = Some(settings);
    }
    if hedge {
        entry.hedge = Some(HedgeSettings::default());
    }
    policy.methods = vec![entry];
    policy.retry_budget.enabled = budget;
    policy
}

fn client(registry: &str, policy: Policy, observer: Option<Hedges>) -> Result<lodestar::Client> {
    let mut builder = lodestar::Client::builder(lodestar_registry::from_url(registry)?)
        .policy(policy)?
        .timeout(Duration::from_secs(10));
    if let Some(observer) = observer {
        builder = builder.observe(observer);
    }
    Ok(builder.build())
}

// ---- the instances ----

type PayloadStream = Pin<Box<dyn futures_util::Stream<Item = Result<pb::Payload, Status>> + Send>>;

/// One instance: counts its calls, and fails, forwards or stalls them.
#[derive(Clone)]
struct Instance {
    calls: Arc<AtomicU64>,
    fail: bool,
    next: Option<pb::bench_client::BenchClient<lodestar::client::Channel>>,
    stall_share: f64,
}

#[tonic::async_trait]
impl pb::bench_server::Bench for Instance {
    async fn unary(&self, request: Request<pb::Payload>) -> Result<Response<pb::Payload>, Status> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if self.fail {
            return Err(Status::unavailable("this instance fails every call"));
        }
        if let Some(next) = &self.next {
            return next.clone().unary(request.into_inner()).await;
        }
        if fastrand::f64() < self.stall_share {
            tokio::time::sleep(STALL).await;
        }
        Ok(Response::new(request.into_inner()))
    }

    type ServerStreamStream = PayloadStream;

    /// The calls this instance has had, as one message of 8 bytes.
    async fn server_stream(
        &self,
        _request: Request<pb::StreamRequest>,
    ) -> Result<Response<Self::ServerStreamStream>, Status> {
        let count = pb::Payload {
            body: self.calls.load(Ordering::Relaxed).to_le_bytes().to_vec(),
        };
        Ok(Response::new(Box::pin(tokio_stream::once(Ok(count)))))
    }

    type PingPongStream = PayloadStream;

    async fn ping_pong(
        &self,
        _request: Request<Streaming<pb::Payload>>,
    ) -> Result<Response<Self::PingPongStream>, Status> {
        Err(Status::unimplemented(
            "the resilience scenario calls Unary only",
        ))
    }
}

async fn serve(
    registry: &str,
    service: &str,
    id: String,
    fail: bool,
    next: Option<String>,
    stall_share: f64,
    budget: bool,
) -> Result<()> {
    let next = match next {
        Some(next) => {
            let client = client(registry, policy(true, false, budget), None)?;
            Some(pb::bench_client::BenchClient::by_name(&client, &next))
        }
        None => None,
    };
    let instance = Instance {
        calls: Arc::new(AtomicU64::new(0)),
        fail,
        next,
        stall_share,
    };
    let running = lodestar::Service::builder(service)
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .registry(lodestar_registry::from_url(registry)?)
        .add_service(pb::bench_server::BenchServer::new(instance))
        .id(id)
        .start()
        .await?;
    harness::say(serde_json::json!({ "ready": { "addr": running.local_addr().to_string() } }));
    lodestar::server::shutdown_signal().await;
    running.shutdown().await?;
    Ok(())
}

// ---- the load ----

/// Counts the hedges a client sends.
#[derive(Clone, Default)]
struct Hedges(Arc<AtomicU64>);

impl Observer for Hedges {
    fn attempt(&self, _attempt: &Attempt<'_>) {}

    fn decided(&self, decision: &Decision<'_>) {
        if matches!(decision.kind, DecisionKind::Hedge { .. }) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The calls C has had so far.
async fn calls_at_c(client: &lodestar::Client) -> Result<u64> {
    let mut c = pb::bench_client::BenchClient::by_name(client, HOPS[2]);
    let mut stream = c
        .server_stream(pb::StreamRequest { count: 1, size: 0 })
        .await?
        .into_inner();
    let message = stream.message().await?.ok_or("C sent no count")?;
    let bytes: [u8; 8] = message
        .body
        .as_slice()
        .try_into()
        .map_err(|_| "C's count is not 8 bytes")?;
    Ok(u64::from_le_bytes(bytes))
}

async fn storm_load(
    registry: &str,
    budget: bool,
    warmup: Duration,
    duration: Duration,
) -> Result<()> {
    let client = client(registry, policy(true, false, budget), None)?;
    let a = pb::bench_client::BenchClient::by_name(&client, HOPS[0]);
    let call = |mut a: pb::bench_client::BenchClient<lodestar::client::Channel>| async move {
        let _ = a.unary(pb::Payload { body: vec![0; 16] }).await;
    };
    // Every hop discovered and connected, then the load, then the window.
    call(a.clone()).await;
    let mut tick = tokio::time::interval(Duration::from_secs(1) / STORM_RATE);
    let start = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    while start.elapsed() < warmup {
        tick.tick().await;
        calls.spawn(call(a.clone()));
    }
    while calls.join_next().await.is_some() {}
    harness::say(serde_json::json!({ "warm": true }));
    let before = calls_at_c(&client).await?;
    let measured = Instant::now();
    let mut made = 0u64;
    while measured.elapsed() < duration {
        tick.tick().await;
        calls.spawn(call(a.clone()));
        made += 1;
    }
    while calls.join_next().await.is_some() {}
    let reached = calls_at_c(&client).await? - before;
    let mut sample = Sample::default();
    sample.set(AMPLIFICATION, reached as f64 / made.max(1) as f64);
    harness::say(serde_json::json!({ "result": sample.to_json() }));
    Ok(())
}

async fn tail_load(
    registry: &str,
    hedge: bool,
    warmup: Duration,
    duration: Duration,
) -> Result<()> {
    let hedges = Hedges::default();
    let client = client(registry, policy(false, hedge, true), Some(hedges.clone()))?;
    let tail = pb::bench_client::BenchClient::by_name(&client, TAIL);
    for _ in 0..30 {
        let _ = tail.clone().unary(pb::Payload { body: vec![0; 16] }).await;
    }
    let mut latencies = Latencies::with_capacity(1 << 16);
    let mut tick = tokio::time::interval(Duration::from_secs(1) / TAIL_RATE);
    let start = Instant::now();
    let measure_from = start + warmup;
    let measure_to = measure_from + duration;
    let mut hedged_before = None;
    let mut calls = tokio::task::JoinSet::new();
    loop {
        // Latency from when the call was due: a late start counts.
        let due = tick.tick().await.into_std();
        if due >= measure_to {
            break;
        }
        let measured = due >= measure_from;
        if measured && hedged_before.is_none() {
            hedged_before = Some(hedges.0.load(Ordering::Relaxed));
            harness::say(serde_json::json!({ "warm": true }));
        }
        let mut tail = tail.clone();
        calls.spawn(async move {
            let ok = tail.unary(pb::Payload { body: vec![0; 16] }).await.is_ok();
            // Every call due in the window, however late it ends: the
            // calls held longest are the tail being measured.
            (ok && measured).then(|| due.elapsed())
        });
        // Reap what finished, so the set holds only calls in flight.
        while let Some(done) = calls.try_join_next() {
            if let Some(latency) = done? {
                latencies.record(latency);
            }
        }
    }
    while let Some(done) = calls.join_next().await {
        if let Some(latency) = done? {
            latencies.record(latency);
        }
    }
    let hedged_before = hedged_before.ok_or("the measured window never began")?;
    let hedged = hedges.0.load(Ordering::Relaxed) - hedged_before;
    let calls = latencies.len();
    if calls == 0 {
        return Err("no call succeeded in the measured window".into());
    }
    let mut sample = Sample::default();
    sample
        .set(harness::THROUGHPUT, calls as f64 / duration.as_secs_f64())
        .latencies(&mut latencies)
        .set(EXTRA, 100.0 * hedged as f64 / calls as f64);
    harness::say(serde_json::json!({ "result": sample.to_json() }));
    Ok(())
}

// ---- the orchestration ----

/// Runs the scenario.
pub(crate) async fn run(settings: &Settings) -> Result<Vec<Case>> {
    eprintln!(
        "resilience: a retry storm with and without budgets; a tail with and without hedging"
    );
    let storm = harness::alternate(
        settings,
        "resilience",
        format!(
            "retry storm: client → A → B → C, C failing every call, 3 attempts per hop, {STORM_RATE} calls/s; lodestar: budget 20% + 10/s per hop"
        ),
        &["lodestar", "lodestar, no budget"],
        |variant| async move { one_run(settings, true, variant == "lodestar").await },
    )
    .await?;
    let tail = harness::alternate(
        settings,
        "resilience",
        format!(
            "tail: 3 instances each holding 1% of calls 500 ms, {TAIL_RATE} calls/s; lodestar: hedged at p95 (≥ 10 ms), 1 hedge"
        ),
        &["lodestar", "lodestar, no hedging"],
        |variant| async move { one_run(settings, false, variant == "lodestar").await },
    )
    .await?;
    let cost = rpc::cost(
        settings,
        "resilience",
        &COST,
        [
            (
                "lodestar",
                rpc::Server::Lodestar(&rpc::RESILIENT_SERVER),
                &["--resilience"],
            ),
            (
                "lodestar, resilience off",
                rpc::Server::of(rpc::Side::Lodestar),
                &[],
            ),
        ],
    )
    .await?;
    Ok(vec![storm, tail, cost])
}

/// The cost case: what the resilience layers cost per call when they are on
/// at their defaults and nothing trips them (`rpc::resilient_client_policy`,
/// `rpc::RESILIENT_SERVER`), against the same stack with them off.
const COST: rpc::RpcCase = rpc::RpcCase {
    name: "cost: unary, empty payload, 32 in flight, lodestar → lodestar; lodestar: resilience on (client bulkhead, breaker and retries on every method, default budget; server rate and concurrency limits on every method)",
    call: "unary",
    size: 0,
    concurrency: 32,
    rate: None,
};

async fn one_run(settings: &Settings, storm: bool, on: bool) -> Result<Sample> {
    let (_registry, registry_url) = crate::registry::start_server(settings.server_cpu()).await?;
    let run = lodestar_tests::unique_name();
    let mut servers = Vec::new();
    let mut spawn = |service: &str, index: usize, extra: &[String]| -> Result<()> {
        let mut args = vec![
            "resilience".to_owned(),
            "server".to_owned(),
            "--registry".to_owned(),
            registry_url.clone(),
            "--service".to_owned(),
            service.to_owned(),
            "--id".to_owned(),
            format!("{service}-{run}-{index}"),
        ];
        args.extend_from_slice(extra);
        servers.push(Proc::spawn_self(
            "resilience server",
            settings.server_cpu(),
            &args,
        )?);
        Ok(())
    };
    if storm {
        let budget: &[String] = if on { &["--budget".to_owned()] } else { &[] };
        let next =
            |hop: &str| [vec!["--next".to_owned(), hop.to_owned()], budget.to_vec()].concat();
        spawn(HOPS[0], 0, &next(HOPS[1]))?;
        spawn(HOPS[1], 0, &next(HOPS[2]))?;
        spawn(HOPS[2], 0, &["--fail".to_owned()])?;
    } else {
        for index in 0..3 {
            spawn(
                TAIL,
                index,
                &["--stall-share".to_owned(), STALL_SHARE.to_string()],
            )?;
        }
    }
    for server in &mut servers {
        server.expect("ready", Duration::from_secs(10)).await?;
    }
    let (warmup, duration) = if settings.smoke {
        (settings.warmup / 2, settings.duration / 2)
    } else {
        (settings.warmup, settings.duration)
    };
    let mut args = vec![
        "resilience".to_owned(),
        "client".to_owned(),
        "--registry".to_owned(),
        registry_url.clone(),
        "--warmup-ms".to_owned(),
        warmup.as_millis().to_string(),
        "--duration-ms".to_owned(),
        duration.as_millis().to_string(),
    ];
    if storm {
        args.push("--storm".to_owned());
    }
    if on {
        args.push("--on".to_owned());
    }
    let mut client = Proc::spawn_self("resilience client", settings.client_cpu(), &args)?;
    let patience = warmup + duration + Duration::from_secs(60);
    client.expect("warm", patience).await?;
    let result = client.expect("result", patience).await?;
    client.wait(Duration::from_secs(10)).await?;
    let metrics: &[Metric] = if storm {
        &[AMPLIFICATION]
    } else {
        &[
            harness::THROUGHPUT,
            harness::P50,
            harness::P99,
            harness::P999,
            EXTRA,
        ]
    };
    let sample = Sample::from_json(&result, metrics)?;
    for mut server in servers {
        server.terminate().await?;
    }
    Ok(sample)
}

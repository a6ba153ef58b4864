//! The failover scenario: three instances of the benchmark service under a
//! steady load of idempotent unary calls; one is SIGKILLed a third of the
//! way into the measured window. Reported: calls that failed, and the time
//! from the kill to the last failure.
//!
//! lodestar's side finds the instances through a registry server (the dead
//! one stays registered until its lease runs out, 6 s later, so the client
//! has to cope on its own). The peer is what tonic offers out of the box:
//! a `Channel::balance_list` over the same three addresses, with tonic's
//! own servers.

use std::time::{Duration, Instant};

use crate::harness::{self, Case, Latencies, Metric, Proc, Result, Sample, Settings};
use crate::rpc::{self, Side, pb, raw};

/// Calls that failed.
const FAILED: Metric = Metric::lower("failed calls", "calls");
/// From the kill to the last failed call.
const RECOVERY: Metric = Metric::lower("kill → last failure", "ms");
/// The slowest call.
const MAX: Metric = Metric::lower("max latency", "µs");

/// The child processes of this scenario.
#[derive(clap::Subcommand, Debug)]
pub(crate) enum Child {
    /// Calls the service at a fixed rate, SIGKILLs `victim` a third of the
    /// way into the measured window, and reports what failed.
    Client {
        #[arg(long, value_enum)]
        side: Side,
        /// The registry URL (lodestar) or the instances' addresses (tonic).
        #[arg(long, value_delimiter = ',')]
        target: Vec<String>,
        /// The pid to SIGKILL.
        #[arg(long)]
        victim: i32,
        #[arg(long)]
        rate: u64,
        #[arg(long)]
        warmup_ms: u64,
        #[arg(long)]
        duration_ms: u64,
    },
}

/// Runs a child process of this scenario.
pub(crate) async fn child(child: Child) -> Result<()> {
    match child {
        Child::Client {
            side,
            target,
            victim,
            rate,
            warmup_ms,
            duration_ms,
        } => {
            load(
                side,
                &target,
                victim,
                rate,
                Duration::from_millis(warmup_ms),
                Duration::from_millis(duration_ms),
            )
            .await
        }
    }
}

/// One side's client.
#[derive(Clone)]
enum Caller {
    Lodestar(pb::bench_client::BenchClient<lodestar::client::Channel>),
    Raw(raw::bench_client::BenchClient<tonic::transport::Channel>),
}

impl Caller {
    async fn new(side: Side, target: &[String]) -> Result<Caller> {
        Ok(match side {
            Side::Lodestar => {
                let url = target.first().ok_or("no registry URL")?;
                let client = lodestar::Client::builder(lodestar_registry::from_url(url)?).build();
                Caller::Lodestar(pb::bench_client::BenchClient::by_name(
                    &client,
                    rpc::SERVICE,
                ))
            }
            Side::Tonic => Caller::Raw(raw::bench_client::BenchClient::new(
                rpc::tonic_balance_list(target)?,
            )),
        })
    }

    async fn call(mut self) -> bool {
        let body = vec![0x5Au8; 128];
        match &mut self {
            Caller::Lodestar(c) => c.unary(pb::Payload { body }).await.is_ok(),
            Caller::Raw(c) => c.unary(raw::Payload { body }).await.is_ok(),
        }
    }
}

async fn load(
    side: Side,
    target: &[String],
    victim: i32,
    rate: u64,
    warmup: Duration,
    duration: Duration,
) -> Result<()> {
    let caller = Caller::new(side, target).await?;
    // Everything connected and discovered before the clock starts.
    for _ in 0..30 {
        caller.clone().call().await;
    }
    let start = Instant::now();
    let measure_from = start + warmup;
    let kill_at = measure_from + duration / 3;
    let measure_to = measure_from + duration;
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let mut inflight = tokio::task::JoinSet::new();
    let mut killed = false;
    let mut next = start;
    let mut ok = 0u64;
    let mut failed = 0u64;
    let mut last_failure: Option<Instant> = None;
    let mut latencies = Latencies::with_capacity((rate as usize) * 8);
    let mut record = |scheduled: Instant, started: Instant, done: Instant, success: bool| {
        if scheduled < measure_from {
            return;
        }
        latencies.record(done - started);
        if success {
            ok += 1;
        } else {
            failed += 1;
            last_failure = Some(last_failure.map_or(done, |t: Instant| t.max(done)));
        }
    };
    harness::say(serde_json::json!({ "warm": true }));
    while next < measure_to {
        tokio::time::sleep_until(next.into()).await;
        if !killed && Instant::now() >= kill_at {
            // SAFETY: kill(2) on the pid the orchestrator gave us.
            unsafe { libc::kill(victim, libc::SIGKILL) };
            killed = true;
        }
        while next <= Instant::now() && next < measure_to {
            let scheduled = next;
            next += interval;
            let call = caller.clone().call();
            let started = Instant::now();
            inflight.spawn(async move {
                let success = call.await;
                (scheduled, started, Instant::now(), success)
            });
        }
        while let Some(done) = inflight.try_join_next() {
            let (scheduled, started, at, success) = done?;
            record(scheduled, started, at, success);
        }
    }
    let drain = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(done) = inflight.join_next().await {
            let (scheduled, started, at, success) = done?;
            record(scheduled, started, at, success);
        }
        Ok::<_, harness::Error>(())
    });
    drain
        .await
        .map_err(|_| "calls still running 30 s after the load ended")??;
    let recovery = last_failure.map_or(0.0, |t| {
        t.saturating_duration_since(kill_at).as_secs_f64() * 1000.0
    });
    let mut sample = Sample::default();
    sample
        .set(FAILED, failed as f64)
        .set(RECOVERY, recovery)
        .set(harness::THROUGHPUT, ok as f64 / duration.as_secs_f64())
        .latencies(&mut latencies)
        .set(MAX, latencies.max_us());
    harness::say(serde_json::json!({ "result": sample.to_json() }));
    Ok(())
}

/// Runs the scenario.
pub(crate) async fn run(settings: &Settings) -> Result<Vec<Case>> {
    eprintln!("failover: SIGKILL one of three instances under load");
    let rate = 1000;
    let case = harness::alternate(
        settings,
        "failover",
        format!("unary, idempotent, fixed {rate} calls/s, 1 of 3 instances SIGKILLed"),
        &["lodestar", "tonic balance_list"],
        |variant| async move {
            let side = if variant == "lodestar" {
                Side::Lodestar
            } else {
                Side::Tonic
            };
            one_run(settings, side, rate).await
        },
    )
    .await?;
    Ok(vec![case])
}

async fn one_run(settings: &Settings, side: Side, rate: u64) -> Result<Sample> {
    // A registry of its own: the instance killed in one run must not be
    // found (still leased) by the next.
    let (_registry, registry_url) = crate::registry::start_server(settings.server_cpu()).await?;
    let registry_url = registry_url.as_str();
    let mut servers = Vec::new();
    let mut addresses = Vec::new();
    let run = lodestar_tests::unique_name();
    for i in 0..3 {
        let id = format!("failover-{run}-{i}");
        let (server, addr) =
            rpc::start_server(settings, rpc::Server::of(side), registry_url, Some(&id)).await?;
        servers.push(server);
        addresses.push(addr);
    }
    let target = match side {
        Side::Lodestar => registry_url.to_owned(),
        Side::Tonic => addresses.join(","),
    };
    // Long enough after the kill for the client to settle.
    let duration = settings.duration.max(Duration::from_millis(600)) * 2;
    let args = vec![
        "failover".to_owned(),
        "client".to_owned(),
        "--side".to_owned(),
        format!("{side:?}").to_lowercase(),
        "--target".to_owned(),
        target,
        "--victim".to_owned(),
        servers[1].pid().to_string(),
        "--rate".to_owned(),
        rate.to_string(),
        "--warmup-ms".to_owned(),
        settings.warmup.as_millis().to_string(),
        "--duration-ms".to_owned(),
        duration.as_millis().to_string(),
    ];
    let mut client = Proc::spawn_self("failover client", settings.client_cpu(), &args)?;
    let patience = settings.warmup + duration + Duration::from_secs(40);
    client.expect("warm", patience).await?;
    let result = client.expect("result", patience).await?;
    client.wait(Duration::from_secs(10)).await?;
    let sample = Sample::from_json(
        &result,
        &[
            FAILED,
            RECOVERY,
            harness::THROUGHPUT,
            harness::P50,
            harness::P99,
            harness::P999,
            MAX,
        ],
    )?;
    for (i, mut server) in servers.into_iter().enumerate() {
        if i == 1 {
            // Already SIGKILLed by the client; reap it.
            server.kill().await.ok();
        } else {
            server.terminate().await?;
        }
    }
    Ok(sample)
}

//! The overload scenario: a server whose handler has a fixed capacity,
//! offered 0.5×, 1×, 2× and 4× that capacity, with and without lodestar's
//! adaptive load shedding.
//!
//! The server (its own process, pinned to the server core) is a lodestar
//! service whose `Unary` handler takes one of [`WORKERS`] workers (a
//! semaphore) for [`SERVICE_TIME`] each: a capacity of 800 calls/s that
//! costs no CPU, as a pool or a database would. The load generator (pinned
//! to the client core) starts calls on schedule, at a fixed rate whatever
//! the server does (open loop), over one tonic connection, each with a 1 s
//! deadline. Reported: goodput (calls that succeeded within the window,
//! per second), the latency of the calls sent in the window that
//! succeeded (from when each was sent), and the share of those shed
//! (`RESOURCE_EXHAUSTED`) and failed otherwise (`DEADLINE_EXCEEDED`:
//! queued past their deadline). Without
//! shedding, calls beyond the capacity queue for a worker until their
//! deadline; with it, they are refused at once and the queue stays short.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};

use lodestar::server::policy::Policy;

use crate::harness::{self, Case, Latencies, Metric, Proc, Result, Sample, Settings};
use crate::rpc::{UnaryOnly, UnaryServer, pb, raw};

/// Workers of the handler.
const WORKERS: usize = 8;
/// Each call's time in a worker.
const SERVICE_TIME: Duration = Duration::from_millis(10);
/// Calls per second the handler can take: `WORKERS / SERVICE_TIME`.
const CAPACITY: f64 = 800.0;
/// Each call's deadline.
const DEADLINE: Duration = Duration::from_secs(1);
/// The offered loads, as multiples of the capacity.
const LOADS: [f64; 4] = [0.5, 1.0, 2.0, 4.0];

/// Calls that succeeded, per second.
const GOODPUT: Metric = Metric::higher("goodput", "calls/s");
/// Calls shed.
const SHED: Metric = Metric::lower("shed", "%");
/// Calls that failed otherwise (past their deadline).
const FAILED: Metric = Metric::lower("failed (deadline)", "%");

/// The two variants: lodestar with adaptive shedding, and without.
const ADAPTIVE: &str = "lodestar";
const UNLIMITED: &str = "lodestar without shedding";

/// The child processes of this scenario.
#[derive(clap::Subcommand, Debug)]
pub(crate) enum Child {
    /// The server; says `{"ready": {"addr": …}}`.
    Server {
        /// With an adaptive concurrency limit on `Unary`.
        #[arg(long)]
        adaptive: bool,
    },
    /// The load; says `{"warm": true}`, then `{"result": {…}}`.
    Client {
        #[arg(long)]
        addr: String,
        /// Calls per second.
        #[arg(long)]
        rate: f64,
        #[arg(long)]
        warmup_ms: u64,
        #[arg(long)]
        duration_ms: u64,
    },
}

/// Runs a child process of this scenario.
pub(crate) async fn child(child: Child) -> Result<()> {
    match child {
        Child::Server { adaptive } => serve(adaptive).await,
        Child::Client {
            addr,
            rate,
            warmup_ms,
            duration_ms,
        } => {
            load(
                &addr,
                rate,
                Duration::from_millis(warmup_ms),
                Duration::from_millis(duration_ms),
            )
            .await
        }
    }
}

// ---- the server ----

/// A handler with [`WORKERS`] workers.
#[derive(Debug, Clone)]
struct Workers(Arc<Semaphore>);

#[tonic::async_trait]
impl UnaryOnly for Workers {
    const SCENARIO: &'static str = "overload";

    async fn unary(&self, _request: Request<pb::Payload>) -> Result<Response<pb::Payload>, Status> {
        let _worker = self
            .0
            .acquire()
            .await
            .map_err(|_| Status::internal("the workers are gone"))?;
        tokio::time::sleep(SERVICE_TIME).await;
        Ok(Response::new(pb::Payload { body: Vec::new() }))
    }
}

async fn serve(adaptive: bool) -> Result<()> {
    let policy = if adaptive {
        Policy::from_toml(
            "[[methods]]\nnames = [\"lodestar.bench.v1.Bench/Unary\"]\nconcurrency = { adaptive = {} }",
        )?
    } else {
        Policy::default()
    };
    let running = lodestar::Service::builder(crate::rpc::SERVICE)
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .policy(policy)?
        .add_service(pb::bench_server::BenchServer::new(UnaryServer(Workers(
            Arc::new(Semaphore::new(WORKERS)),
        ))))
        .start()
        .await?;
    harness::say(serde_json::json!({ "ready": { "addr": running.local_addr().to_string() } }));
    lodestar::server::shutdown_signal().await;
    running.shutdown().await?;
    Ok(())
}

// ---- the load ----

/// How one call in the window ended.
#[derive(Debug, Clone, Copy)]
enum Ended {
    Ok(Duration),
    Shed,
    Failed,
}

async fn load(addr: &str, rate: f64, warmup: Duration, duration: Duration) -> Result<()> {
    let client =
        raw::bench_client::BenchClient::new(crate::rpc::tonic_balance_list(&[addr.to_owned()])?);
    // Connected before the clock starts.
    for _ in 0..4 {
        let _ = client
            .clone()
            .unary(raw::Payload { body: Vec::new() })
            .await;
    }
    let gap = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    let measure_from = start + warmup;
    let measure_to = measure_from + duration;
    let mut calls = tokio::task::JoinSet::new();
    let mut warm = false;
    let mut n: u32 = 0;
    loop {
        let due = start + gap * n;
        if due >= measure_to {
            break;
        }
        if !warm && due >= measure_from {
            warm = true;
            harness::say(serde_json::json!({ "warm": true }));
        }
        tokio::time::sleep_until(due.into()).await;
        n += 1;
        let counted = due >= measure_from;
        let mut client = client.clone();
        calls.spawn(async move {
            let mut request = Request::new(raw::Payload { body: Vec::new() });
            request.set_timeout(DEADLINE);
            let sent = Instant::now();
            let ended = match client.unary(request).await {
                Ok(_) => Ended::Ok(sent.elapsed()),
                Err(status) if status.code() == tonic::Code::ResourceExhausted => Ended::Shed,
                Err(_) => Ended::Failed,
            };
            // Goodput: calls that succeeded within the window, whenever
            // they were sent (a queue's backlog does not count later).
            let done = Instant::now();
            let good = matches!(ended, Ended::Ok(_)) && done >= measure_from && done <= measure_to;
            (counted.then_some(ended), good)
        });
    }
    let mut latencies = Latencies::with_capacity(calls.len());
    let (mut shed, mut failed, mut good) = (0usize, 0usize, 0usize);
    while let Some(ended) = calls.join_next().await {
        let (ended, in_window) = ended?;
        good += usize::from(in_window);
        match ended {
            None => {}
            Some(Ended::Ok(latency)) => latencies.record(latency),
            Some(Ended::Shed) => shed += 1,
            Some(Ended::Failed) => failed += 1,
        }
    }
    let total = latencies.len() + shed + failed;
    if total == 0 {
        return Err("no call in the measured window".into());
    }
    let percent = |part: usize| 100.0 * part as f64 / total as f64;
    let mut sample = Sample::default();
    sample
        .set(GOODPUT, good as f64 / duration.as_secs_f64())
        .latencies(&mut latencies)
        .set(SHED, percent(shed))
        .set(FAILED, percent(failed));
    harness::say(serde_json::json!({ "result": sample.to_json() }));
    Ok(())
}

// ---- the orchestration ----

/// Runs the scenario.
pub(crate) async fn run(settings: &Settings) -> Result<Vec<Case>> {
    eprintln!(
        "overload: a handler of {WORKERS} workers × {SERVICE_TIME:?} ({CAPACITY} calls/s), offered 0.5× to 4× that, with and without adaptive shedding"
    );
    let mut cases = Vec::new();
    for load in LOADS {
        let rate = CAPACITY * load;
        cases.push(
            harness::alternate(
                settings,
                "overload",
                format!(
                    "{load}× capacity: fixed {rate} calls/s, {WORKERS} workers × {} ms, 1 s deadline; lodestar: adaptive shedding",
                    SERVICE_TIME.as_millis()
                ),
                &[ADAPTIVE, UNLIMITED],
                |variant| async move { one_run(settings, variant == ADAPTIVE, rate).await },
            )
            .await?,
        );
    }
    Ok(cases)
}

async fn one_run(settings: &Settings, adaptive: bool, rate: f64) -> Result<Sample> {
    let mut args = vec!["overload".to_owned(), "server".to_owned()];
    if adaptive {
        args.push("--adaptive".to_owned());
    }
    let mut server = Proc::spawn_self("overload server", settings.server_cpu(), &args)?;
    let ready = server.expect("ready", Duration::from_secs(10)).await?;
    let addr = ready["addr"]
        .as_str()
        .ok_or("overload server: no address")?
        .to_owned();
    let (warmup, duration) = if settings.smoke {
        (settings.warmup, settings.duration)
    } else {
        // The adaptive limit settles within its first second; the window
        // is the settings'.
        (
            settings.warmup.max(Duration::from_secs(1)),
            settings.duration,
        )
    };
    let args = vec![
        "overload".to_owned(),
        "client".to_owned(),
        "--addr".to_owned(),
        addr,
        "--rate".to_owned(),
        rate.to_string(),
        "--warmup-ms".to_owned(),
        warmup.as_millis().to_string(),
        "--duration-ms".to_owned(),
        duration.as_millis().to_string(),
    ];
    let mut client = Proc::spawn_self("overload client", settings.client_cpu(), &args)?;
    let patience = warmup + duration + DEADLINE + Duration::from_secs(30);
    client.expect("warm", patience).await?;
    let result = client.expect("result", patience).await?;
    client.wait(Duration::from_secs(10)).await?;
    let sample = Sample::from_json(
        &result,
        &[
            GOODPUT,
            harness::P50,
            harness::P99,
            harness::P999,
            SHED,
            FAILED,
        ],
    )?;
    server.terminate().await?;
    Ok(sample)
}

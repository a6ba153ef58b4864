//! The footprint scenario: what an idle service costs. A lodestar service
//! (registered in a registry server, heartbeating, with health and
//! reflection, as every lodestar service is) against a raw tonic server of
//! the same proto: time from process start to serving, resident memory
//! after a short burst of calls, and CPU used while idle.
//!
//! The registry server's memory per instance is measured by the registry
//! scenario.

use std::time::{Duration, Instant};

use crate::harness::{self, Case, Metric, Proc, Result, Sample, Settings};
use crate::rpc::{self, Side};

/// From spawning the process to its "ready" line.
const STARTUP: Metric = Metric::lower("start → serving", "ms");
/// Resident memory once idle.
const IDLE_RSS: Metric = Metric::lower("idle rss", "MiB");
/// Of which anonymous (heap, stacks): what the process allocated, as
/// opposed to the pages of the binary it touched.
const IDLE_ANON: Metric = Metric::lower("idle anon rss", "MiB");
/// CPU used per second of idleness.
const IDLE_CPU: Metric = Metric::lower("idle cpu", "ms/s");

/// Runs the scenario.
pub(crate) async fn run(settings: &Settings) -> Result<Vec<Case>> {
    eprintln!("footprint: an idle service");
    let (_registry, registry_url) = crate::registry::start_server(settings.server_cpu()).await?;
    let case = harness::alternate(
        settings,
        "footprint",
        "idle server, after 300 ms of calls",
        &["lodestar", "tonic"],
        |variant| {
            let registry_url = registry_url.clone();
            async move { one_run(settings, Side::parse(&variant)?, &registry_url).await }
        },
    )
    .await?;
    Ok(vec![case])
}

async fn one_run(settings: &Settings, side: Side, registry_url: &str) -> Result<Sample> {
    let started = Instant::now();
    let (mut server, addr) =
        rpc::start_server(settings, rpc::Server::of(side), registry_url, None).await?;
    let startup = started.elapsed();
    let target = match side {
        Side::Lodestar => registry_url.to_owned(),
        Side::Tonic => addr,
    };
    // A short burst, so connections, buffers and caches exist.
    let args: Vec<String> = [
        "rpc",
        "client",
        "--side",
        &format!("{side:?}").to_lowercase(),
        "--target",
        &target,
        "--call",
        "unary",
        "--size",
        "1024",
        "--concurrency",
        "4",
        "--warmup-ms",
        "0",
        "--duration-ms",
        "300",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let mut client = Proc::spawn_self("footprint client", settings.client_cpu(), &args)?;
    client.expect("result", Duration::from_secs(30)).await?;
    client.wait(Duration::from_secs(10)).await?;
    drop(client);
    // Idle: measured over a fixed window, by definition.
    let idle = settings.duration.max(Duration::from_millis(200));
    let cpu_from = server.cpu_time()?;
    tokio::time::sleep(idle).await;
    let cpu_to = server.cpu_time()?;
    let mut sample = Sample::default();
    sample
        .set(STARTUP, startup.as_secs_f64() * 1000.0)
        .set(IDLE_RSS, harness::mib(server.rss()?))
        .set(IDLE_ANON, harness::mib(server.anon_rss()?))
        .set(
            IDLE_CPU,
            (cpu_to - cpu_from).as_secs_f64() * 1000.0 / idle.as_secs_f64(),
        );
    server.terminate().await?;
    Ok(sample)
}

//! `lodestar demo`: the whole framework in one process, in seconds.

use std::collections::BTreeMap;
use std::error::Error;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use lodestar::{
    Client, MemoryRegistry, Registry, RunningService, Service, ServiceKey, Status, WatchEvent,
};
use route_guide::{
    Point, Rectangle, RouteGuideClient, RouteGuideService, RouteNote, SERVED_BY, SERVICE_NAME,
    load_features,
};
use tokio_stream::StreamExt;

/// Options of `lodestar demo`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Calls of each kind before the failures.
    #[arg(long, default_value_t = 12)]
    rounds: usize,
    /// Unary calls made after one instance shut down and one was killed.
    #[arg(long, default_value_t = 30)]
    after: usize,
}

const KINDS: [&str; 4] = [
    "unary            GetFeature",
    "server streaming ListFeatures",
    "client streaming RecordRoute",
    "bidi streaming   RouteChat",
];

#[derive(Default)]
struct Tally {
    /// Calls per kind per instance.
    served: BTreeMap<&'static str, BTreeMap<String, usize>>,
    failed: BTreeMap<&'static str, usize>,
    errors: Vec<String>,
}

impl Tally {
    fn record<T>(
        &mut self,
        kind: &'static str,
        result: Result<(lodestar::Response<()>, T), Status>,
    ) {
        match result {
            Ok((response, _)) => {
                let by = response
                    .metadata()
                    .get(SERVED_BY)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("?")
                    .to_owned();
                *self.served.entry(kind).or_default().entry(by).or_default() += 1;
            }
            Err(status) => {
                *self.failed.entry(kind).or_default() += 1;
                self.errors.push(format!("{kind}: {status}"));
            }
        }
    }
}

pub(crate) async fn run(args: Args) -> Result<ExitCode, Box<dyn Error>> {
    let started = Instant::now();
    println!("lodestar demo: one process, an in-memory registry, three RouteGuide instances\n");
    let registry = MemoryRegistry::new();
    let ttl = Duration::from_secs(2);
    let mut instances: Vec<(String, RunningService)> = Vec::new();
    for n in 1..=3 {
        let name = format!("route-guide-{n}");
        let running = Service::builder(SERVICE_NAME)
            .id(name.clone())
            .version("1.0.0")
            .registry(registry.clone())
            .ttl(ttl)
            .grace_period(Duration::from_secs(5))
            .add_service(RouteGuideService::new(name.clone()).into_server())
            .start()
            .await?;
        let metrics = running
            .admin_addr()
            .map(|admin| format!(", metrics at http://{admin}/metrics"))
            .unwrap_or_default();
        println!("  started {name} on {}{metrics}", running.local_addr());
        instances.push((name, running));
    }
    let key = ServiceKey::new(SERVICE_NAME);
    println!(
        "  {} instances registered as `{SERVICE_NAME}`\n",
        registry.instances(&key).await?.len()
    );

    let client = Client::builder(registry.clone())
        .timeout(Duration::from_secs(5))
        .build();
    let mut guide = RouteGuideClient::by_name(&client, SERVICE_NAME);
    let mut tally = Tally::default();
    let features = load_features();

    for round in 0..args.rounds {
        tally.record(KINDS[0], unary(&mut guide, &features, round).await);
        tally.record(KINDS[1], list(&mut guide).await);
        tally.record(KINDS[2], record(&mut guide, &features, round).await);
        tally.record(KINDS[3], chat(&mut guide, round).await);
    }
    print_table(
        "Calls by kind, and the instance that served them",
        &tally,
        &instances,
    );

    let (graceful, running) = instances.remove(1);
    running.shutdown().await?;
    println!("\n  {graceful}: shut down gracefully (NOT_SERVING, deregistered, drained)");
    let mut watch = registry.watch(&key, Some(registry.revision())).await?;
    let (killed, running) = instances.remove(1);
    running.abort().await;
    let killed_at = Instant::now();
    println!("  {killed}: killed without deregistering (its lease of {ttl:?} runs out on its own)");

    let mut after = Tally::default();
    for round in 0..args.after {
        after.record(KINDS[0], unary(&mut guide, &features, round).await);
    }
    print_table(
        &format!(
            "\n{} unary calls after the shutdown and the kill",
            args.after
        ),
        &after,
        &instances,
    );

    // The lease of the killed instance runs out; the registry says so.
    let expired = tokio::time::timeout(ttl * 3, async {
        while let Some(event) = watch.next().await {
            if matches!(&event, Ok(WatchEvent::Delete { id, .. }) if *id == killed) {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    if expired {
        println!(
            "\n  {killed}: lease expired, evicted from the registry {:.1?} after the kill",
            killed_at.elapsed()
        );
    } else {
        println!(
            "\n  {killed}: still registered {:?} after the kill (expected it to expire)",
            ttl * 3
        );
    }

    let (_, survivor) = instances.remove(0);
    survivor.shutdown().await?;

    println!("\nSummary");
    println!(
        "  {:<28} {:>6} {:>10} {:>7}",
        "kind", "calls", "succeeded", "failed"
    );
    let mut total_failed = 0;
    let mut total = 0;
    for kind in KINDS {
        let ok: usize = [&tally, &after]
            .iter()
            .map(|t| t.served.get(kind).map_or(0, |m| m.values().sum::<usize>()))
            .sum();
        let failed: usize = [&tally, &after]
            .iter()
            .map(|t| t.failed.get(kind).copied().unwrap_or(0))
            .sum();
        total += ok + failed;
        total_failed += failed;
        println!("  {kind:<30} {:>6} {ok:>10} {failed:>7}", ok + failed);
    }
    for error in tally.errors.iter().chain(&after.errors) {
        println!("  error: {error}");
    }
    print_metrics();
    println!(
        "\n{total} calls, {total_failed} failed, in {:.1?}",
        started.elapsed()
    );
    Ok(if total_failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The servers' call counts as `/metrics` served them, by method and code
/// (the instances are gone; the process's registry keeps their counts).
fn print_metrics() {
    const COUNT: &str = "rpc_server_call_duration_seconds_count{";
    println!("\nMetrics (rpc_server_call_duration_seconds_count, as Prometheus scrapes them)");
    let text = lodestar::metrics::Metrics::global().encode();
    for line in text.lines().filter_map(|line| line.strip_prefix(COUNT)) {
        let Some((labels, count)) = line.rsplit_once("} ") else {
            continue;
        };
        if count == "0" {
            continue;
        }
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|pair| pair.strip_prefix(&format!("{name}=\"")))
                .map(|value| value.trim_end_matches('"').to_owned())
                .unwrap_or_default()
        };
        println!(
            "  {:<44} {:<10} {count:>6}",
            label("rpc_method"),
            label("rpc_status_code")
        );
    }
}

type Guide = RouteGuideClient<lodestar::client::Channel>;

async fn unary(
    guide: &mut Guide,
    features: &[route_guide::Feature],
    round: usize,
) -> Result<(lodestar::Response<()>, ()), Status> {
    let point = features[round % features.len()]
        .location
        .unwrap_or_default();
    let response = guide.get_feature(point).await?;
    Ok((response.map(|_| ()), ()))
}

async fn list(guide: &mut Guide) -> Result<(lodestar::Response<()>, usize), Status> {
    let rect = Rectangle {
        lo: Some(Point {
            latitude: 400_000_000,
            longitude: -750_000_000,
        }),
        hi: Some(Point {
            latitude: 410_000_000,
            longitude: -740_000_000,
        }),
    };
    let response = guide.list_features(rect).await?;
    let (metadata, mut stream, extensions) = response.into_parts();
    let mut count = 0;
    while let Some(feature) = stream.next().await {
        feature?;
        count += 1;
    }
    Ok((
        lodestar::Response::from_parts(metadata, (), extensions),
        count,
    ))
}

async fn record(
    guide: &mut Guide,
    features: &[route_guide::Feature],
    round: usize,
) -> Result<(lodestar::Response<()>, i32), Status> {
    let points: Vec<Point> = (0..8)
        .filter_map(|i| features[(round * 7 + i * 13) % features.len()].location)
        .collect();
    let response = guide.record_route(tokio_stream::iter(points)).await?;
    let count = response.get_ref().point_count;
    Ok((response.map(|_| ()), count))
}

async fn chat(guide: &mut Guide, round: usize) -> Result<(lodestar::Response<()>, usize), Status> {
    let latitude = i32::try_from(round).unwrap_or(0);
    let notes: Vec<RouteNote> = (0..4)
        .map(|i| RouteNote {
            location: Some(Point {
                latitude,
                longitude: i % 2,
            }),
            message: format!("note {i} of round {round}"),
        })
        .collect();
    let response = guide.route_chat(tokio_stream::iter(notes)).await?;
    let (metadata, mut stream, extensions) = response.into_parts();
    let mut count = 0;
    while let Some(note) = stream.next().await {
        note?;
        count += 1;
    }
    Ok((
        lodestar::Response::from_parts(metadata, (), extensions),
        count,
    ))
}

fn print_table(title: &str, tally: &Tally, instances: &[(String, RunningService)]) {
    let mut names: Vec<String> = tally
        .served
        .values()
        .flat_map(|m| m.keys().cloned())
        .chain(instances.iter().map(|(n, _)| n.clone()))
        .collect();
    names.sort();
    names.dedup();
    println!("{title}");
    print!("  {:<30}", "kind");
    for name in &names {
        print!(" {name:>14}");
    }
    println!(" {:>7}", "failed");
    for kind in KINDS {
        if !tally.served.contains_key(kind) && !tally.failed.contains_key(kind) {
            continue;
        }
        print!("  {kind:<30}");
        for name in &names {
            let n = tally
                .served
                .get(kind)
                .and_then(|m| m.get(name))
                .copied()
                .unwrap_or(0);
            print!(" {n:>14}");
        }
        println!(" {:>7}", tally.failed.get(kind).copied().unwrap_or(0));
    }
}

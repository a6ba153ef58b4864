//! `lodestar watch SERVICE`: a service's instances coming, changing and
//! going, as the registry reports them.
//!
//! The registry's watch (with its reconnects, through
//! [`Follow`](lodestar::registry::Follow)) gives the whole set of instances
//! after each change; each set is compared with the one before, and every
//! difference is one event: `existing` (there when the watch began),
//! `added`, `changed` (health, enabled, version, address, metadata…) or
//! `removed` (deregistered, or evicted when its lease ran out).

use std::collections::BTreeMap;
use std::error::Error;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use lodestar::registry::Follow;
use lodestar::registry::limits::printable;
use lodestar::{DEFAULT_GROUP, DEFAULT_NAMESPACE, Instance, ServiceKey};

use crate::args::Span;

/// The events a table shows under the instances.
const TABLE_EVENTS: usize = 8;

/// Options of `lodestar watch`.
#[derive(clap::Args, Debug)]
pub(crate) struct WatchArgs {
    /// The service to watch.
    service: String,
    /// Group.
    #[arg(long, default_value = DEFAULT_GROUP)]
    group: String,
    /// Namespace.
    #[arg(long, default_value = DEFAULT_NAMESPACE)]
    namespace: String,
    /// Registry URL (memory://, lodestar://host:port[,host:port],
    /// lodestars://host:port?ca=PATH for TLS, etcd://host:port[,host:port]).
    /// Default: lodestar://127.0.0.1:7070. The token comes from
    /// LODESTAR_REGISTRY_TOKEN.
    #[arg(long, env = "LODESTAR_REGISTRY", value_parser = crate::args::registry_url)]
    registry: Option<String>,
    /// Output: `jsonl`, one JSON object per event (type, service, id,
    /// address, healthy, enabled, version, revision, time); or `table`, the
    /// instances and the latest events, redrawn in place on a terminal.
    /// Default: table on a terminal, jsonl otherwise.
    #[arg(long, value_enum)]
    output: Option<WatchOutput>,
    /// Stop after this long (e.g. 500ms, 30s, 1m30s). Default: run until
    /// interrupted.
    #[arg(long)]
    timeout: Option<Span>,
    /// Stop after this many events.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
}

/// How `lodestar watch` prints.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WatchOutput {
    /// One JSON object per line, per event.
    Jsonl,
    /// A table of the instances, and the latest events.
    Table,
}

/// What happened to one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Existing,
    Added,
    Changed,
    Removed,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Existing => "existing",
            Kind::Added => "added",
            Kind::Changed => "changed",
            Kind::Removed => "removed",
        }
    }
}

/// One event: an instance as it now is (as it last was, when removed).
#[derive(Debug, Clone)]
struct Event {
    kind: Kind,
    instance: Instance,
    revision: Option<u64>,
    time: SystemTime,
}

impl Event {
    fn json(&self) -> serde_json::Value {
        let i = &self.instance;
        serde_json::json!({
            "type": self.kind.name(),
            "service": i.key.service,
            "id": i.id,
            "address": i.address,
            "healthy": i.healthy,
            "enabled": i.enabled,
            "version": i.version,
            "revision": self.revision,
            "time": rfc3339(self.time),
        })
    }
}

/// The differences from `before` to `now`, in id order: removals first,
/// then additions and changes (`first`: the set the watch began with).
fn diff(
    before: &BTreeMap<String, Instance>,
    now: &BTreeMap<String, Instance>,
    first: bool,
) -> Vec<(Kind, Instance)> {
    let mut events: Vec<(Kind, Instance)> = before
        .iter()
        .filter(|(id, _)| !now.contains_key(*id))
        .map(|(_, instance)| (Kind::Removed, instance.clone()))
        .collect();
    for (id, instance) in now {
        match before.get(id) {
            None if first => events.push((Kind::Existing, instance.clone())),
            None => events.push((Kind::Added, instance.clone())),
            Some(old) if old != instance => events.push((Kind::Changed, instance.clone())),
            Some(_) => {}
        }
    }
    events
}

pub(crate) async fn watch(args: WatchArgs) -> Result<ExitCode, Box<dyn Error>> {
    let registry = match &args.registry {
        Some(url) => lodestar_registry::from_url(url)?,
        None => lodestar_registry::from_env()?,
    };
    let key = ServiceKey::new(&args.service)
        .with_namespace(&args.namespace)
        .with_group(&args.group);
    let terminal = std::io::stdout().is_terminal();
    let output = args.output.unwrap_or(if terminal {
        WatchOutput::Table
    } else {
        WatchOutput::Jsonl
    });
    let mut follow = Follow::new(registry, key.clone());
    let mut known: BTreeMap<String, Instance> = BTreeMap::new();
    let mut first = true;
    let mut latest: Vec<Event> = Vec::new();
    let mut seen = 0u64;
    let interrupted = lodestar::server::shutdown_signal();
    tokio::pin!(interrupted);
    let timeout = async {
        match args.timeout {
            Some(Span(timeout)) => tokio::time::sleep(timeout).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(timeout);
    while args.count.is_none_or(|count| seen < count) {
        let next = tokio::select! {
            _ = &mut interrupted => break,
            () = &mut timeout => break,
            next = follow.next() => next.cloned(),
        };
        let now = match next {
            Ok(now) => now,
            Err(error) => {
                // Follow watches again by itself, with backoff.
                eprintln!(
                    "lodestar watch: {}; watching again",
                    printable(&error.to_string())
                );
                continue;
            }
        };
        let time = SystemTime::now();
        let revision = follow.revision();
        let changes = diff(&known, &now, first);
        first = false;
        known = now;
        let mut stdout = std::io::stdout().lock();
        for (kind, instance) in changes {
            if args.count.is_some_and(|count| seen >= count) {
                break;
            }
            seen += 1;
            let event = Event {
                kind,
                instance,
                revision,
                time,
            };
            if output == WatchOutput::Jsonl {
                writeln!(stdout, "{}", event.json())?;
            }
            latest.push(event);
        }
        stdout.flush()?;
        drop(stdout);
        if latest.len() > TABLE_EVENTS {
            latest.drain(..latest.len() - TABLE_EVENTS);
        }
        if output == WatchOutput::Table {
            draw(&key, &known, &latest, terminal)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints the table: redrawn in place on a terminal, appended otherwise.
fn draw(
    key: &ServiceKey,
    instances: &BTreeMap<String, Instance>,
    latest: &[Event],
    terminal: bool,
) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    if terminal {
        // Home, then clear the screen.
        write!(out, "\x1b[H\x1b[2J")?;
    } else {
        writeln!(out)?;
    }
    writeln!(
        out,
        "{}: {} instance(s), at {}",
        printable(&key.to_string()),
        instances.len(),
        rfc3339(SystemTime::now())
    )?;
    let table = crate::registry::instance_table(instances.values());
    for line in table.render(crate::table::terminal_width()) {
        writeln!(out, "{line}")?;
    }
    if !latest.is_empty() {
        writeln!(out, "\nlatest events:")?;
        for event in latest {
            writeln!(
                out,
                "  {}  {:<8} {} {}",
                rfc3339(event.time),
                event.kind.name(),
                printable(&event.instance.id),
                printable(&event.instance.address)
            )?;
        }
    }
    if terminal {
        writeln!(out, "\n(Ctrl-C to stop)")?;
    }
    out.flush()
}

/// `time` as RFC 3339 in UTC, to the millisecond: `2026-12-06T09:43:53.123Z`.
fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rest = secs % 86_400;
    // Days to a civil date (Howard Hinnant's algorithm, proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3_600,
        rest % 3_600 / 60,
        rest % 60,
        since.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn times_are_rfc3339_in_utc() {
        let at = |secs: u64, millis: u64| {
            rfc3339(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis))
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400, 7), "2000-02-29T00:00:00.007Z");
        assert_eq!(at(1_796_550_233, 123), "2026-12-06T09:43:53.123Z");
        assert_eq!(at(4_107_542_399, 999), "2100-02-28T23:59:59.999Z");
    }

    #[test]
    fn a_change_of_sets_is_removals_then_additions_and_changes() {
        let instance = |id: &str, healthy: bool| {
            let mut i = Instance::new("orders", "127.0.0.1:1").with_id(id);
            i.healthy = healthy;
            (id.to_owned(), i)
        };
        let before = BTreeMap::from([instance("a", true), instance("b", true)]);
        let now = BTreeMap::from([instance("b", false), instance("c", true)]);
        let kinds: Vec<(Kind, String)> = diff(&before, &now, false)
            .into_iter()
            .map(|(kind, i)| (kind, i.id))
            .collect();
        assert_eq!(
            kinds,
            [
                (Kind::Removed, "a".to_owned()),
                (Kind::Changed, "b".to_owned()),
                (Kind::Added, "c".to_owned()),
            ]
        );
        let first: Vec<Kind> = diff(&BTreeMap::new(), &now, true)
            .into_iter()
            .map(|(kind, _)| kind)
            .collect();
        assert_eq!(first, [Kind::Existing, Kind::Existing]);
        assert!(diff(&now, &now, false).is_empty());
    }
}

//! Health checks of persistent instances.
//!
//! A check is data a client sent, and the registry acts on it every
//! interval, across restarts: it must not be a way to make the registry
//! send arbitrary requests or scan a network. So a check's target is
//! checked when it is registered (an HTTP check's target is a path, a gRPC
//! check's a service name), requests are built by an HTTP client that
//! refuses what is not a valid request, intervals have a minimum, and the
//! operator can restrict the networks checks may reach
//! ([`Config::check_networks`](crate::Config::check_networks)): every
//! address a name resolves to must be in one of them, and the check
//! connects to the address it checked.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use lodestar::InstanceKey;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::Server;
use crate::store::Check;
use lodestar_core::sync::MutexExt;

/// How long one check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// The shortest interval a check may ask for: 1 s.
pub(crate) const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// The longest interval a check may ask for: 1 hour.
const MAX_INTERVAL: Duration = Duration::from_secs(60 * 60);
/// The longest HTTP check path, in bytes.
const MAX_PATH: usize = 1024;
/// The longest gRPC health service name, in bytes.
const MAX_SERVICE: usize = 256;

/// A network checks may reach: an address and a prefix length, as in
/// `10.0.0.0/8` or `fd00::/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    address: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Network {
    type Err = String;

    /// `ADDRESS/PREFIX`, or a lone address (a network of one).
    fn from_str(s: &str) -> Result<Self, String> {
        let (address, prefix) = s.split_once('/').unwrap_or((s, ""));
        let address: IpAddr = address.parse().map_err(|_| {
            format!("`{s}` is not a network (expected e.g. 10.0.0.0/8 or fd00::/8)")
        })?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        let prefix = if prefix.is_empty() {
            max
        } else {
            prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{s}`: the prefix length must be 0 to {max}"))?
        };
        Ok(Self { address, prefix })
    }
}

impl Network {
    /// Whether `ip` is in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.address, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl Check {
    /// Checks a check as registered: a known kind, a target that fits it,
    /// an interval within bounds.
    pub(crate) fn validate(&self) -> Result<(), String> {
        match self.kind.as_str() {
            "none" | "tcp" if !self.target.is_empty() => {
                return Err(format!("a `{}` check takes no target", self.kind));
            }
            "none" | "tcp" => {}
            "http" => check_path(&self.target)?,
            "grpc" => {
                let ok = self.target.len() <= MAX_SERVICE
                    && self
                        .target
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
                if !ok {
                    return Err(format!(
                        "a `grpc` check's target is a health service name (up to {MAX_SERVICE} \
                         bytes of letters, digits, `.`, `_` and `-`), not {}",
                        lodestar::registry::limits::quoted(&self.target)
                    ));
                }
            }
            other => {
                return Err(format!(
                    "unknown check kind {} (expected none, tcp, http or grpc)",
                    lodestar::registry::limits::quoted(other)
                ));
            }
        }
        let interval = Duration::from_millis(u64::from(self.interval_ms));
        if self.interval_ms != 0 && !(MIN_INTERVAL..=MAX_INTERVAL).contains(&interval) {
            return Err(format!(
                "the check interval is {} ms; expected 0 (the server's default) or {} to {} ms",
                self.interval_ms,
                MIN_INTERVAL.as_millis(),
                MAX_INTERVAL.as_millis()
            ));
        }
        Ok(())
    }
}

/// An HTTP check's target: an absolute path (and query) of printable ASCII.
fn check_path(path: &str) -> Result<(), String> {
    let valid = path.is_empty()
        || (path.starts_with('/')
            && path.len() <= MAX_PATH
            && path.bytes().all(|b| b.is_ascii_graphic() && b != b'#')
            && path.parse::<http::uri::PathAndQuery>().is_ok());
    if valid {
        Ok(())
    } else {
        Err(format!(
            "an `http` check's target is a path such as `/healthz` (up to {MAX_PATH} bytes of \
             printable ASCII), not {}",
            lodestar::registry::limits::quoted(path)
        ))
    }
}

/// The checks of persistent instances, and when each is due next.
///
/// The checker does work in proportion to the checks that come due, not
/// to how many instances there are: each check sits in a heap ordered by
/// time, is taken off when due and put back one interval later. A check
/// replaced or forgotten leaves its old entry behind, dropped when it comes
/// up (each entry carries the generation of the check it was queued for).
/// The first check of each instance is spread over a second by its key, so
/// that a restart with many persistent instances does not probe them all
/// at once.
#[derive(Default)]
pub(crate) struct Checks {
    inner: std::sync::Mutex<Schedule>,
    /// Wakes the checker when a check is added (it may be due sooner than
    /// the checker planned to look).
    wake: tokio::sync::Notify,
}

#[derive(Default)]
struct Schedule {
    checks: HashMap<InstanceKey, (Check, u64)>,
    due: BinaryHeap<Reverse<Due>>,
    generations: u64,
}

/// A check due at `at`, queued for the check of `generation`.
struct Due {
    at: Instant,
    generation: u64,
    key: InstanceKey,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.generation) == (other.at, other.generation)
    }
}

impl Eq for Due {}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Due {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.generation).cmp(&(other.at, other.generation))
    }
}

impl Checks {
    fn lock(&self) -> std::sync::MutexGuard<'_, Schedule> {
        self.inner.lock_unpoisoned()
    }

    /// Sets the check of a persistent instance (replacing any), due within
    /// a second.
    pub(crate) fn remember(&self, key: InstanceKey, check: Check) {
        let probes = check.kind != "none";
        let mut schedule = self.lock();
        schedule.generations += 1;
        let generation = schedule.generations;
        if probes {
            let spread = {
                use std::hash::{Hash, Hasher};
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                key.hash(&mut hasher);
                Duration::from_millis(hasher.finish() % 1000)
            };
            schedule.due.push(Reverse(Due {
                at: Instant::now() + spread,
                generation,
                key: key.clone(),
            }));
        }
        schedule.checks.insert(key, (check, generation));
        drop(schedule);
        if probes {
            self.wake.notify_one();
        }
    }

    /// Forgets the check of an instance that left.
    pub(crate) fn forget(&self, key: &InstanceKey) {
        self.lock().checks.remove(key);
    }

    /// The check of an instance.
    pub(crate) fn get(&self, key: &InstanceKey) -> Option<Check> {
        self.lock().checks.get(key).map(|(check, _)| check.clone())
    }

    /// Every check (for a snapshot of the state).
    pub(crate) fn all(&self) -> HashMap<InstanceKey, Check> {
        let schedule = self.lock();
        schedule
            .checks
            .iter()
            .map(|(key, (check, _))| (key.clone(), check.clone()))
            .collect()
    }

    /// Takes the checks due by `now` off the schedule, and says when the
    /// next one is due.
    fn take_due(&self, now: Instant) -> (Vec<(InstanceKey, Check, u64)>, Option<Instant>) {
        let mut schedule = self.lock();
        let mut due = Vec::new();
        while schedule.due.peek().is_some_and(|Reverse(d)| d.at <= now) {
            let Some(Reverse(entry)) = schedule.due.pop() else {
                break;
            };
            if let Some((check, generation)) = schedule.checks.get(&entry.key)
                && *generation == entry.generation
            {
                due.push((entry.key, check.clone(), entry.generation));
            }
        }
        let next = schedule.due.peek().map(|Reverse(d)| d.at);
        (due, next)
    }

    /// Queues the check of `generation` again at `at`, unless it was
    /// replaced or forgotten meanwhile.
    fn requeue(&self, key: InstanceKey, generation: u64, at: Instant) {
        let mut schedule = self.lock();
        if schedule
            .checks
            .get(&key)
            .is_some_and(|(_, current)| *current == generation)
        {
            schedule.due.push(Reverse(Due {
                at,
                generation,
                key,
            }));
        }
    }
}

/// Checks every persistent instance that has a check, each at its interval.
pub(crate) async fn run(server: Arc<Server>) {
    let checks = &server.store.checks;
    // Checks in flight: a new one starts only when the last has answered, so
    // a slow answer can never overwrite a newer one.
    let running: Arc<std::sync::Mutex<HashSet<InstanceKey>>> = Arc::default();
    loop {
        let now = Instant::now();
        let (due, next) = checks.take_due(now);
        for (key, check, generation) in due {
            let interval = match check.interval_ms {
                0 => server.check_interval,
                ms => Duration::from_millis(u64::from(ms)),
            }
            .max(MIN_INTERVAL);
            checks.requeue(key.clone(), generation, now + interval);
            if !running.lock_unpoisoned().insert(key.clone()) {
                continue;
            }
            let address = server
                .registry
                .get(&key)
                .filter(|(_, persistent)| *persistent)
                .map(|(instance, _)| instance.address);
            let Some(address) = address else {
                running.lock_unpoisoned().remove(&key);
                continue;
            };
            let server = server.clone();
            let running = running.clone();
            tokio::spawn(async move {
                let healthy = tokio::time::timeout(
                    CHECK_TIMEOUT,
                    probe(&address, &check, &server.check_networks),
                )
                .await
                .unwrap_or_else(|_| Err("no answer in time".to_owned()));
                if let Err(why) = &healthy {
                    tracing::debug!(instance = %key, why, "health check failed");
                }
                let _ = server.registry.set_health(&key, healthy.is_ok());
                running.lock_unpoisoned().remove(&key);
            });
        }
        // A check added meanwhile has left a permit: this returns at once.
        match next {
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = checks.wake.notified() => {}
                }
            }
            None => checks.wake.notified().await,
        }
    }
}

/// Resolves `address` and picks the first address to check, refusing any
/// outside `networks` (when the operator set some).
async fn resolve(address: &str, networks: &[Network]) -> Result<SocketAddr, String> {
    let resolved: Vec<SocketAddr> = tokio::net::lookup_host(address)
        .await
        .map_err(|e| format!("cannot resolve {address}: {e}"))?
        .collect();
    if !networks.is_empty()
        && let Some(outside) = resolved
            .iter()
            .find(|a| !networks.iter().any(|n| n.contains(a.ip())))
    {
        return Err(format!(
            "{address} resolves to {}, outside the networks checks may reach",
            outside.ip()
        ));
    }
    resolved
        .first()
        .copied()
        .ok_or_else(|| format!("{address} resolves to nothing"))
}

async fn probe(address: &str, check: &Check, networks: &[Network]) -> Result<(), String> {
    let target = resolve(address, networks).await?;
    match check.kind.as_str() {
        "tcp" => TcpStream::connect(target)
            .await
            .map(drop)
            .map_err(|e| e.to_string()),
        "http" => http_ok(target, address, &check.target).await,
        "grpc" => grpc_serving(target, &check.target).await,
        _ => Ok(()),
    }
}

/// `GET http://address{path}` answers 2xx, asked by an HTTP/1.1 client.
async fn http_ok(target: SocketAddr, host: &str, path: &str) -> Result<(), String> {
    let path = if path.is_empty() { "/" } else { path };
    let request = http::Request::get(path)
        .header(http::header::HOST, host)
        .header(http::header::USER_AGENT, "lodestar-registry-health-check")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| format!("cannot make the request: {e}"))?;
    let stream = TcpStream::connect(target)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    let connection = tokio::spawn(connection);
    let answer = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string());
    connection.abort();
    let status = answer?.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("HTTP {status}"))
    }
}

/// `grpc.health.v1.Health/Check` says SERVING.
async fn grpc_serving(target: SocketAddr, service: &str) -> Result<(), String> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let registry = lodestar::StaticRegistry::new().with("checked", [target.to_string()]);
    let client = lodestar::Client::builder(registry)
        .connect_timeout(CHECK_TIMEOUT)
        .timeout(CHECK_TIMEOUT)
        .build();
    let mut health = HealthClient::new(client.channel("checked"));
    let request = tonic_health::pb::HealthCheckRequest {
        service: service.to_owned(),
    };
    match health.check(request).await {
        Ok(r) if r.get_ref().status() == ServingStatus::Serving => Ok(()),
        Ok(r) => Err(format!("{:?}", r.get_ref().status())),
        Err(status) => Err(status.message().to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(kind: &str, target: &str, interval_ms: u32) -> Check {
        Check {
            kind: kind.into(),
            target: target.into(),
            interval_ms,
        }
    }

    #[test]
    fn checks_are_validated_when_registered() {
        for good in [
            check("none", "", 0),
            check("tcp", "", 1000),
            check("http", "/healthz?full=1", 0),
            check("http", "", 0),
            check("grpc", "orders.v1.Orders", 5000),
        ] {
            assert_eq!(good.validate(), Ok(()), "{good:?}");
        }
        for (bad, says) in [
            (
                check("http", "/ HTTP/1.1\r\nHost: x\r\n\r\nDELETE /", 0),
                "path",
            ),
            (check("http", "http://evil/", 0), "path"),
            (check("http", "/a b", 0), "path"),
            (check("grpc", "x\r\ny", 0), "service name"),
            (check("tcp", "/x", 0), "no target"),
            (check("smtp", "", 0), "unknown check kind"),
            (check("tcp", "", 10), "interval"),
        ] {
            let error = bad.validate().unwrap_err();
            assert!(error.contains(says), "{bad:?}: {error}");
            assert!(!error.contains('\r') && !error.contains('\n'), "{error}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn checks_come_due_at_their_interval_and_forgotten_ones_never() {
        let checks = Checks::default();
        let key = |id: &str| {
            lodestar::Instance::new("db", "h:1")
                .with_id(id)
                .instance_key()
        };
        checks.remember(key("a"), check("tcp", "", 1000));
        checks.remember(key("b"), check("tcp", "", 1000));
        checks.remember(key("none"), check("none", "", 0));
        for n in 0..10_000 {
            checks.remember(key(&format!("quiet{n}")), check("none", "", 0));
        }
        // All first checks are due within a second; `none` never is.
        tokio::time::advance(Duration::from_secs(1)).await;
        let (due, next) = checks.take_due(Instant::now());
        let mut ids: Vec<&str> = due.iter().map(|(k, _, _)| k.id.as_str()).collect();
        ids.sort_unstable();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(next, None);
        for (key, _, generation) in due {
            checks.requeue(key, generation, Instant::now() + Duration::from_secs(1));
        }
        // `b` leaves and `a` is replaced: `b` never comes again, `a` once.
        checks.forget(&key("b"));
        checks.remember(key("a"), check("tcp", "", 2000));
        tokio::time::advance(Duration::from_secs(1)).await;
        let (due, _) = checks.take_due(Instant::now());
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].1.interval_ms, 2000);
        let (again, next) = checks.take_due(Instant::now());
        assert!(again.is_empty());
        assert_eq!(next, None, "stale entries are dropped, not kept");
    }

    #[test]
    fn networks_parse_and_contain() {
        let net: Network = "10.0.0.0/8".parse().unwrap();
        assert!(net.contains("10.1.2.3".parse().unwrap()));
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.0.0.1".parse().unwrap()));
        let one: Network = "127.0.0.1".parse().unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let v6: Network = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        let all: Network = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        for bad in ["10.0.0.0/33", "nope/8", "10.0.0.0/x"] {
            assert!(bad.parse::<Network>().is_err(), "{bad}");
        }
    }
}

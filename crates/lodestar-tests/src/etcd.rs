//! Real etcd servers for tests: single members or clusters, on free
//! loopback ports with temporary data directories, stopped when dropped.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use lodestar_etcd::{EtcdConfig, EtcdRegistry};

/// A free loopback port (bound, then released for the server to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The etcd binary: `LODESTAR_ETCD`, else `etcd` on the PATH.
pub fn binary() -> String {
    let binary = std::env::var("LODESTAR_ETCD").unwrap_or_else(|_| "etcd".to_owned());
    let found = Command::new(&binary)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "`{binary}` cannot be run: the etcd tests need etcd (Debian: apt-get install etcd-server). \\
         ./scripts/test installs it; or set LODESTAR_ETCD to an etcd binary."
    );
    binary
}

/// One etcd member.
#[derive(Debug)]
pub struct Etcd {
    /// The member's name.
    pub name: String,
    /// Where clients reach it.
    pub client: SocketAddr,
    peer: SocketAddr,
    cluster: String,
    data: PathBuf,
    child: Option<Child>,
}

impl Etcd {
    /// A single-member cluster.
    pub fn single() -> Etcd {
        let mut members = cluster(1);
        members.pop().expect("one member")
    }

    fn spawn(&mut self, state: &str) {
        let child = Command::new(binary())
            .args(["--name", &self.name, "--data-dir"])
            .arg(&self.data)
            .args(["--listen-client-urls", &format!("http://{}", self.client)])
            .args([
                "--advertise-client-urls",
                &format!("http://{}", self.client),
            ])
            .args(["--listen-peer-urls", &format!("http://{}", self.peer)])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://{}", self.peer),
            ])
            .args([
                "--initial-cluster",
                &self.cluster,
                "--initial-cluster-state",
                state,
            ])
            .args(["--initial-cluster-token", "lodestar-test"])
            // Fast elections, and so short minimum leases (1.5 election timeouts).
            .args(["--heartbeat-interval", "50", "--election-timeout", "300"])
            .args(["--logger", "zap", "--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
    }

    /// The `etcd://` URL of this member alone.
    pub fn url(&self) -> String {
        format!("etcd://{}", self.client)
    }

    /// Kills the member (as a crash would); its data stays.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the member again, on the same ports and data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn("existing");
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// A cluster of `n` members, started (not yet necessarily ready: see [`ready`]).
pub fn cluster(n: usize) -> Vec<Etcd> {
    let unique = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let mut members: Vec<Etcd> = (0..n)
        .map(|i| Etcd {
            name: format!("m{i}"),
            client: SocketAddr::from(([127, 0, 0, 1], free_port())),
            peer: SocketAddr::from(([127, 0, 0, 1], free_port())),
            cluster: String::new(),
            data: std::env::temp_dir().join(format!("lodestar-etcd-{unique}-{i}")),
            child: None,
        })
        .collect();
    let cluster: Vec<String> = members
        .iter()
        .map(|m| format!("{}=http://{}", m.name, m.peer))
        .collect();
    let cluster = cluster.join(",");
    for member in &mut members {
        member.cluster.clone_from(&cluster);
        member.spawn("new");
    }
    members
}

/// The `etcd://` URL of all of `members`.
pub fn url(members: &[Etcd]) -> String {
    let endpoints: Vec<String> = members.iter().map(|m| m.client.to_string()).collect();
    format!("etcd://{}", endpoints.join(","))
}

/// Waits until every member answers and the cluster has a leader.
pub async fn ready(members: &[Etcd]) {
    for member in members {
        let registry = EtcdRegistry::new(EtcdConfig::new(vec![member.client.to_string()]));
        crate::bounded(&format!("etcd member {} to be ready", member.name), async {
            loop {
                if matches!(registry.status().await, Ok((leader, _)) if leader != 0) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
    }
}

//! Real etcd servers for tests: single members or clusters, on free
//! loopback ports with temporary data directories, stopped when dropped.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use lodestar_etcd::EtcdRegistry;

pub use crate::free_port;

/// The etcd binary: `LODESTAR_ETCD`, else `etcd` on the PATH.
pub fn binary() -> String {
    crate::find_binary(
        "LODESTAR_ETCD",
        &["etcd"],
        "the etcd tests need etcd (Debian: apt-get install etcd-server)",
    )
}

/// The user [`Etcd::secure`] creates: it may read and write the registry's
/// keys and nothing else.
pub const USER: &str = "lodestar";
/// [`USER`]'s password.
pub const PASSWORD: &str = "correct horse battery staple";

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
    /// Serving clients over TLS, with the development PKI written here.
    tls: Option<PathBuf>,
    /// Authentication is on, and [`USER`] exists.
    auth: bool,
    child: Option<Child>,
}

impl Etcd {
    /// A single-member cluster.
    pub fn single() -> Etcd {
        let mut members = cluster(1);
        members.pop().expect("one member")
    }

    /// A single member serving clients over TLS only (certificates from a
    /// fresh development CA) with authentication on: [`url`](Self::url)
    /// carries the CA, [`USER`] and [`PASSWORD`]. Ready when returned.
    pub async fn secure() -> Etcd {
        let mut member = new_members(1).pop().expect("one member");
        let pki = member.data.with_extension("pki");
        lodestar::tls::DevPki::generate(&["127.0.0.1", "localhost"], 1)
            .and_then(|pki_files| pki_files.write_to(&pki))
            .expect("development certificates");
        member.tls = Some(pki);
        member.cluster = format!("{}=http://{}", member.name, member.peer);
        member.spawn("new");
        ready(std::slice::from_ref(&member)).await;
        // etcd needs a root user before auth can be enabled; lodestar itself
        // gets a role limited to the registry's prefix.
        let prefix = lodestar_etcd::DEFAULT_PREFIX;
        member.etcdctl(&["user", "add", "root:root-password"]);
        member.etcdctl(&["user", "grant-role", "root", "root"]);
        member.etcdctl(&["role", "add", "registry"]);
        member.etcdctl(&[
            "role",
            "grant-permission",
            "registry",
            "--prefix=true",
            "readwrite",
            prefix,
        ]);
        member.etcdctl(&["user", "add", &format!("{USER}:{PASSWORD}")]);
        member.etcdctl(&["user", "grant-role", USER, "registry"]);
        member.etcdctl(&["auth", "enable"]);
        member.auth = true;
        member
    }

    /// Runs `etcdctl` (`LODESTAR_ETCDCTL`, else `etcdctl` on the PATH)
    /// against this member, as root once authentication is on.
    fn etcdctl(&self, args: &[&str]) {
        let binary = std::env::var("LODESTAR_ETCDCTL").unwrap_or_else(|_| "etcdctl".to_owned());
        let mut command = Command::new(&binary);
        command
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(self.endpoint());
        if let Some(pki) = &self.tls {
            command.arg("--cacert").arg(pki.join("ca.pem"));
        }
        if self.auth {
            command.args(["--user", "root:root-password"]);
        }
        let output = command.args(args).output().unwrap_or_else(|e| {
            panic!(
                "`{binary}` cannot be run ({e}): the secure etcd tests need etcdctl \
                 (Debian: apt-get install etcd-client); ./scripts/test installs it"
            )
        });
        assert!(
            output.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// The member's client endpoint, as etcd spells it.
    fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.client)
    }

    fn spawn(&mut self, state: &str) {
        let mut command = Command::new(binary());
        if let Some(pki) = &self.tls {
            command
                .arg("--cert-file")
                .arg(pki.join("server.pem"))
                .arg("--key-file")
                .arg(pki.join("server.key"));
        }
        let child = command
            .args(["--name", &self.name, "--data-dir"])
            .arg(&self.data)
            .args(["--listen-client-urls", &self.endpoint()])
            .args(["--advertise-client-urls", &self.endpoint()])
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

    /// The `etcd://` URL of this member alone, with the CA and credentials
    /// a [`secure`](Self::secure) member needs.
    pub fn url(&self) -> String {
        let mut params = Vec::new();
        if let Some(pki) = &self.tls {
            params.push(format!("ca={}", pki.join("ca.pem").display()));
        }
        if self.auth {
            params.push(format!("user={USER}&password={PASSWORD}"));
        }
        if params.is_empty() {
            format!("etcd://{}", self.client)
        } else {
            format!("etcd://{}?{}", self.client, params.join("&"))
        }
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
        if let Some(pki) = &self.tls {
            let _ = std::fs::remove_dir_all(pki);
        }
    }
}

/// A cluster of `n` members, started (not yet necessarily ready: see [`ready`]).
pub fn cluster(n: usize) -> Vec<Etcd> {
    let mut members = new_members(n);
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

/// `n` members, with ports and data directories but not yet started.
fn new_members(n: usize) -> Vec<Etcd> {
    let unique = crate::unique_name();
    (0..n)
        .map(|i| Etcd {
            name: format!("m{i}"),
            client: SocketAddr::from(([127, 0, 0, 1], free_port())),
            peer: SocketAddr::from(([127, 0, 0, 1], free_port())),
            cluster: String::new(),
            data: std::env::temp_dir().join(format!("lodestar-etcd-{unique}-{i}")),
            tls: None,
            auth: false,
            child: None,
        })
        .collect()
}

/// The `etcd://` URL of all of `members`.
pub fn url(members: &[Etcd]) -> String {
    let endpoints: Vec<String> = members.iter().map(|m| m.client.to_string()).collect();
    format!("etcd://{}", endpoints.join(","))
}

/// Waits until every member answers and the cluster has a leader.
pub async fn ready(members: &[Etcd]) {
    for member in members {
        let registry = EtcdRegistry::from_url(&member.url()).expect("a member's URL parses");
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

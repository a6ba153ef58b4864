//! A real `nats-server` with JetStream for tests: on a free loopback port
//! with a temporary store directory, stopped when dropped.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The nats-server binary: `LODESTAR_NATS_SERVER`, else `nats-server` on
/// the PATH, else Debian's `/usr/sbin/nats-server`.
pub fn binary() -> String {
    crate::find_binary(
        "LODESTAR_NATS_SERVER",
        &["nats-server", "/usr/sbin/nats-server"],
        "the NATS tests need it (Debian: apt-get install nats-server)",
    )
}

/// One nats-server with JetStream on.
#[derive(Debug)]
pub struct Nats {
    /// Where clients reach it.
    pub address: SocketAddr,
    store: PathBuf,
    child: Option<Child>,
}

impl Nats {
    /// Starts a server and waits until it accepts connections.
    pub async fn start() -> Nats {
        let unique = crate::unique_name();
        let mut nats = Nats {
            address: SocketAddr::from(([127, 0, 0, 1], crate::free_port())),
            store: std::env::temp_dir().join(format!("lodestar-nats-{unique}")),
            child: None,
        };
        nats.spawn().await;
        nats
    }

    async fn spawn(&mut self) {
        let child = Command::new(binary())
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(self.address.port().to_string())
            .arg("-sd")
            .arg(&self.store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let address = self.address;
        crate::bounded("nats-server to accept connections", async move {
            while tokio::net::TcpStream::connect(address).await.is_err() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }

    /// The `nats://` URL of this server.
    pub fn url(&self) -> String {
        format!("nats://{}", self.address)
    }

    /// Kills the server (as a crash would); its store stays.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and store.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

//! A real Prometheus server for tests (Debian's `prometheus`): on a free
//! loopback port, with a temporary data directory and a 1 s scrape
//! interval, stopped when dropped.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The prometheus binary: `LODESTAR_PROMETHEUS`, else `prometheus` on the
/// PATH.
pub fn binary() -> String {
    crate::find_binary(
        "LODESTAR_PROMETHEUS",
        &["prometheus"],
        "the metrics tests need Prometheus (Debian: apt-get install prometheus)",
    )
}

/// One Prometheus server scraping fixed targets.
#[derive(Debug)]
pub struct Prometheus {
    /// Its HTTP API.
    pub address: SocketAddr,
    dir: PathBuf,
    child: Child,
}

impl Prometheus {
    /// Starts a server scraping `jobs` (a job name and its targets, each
    /// `host:port` serving `/metrics`) every second, and waits until its
    /// API answers.
    pub async fn start(jobs: &[(&str, Vec<SocketAddr>)]) -> Prometheus {
        let dir =
            std::env::temp_dir().join(format!("lodestar-prometheus-{}", crate::unique_name()));
        std::fs::create_dir_all(&dir).expect("a directory for Prometheus");
        let mut config =
            String::from("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n");
        for (job, targets) in jobs {
            let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
            config.push_str(&format!(
                "  - job_name: '{job}'\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ));
        }
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config).expect("Prometheus' configuration");
        let address = SocketAddr::from(([127, 0, 0, 1], crate::free_port()));
        let child = Command::new(binary())
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={address}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus");
        let prometheus = Prometheus {
            address,
            dir,
            child,
        };
        crate::bounded("Prometheus to answer", async move {
            while crate::http_get_status(address, "/-/ready").await != Some(200) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        prometheus
    }

    /// Waits until every target is up, and says which is not, and why,
    /// if that takes too long.
    pub async fn all_up(&self) {
        let address = self.address;
        crate::bounded("every target to be up", async move {
            loop {
                let (_, _, body) = crate::http_get(address, "/api/v1/targets").await;
                let targets: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                let active = targets["data"]["activeTargets"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                if !active.is_empty() && active.iter().all(|t| t["health"] == "up") {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
    }

    /// The result of the instant query `query` (the `data.result` array).
    pub async fn query(&self, query: &str) -> Vec<serde_json::Value> {
        let encoded: String = form_urlencoded::byte_serialize(query.as_bytes()).collect();
        let (_, _, body) =
            crate::http_get(self.address, &format!("/api/v1/query?query={encoded}")).await;
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Queries `query` until `done` holds for its result (Prometheus
    /// scrapes every second), within the tests' bound.
    pub async fn query_until(
        &self,
        query: &str,
        done: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        crate::bounded(
            &format!("Prometheus to answer `{query}` as expected"),
            async {
                loop {
                    let result = self.query(query).await;
                    if done(&result) {
                        return result;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            },
        )
        .await
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

//! A real etcd server per test or benchmark (Debian package `etcd-server`).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::{HarnessError, find_binary, free_port};

const INSTALL: &str = "apt-get install etcd-server";

/// An etcd process on free loopback ports with a temp data dir; killed on drop.
#[derive(Debug)]
pub struct EtcdServer {
    child: Child,
    endpoint: String,
    dir: TempDir,
}

impl EtcdServer {
    /// Starts etcd and waits until it serves requests (up to 30 s).
    pub async fn start() -> Result<EtcdServer, HarnessError> {
        let binary = find_binary("etcd").ok_or(HarnessError::Missing {
            binary: "etcd",
            install: INSTALL,
        })?;
        let io = |source| HarnessError::Io {
            binary: "etcd",
            source,
        };
        let mut last = None;
        // Ports are picked free, then bound by etcd: retry if another process won the race.
        for _ in 0..3 {
            let dir = tempfile::tempdir().map_err(io)?;
            let (client, peer) = (free_port().map_err(io)?, free_port().map_err(io)?);
            let endpoint = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let log = std::fs::File::create(dir.path().join("etcd.log")).map_err(io)?;
            let child = Command::new(&binary)
                .args(["--name", "bench", "--data-dir"])
                .arg(dir.path().join("data"))
                .args([
                    "--listen-client-urls",
                    &endpoint,
                    "--advertise-client-urls",
                    &endpoint,
                ])
                .args([
                    "--listen-peer-urls",
                    &peer_url,
                    "--initial-advertise-peer-urls",
                    &peer_url,
                ])
                .args(["--initial-cluster", &format!("bench={peer_url}")])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .map_err(io)?;
            let mut server = EtcdServer {
                child,
                endpoint,
                dir,
            };
            match server.wait_ready().await {
                Ok(()) => return Ok(server),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(HarnessError::NotReady {
            binary: "etcd",
            reason: "no attempt made".into(),
        }))
    }

    async fn wait_ready(&mut self) -> Result<(), HarnessError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(self.not_ready(format!("exited with {status}")));
            }
            if let Ok(mut c) = etcd_client::Client::connect([&self.endpoint], None).await {
                if c.status().await.is_ok() {
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() > deadline {
                return Err(self.not_ready("not serving after 30 s".into()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn not_ready(&self, what: String) -> HarnessError {
        let log = std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
        let tail: String = log.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
        HarnessError::NotReady {
            binary: "etcd",
            reason: format!("{what}; log: {tail}"),
        }
    }

    /// The client URL, e.g. `http://127.0.0.1:23790`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A connected client.
    pub async fn client(&self) -> Result<etcd_client::Client, etcd_client::Error> {
        etcd_client::Client::connect([&self.endpoint], None).await
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

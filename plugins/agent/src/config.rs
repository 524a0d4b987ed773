//! The agent's configuration: a TOML file, then environment overrides.
//!
//! ```toml
//! [store]                 # which store; the default is the embedded raft store
//! kind = "raft"           # "raft" | "remote" | "nats" | "etcd"
//! dir = "./data"          # raft: the data directory
//! # node_id = 1                           # raft: this member's id, kept across restarts
//! # servers = ["nats://127.0.0.1:4222"]   # nats
//! # bucket = "datasync"                   # nats
//! # endpoints = ["http://127.0.0.1:2379"] # etcd; remote: members' cluster addresses
//! # secret_file = "/etc/datasync/secret"  # remote: the cluster secret
//!
//! # [store.tls]           # etcd, nats: TLS (etcd endpoints are then https://)
//! # ca_file = "/etc/datasync/ca.pem"      # the CA that signed the servers' certificates
//! # cert_file = "/etc/datasync/client.pem" # client certificate, for mutual TLS
//! # key_file = "/etc/datasync/client.key"
//! # server_name = "etcd.internal"         # etcd: the name the server's certificate carries
//!
//! # [store.auth]          # etcd: user + password; nats: one of the four
//! # user = "agent"
//! # password_file = "/etc/datasync/password"  # or password = "…" (e.g. DATASYNC__STORE__AUTH__PASSWORD)
//! # token_file = "/etc/datasync/token"        # nats; or token = "…"
//! # creds_file = "/etc/datasync/agent.creds"  # nats: JWT and NKey seed
//! # nkey_file = "/etc/datasync/agent.nk"      # nats: an NKey seed (SU…)
//!
//! # [store.cluster]       # raft: make this agent a member of a cluster
//! # listen = "0.0.0.0:7400"
//! # advertise = "10.0.0.1:7400"           # required with a wildcard `listen`
//! # secret_file = "/etc/datasync/secret"  # the shared cluster secret (>= 16 bytes)
//! # join = ["10.0.0.2:7400"]              # first start: join through these members
//! # learner = false                       # join as a non-voting learner
//!
//! # [store.etcd_api]      # raft: serve etcd's v3 API (feature `etcd-api`)
//! # listen = "127.0.0.1:2379"
//! # cert_file = "/etc/datasync/server.pem" # TLS: the server's certificate chain
//! # key_file = "/etc/datasync/server.key"  # and its key (clients use https://)
//! # client_ca_file = "/etc/datasync/ca.pem" # clients must present a certificate it signed
//!
//! # [store.tuning]        # raft: each optional; the defaults are shown
//! # max_value_size = 1048576              # bytes; at most 16 MiB, in a cluster 1 MiB per 100 ms of heartbeat
//! # history = 10000                       # transactions kept for reads at past revisions
//! # history_age_s = 86400                 # also compact what is older (off unless set)
//! # snapshot_every = 20000                # log entries between snapshots
//! # snapshot_log_bytes = 67108864         # and bytes of log between them, 64 KiB to 1 TiB
//! # keep_logs = 1000                      # log entries kept behind a snapshot
//! # log_segment = 67108864                # bytes per log segment file, 64 KiB to 1 GiB
//! # heartbeat_ms = 100                    # cluster: raft heartbeat
//! # election_min_ms = 500                 # cluster: election timeout range
//! # election_max_ms = 1000
//! # forward_timeout_ms = 10000            # cluster: how long a forwarded call looks for the leader
//!
//! [http]
//! listen = "127.0.0.1:9191"   # /healthz, /readyz, /status, /metrics; omit to disable
//!
//! [coordinator]
//! resync_timeout_ms = 30000
//! change_timeout_ms = 10000
//!
//! [plugins.file-mirror]   # each plugin's own settings, by plugin name
//! dir = "./mirror"
//! ```
//!
//! An environment variable `DATASYNC__<SECTION>__<KEY>` overrides `key` in `[section]`
//! (`DATASYNC__STORE__KIND=nats`, `DATASYNC__PLUGINS__FILE_MIRROR__DIR=/m`). Each part
//! of the name matches a key the file has ignoring case, with `_` for `-`, and is
//! lower case otherwise. The value is read as TOML if that fits (numbers, booleans,
//! arrays), else as a string (`DATASYNC__STORE__BUCKET=123` is the bucket "123").
//! Variables whose name or value is not Unicode are ignored, or, under `DATASYNC__`,
//! an error. Errors name the file and the field.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::secure::{AuthSettings, TlsSettings};

/// The configuration could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file or an override is not valid: the message names the field.
    #[error("invalid configuration in {origin}: {message}")]
    Invalid {
        /// The file, or "the environment".
        origin: String,
        /// What is wrong, and where.
        message: String,
    },
}

/// Which store the agent runs on.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
#[non_exhaustive]
pub enum StoreConfig {
    /// The embedded raft store: one node, or a member of a cluster.
    Raft {
        /// The data directory.
        #[serde(default = "default_dir")]
        dir: PathBuf,
        /// This node's id (unique in its cluster, kept across restarts).
        #[serde(default = "default_node_id")]
        node_id: u64,
        /// Cluster membership; absent: one node with no network.
        #[serde(default)]
        cluster: Option<ClusterSettings>,
        /// Sizes and timings (`[store.tuning]`; boxed: the other kinds are small).
        #[serde(default)]
        tuning: Box<RaftTuning>,
        /// The etcd v3 API on this store (`[store.etcd_api]`), for etcdctl and etcd
        /// clients (feature `etcd-api`).
        #[serde(default)]
        etcd_api: Option<EtcdApiSettings>,
    },
    /// A raft cluster reached as a remote client (no replica in this process).
    Remote {
        /// Members' cluster addresses (`HOST:PORT`), any of them.
        endpoints: Vec<String>,
        /// The file holding the cluster secret.
        secret_file: PathBuf,
    },
    /// NATS JetStream Key-Value.
    Nats {
        /// Server URLs (`nats://`, or `tls://` to require TLS).
        servers: Vec<String>,
        /// The bucket.
        #[serde(default = "default_bucket")]
        bucket: String,
        /// TLS (`[store.tls]`; its presence requires TLS).
        #[serde(default)]
        tls: Option<TlsSettings>,
        /// Credentials (`[store.auth]`).
        #[serde(default)]
        auth: AuthSettings,
    },
    /// etcd v3.
    Etcd {
        /// Client URLs (`https://` with `[store.tls]`).
        endpoints: Vec<String>,
        /// Prefix of every key in etcd.
        #[serde(default)]
        namespace: String,
        /// TLS (`[store.tls]`).
        #[serde(default)]
        tls: Option<TlsSettings>,
        /// Credentials (`[store.auth]`: user and password).
        #[serde(default)]
        auth: AuthSettings,
    },
}

/// Where the embedded store serves etcd's API (`[store.etcd_api]`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct EtcdApiSettings {
    /// The address to listen on (etcd's is `127.0.0.1:2379`).
    pub listen: SocketAddr,
    /// TLS: the server's certificate chain (PEM); with `key_file`.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// TLS: the server's private key (PEM).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Clients must present a certificate this CA (PEM) signed; needs TLS.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}

impl EtcdApiSettings {
    /// Serving on `listen`, without TLS.
    pub fn new(listen: SocketAddr) -> Self {
        EtcdApiSettings {
            listen,
            cert_file: None,
            key_file: None,
            client_ca_file: None,
        }
    }

    /// Serving over TLS with this certificate chain and key, and checking clients'
    /// certificates against `client_ca` when given (all PEM files).
    #[must_use]
    pub fn tls(mut self, cert: PathBuf, key: PathBuf, client_ca: Option<PathBuf>) -> Self {
        self.cert_file = Some(cert);
        self.key_file = Some(key);
        self.client_ca_file = client_ca;
        self
    }

    /// Checks that the TLS files fit together, naming the field.
    pub fn check(&self) -> Result<(), String> {
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => Err("store.etcd_api: cert_file needs key_file".to_owned()),
            (None, Some(_)) => Err("store.etcd_api: key_file needs cert_file".to_owned()),
            (None, None) if self.client_ca_file.is_some() => {
                Err("store.etcd_api: client_ca_file needs TLS (cert_file and key_file)".to_owned())
            }
            _ => Ok(()),
        }
    }
}

/// How an embedded raft store takes part in a cluster (`[store.cluster]`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ClusterSettings {
    /// Where to listen for the other members.
    pub listen: SocketAddr,
    /// The address the others reach this member at (default: the bound `listen`).
    #[serde(default)]
    pub advertise: Option<String>,
    /// The file holding the shared cluster secret.
    pub secret_file: PathBuf,
    /// Members to join through on the first start; empty bootstraps a new cluster.
    #[serde(default)]
    pub join: Vec<String>,
    /// Join as a non-voting learner.
    #[serde(default)]
    pub learner: bool,
}

impl ClusterSettings {
    /// A member listening on `listen`, with the secret in `secret_file`, bootstrapping
    /// a new cluster unless it is given members to join.
    pub fn new(listen: SocketAddr, secret_file: impl Into<PathBuf>) -> Self {
        ClusterSettings {
            listen,
            advertise: None,
            secret_file: secret_file.into(),
            join: Vec::new(),
            learner: false,
        }
    }

    /// Sets the advertised address.
    #[must_use]
    pub fn advertise(mut self, addr: Option<String>) -> Self {
        self.advertise = addr;
        self
    }

    /// Sets the members to join through on the first start.
    #[must_use]
    pub fn join(mut self, members: Vec<String>) -> Self {
        self.join = members;
        self
    }

    /// Joins as a learner (`true`) or a voter.
    #[must_use]
    pub fn learner(mut self, learner: bool) -> Self {
        self.learner = learner;
        self
    }
}

/// Sizes and timings of the embedded raft store (`[store.tuning]`, and `datasync serve`
/// flags); each one left out keeps the library's default (see `datasync_raft::RaftConfig`
/// and `ClusterConfig`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq, clap::Args)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RaftTuning {
    /// Largest value accepted, in bytes (default 1 MiB; at most 16 MiB, and in a
    /// cluster 1 MiB per 100 ms of heartbeat).
    #[arg(long)]
    pub max_value_size: Option<usize>,
    /// Transactions kept in memory for reads at past revisions (default 10,000).
    #[arg(long)]
    pub history: Option<usize>,
    /// Compact the history older than this many seconds, as etcd's periodic
    /// auto-compaction (default: off; 1 s to 10 years).
    #[arg(long)]
    pub history_age_s: Option<u64>,
    /// Log entries between snapshots (default 20,000).
    #[arg(long)]
    pub snapshot_every: Option<u64>,
    /// Bytes of log between snapshots too (default 64 MiB; 64 KiB to 1 TiB).
    #[arg(long)]
    pub snapshot_log_bytes: Option<u64>,
    /// Log entries kept behind a snapshot for lagging members (default 1,000).
    #[arg(long)]
    pub keep_logs: Option<u64>,
    /// Bytes per log segment file (default 64 MiB; 64 KiB to 1 GiB).
    #[arg(long)]
    pub log_segment: Option<u64>,
    /// Cluster: raft heartbeat interval in ms (default 100).
    #[arg(long)]
    pub heartbeat_ms: Option<u64>,
    /// Cluster: shortest election timeout in ms (default 500; more than twice the
    /// heartbeat).
    #[arg(long)]
    pub election_min_ms: Option<u64>,
    /// Cluster: longest election timeout in ms (default 1000; more than the shortest).
    #[arg(long)]
    pub election_max_ms: Option<u64>,
    /// Cluster: how long a forwarded write, read or membership change looks for the
    /// leader, in ms (default 10,000).
    #[arg(long)]
    pub forward_timeout_ms: Option<u64>,
}

impl RaftTuning {
    /// `raft` with these settings (and its cluster's, if it has one).
    pub fn apply(&self, mut raft: datasync_raft::RaftConfig) -> datasync_raft::RaftConfig {
        let ms = Duration::from_millis;
        raft.max_value_size = self.max_value_size.unwrap_or(raft.max_value_size);
        raft.history = self.history.unwrap_or(raft.history);
        if let Some(s) = self.history_age_s {
            raft.history_age = Some(Duration::from_secs(s));
        }
        raft.snapshot_every = self.snapshot_every.unwrap_or(raft.snapshot_every);
        raft.snapshot_log_bytes = self.snapshot_log_bytes.unwrap_or(raft.snapshot_log_bytes);
        raft.keep_logs = self.keep_logs.unwrap_or(raft.keep_logs);
        raft.log_segment = self.log_segment.unwrap_or(raft.log_segment);
        if let Some(c) = raft.cluster.as_mut() {
            c.heartbeat = self.heartbeat_ms.map_or(c.heartbeat, ms);
            c.election.0 = self.election_min_ms.map_or(c.election.0, ms);
            c.election.1 = self.election_max_ms.map_or(c.election.1, ms);
            c.forward_timeout = self.forward_timeout_ms.map_or(c.forward_timeout, ms);
        }
        raft
    }

    /// Checks these settings as the store will (for a cluster member if `clustered`),
    /// naming the field.
    pub fn check(&self, clustered: bool) -> Result<(), String> {
        let field = |f: &str| format!("store.tuning: invalid {f}");
        let secret =
            datasync_raft::Secret::new("a secret only for checking").map_err(|e| e.to_string())?;
        let c = datasync_raft::ClusterConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)), secret);
        let (heartbeat, election) = (
            self.heartbeat_ms.map_or(c.heartbeat, Duration::from_millis),
            (
                self.election_min_ms
                    .map_or(c.election.0, Duration::from_millis),
                self.election_max_ms
                    .map_or(c.election.1, Duration::from_millis),
            ),
        );
        if heartbeat.is_zero() || heartbeat > Duration::from_secs(60) {
            return Err(field("heartbeat_ms: must be between 1 and 60000"));
        }
        if election.1 > Duration::from_secs(600) {
            return Err(field("election_max_ms: must be at most 600000"));
        }
        if election.0 <= heartbeat * 2 {
            return Err(field(
                "election_min_ms: must be more than twice heartbeat_ms",
            ));
        }
        if election.1 <= election.0 {
            return Err(field("election_max_ms: must be more than election_min_ms"));
        }
        if self
            .forward_timeout_ms
            .is_some_and(|t| t == 0 || t > 86_400_000)
        {
            return Err(field("forward_timeout_ms: must be between 1 and 86400000"));
        }
        let max_age = datasync_raft::MAX_HISTORY_AGE.as_secs();
        if self.history_age_s.is_some_and(|s| s == 0 || s > max_age) {
            return Err(field(&format!(
                "history_age_s: must be between 1 and {max_age}"
            )));
        }
        let base = datasync_raft::RaftConfig::default();
        let base = match clustered {
            true => base.cluster(1, c),
            false => base,
        };
        self.apply(base)
            .validate()
            .map_err(|e| format!("store.tuning: {e}"))
    }
}

impl StoreConfig {
    /// Checks that the TLS and credential settings fit together and with the
    /// endpoints, naming the field.
    pub fn check(&self) -> Result<(), String> {
        if let StoreConfig::Raft {
            etcd_api: Some(api),
            ..
        } = self
        {
            if !cfg!(feature = "etcd-api") {
                return Err("store.etcd_api: this agent was built without the etcd API \
                            (enable the cargo feature `etcd-api`)"
                    .to_owned());
            }
            api.check()?;
        }
        let (kind, urls, tls, auth) = match self {
            StoreConfig::Nats {
                servers, tls, auth, ..
            } => ("nats", servers, tls, auth),
            StoreConfig::Etcd {
                endpoints,
                tls,
                auth,
                ..
            } => ("etcd", endpoints, tls, auth),
            _ => return Ok(()),
        };
        auth.check(kind)?;
        if let Some(t) = tls {
            t.check()?;
            if kind == "nats" && t.server_name.is_some() {
                return Err(
                    "store.tls: server_name is etcd's (NATS checks the URL's host)".to_owned(),
                );
            }
            if kind == "etcd" {
                if let Some(u) = urls.iter().find(|u| !u.starts_with("https://")) {
                    return Err(format!(
                        "store.endpoints: {u:?} is not https://, which TLS (store.tls) needs"
                    ));
                }
                if t.ca_file.is_none() {
                    return Err(
                        "store.tls: etcd over TLS needs ca_file (the CA that signed \
                        the server's certificate)"
                            .to_owned(),
                    );
                }
            }
        }
        Ok(())
    }

    /// The embedded single-node raft store in `dir`.
    pub fn raft(dir: impl Into<PathBuf>) -> Self {
        StoreConfig::Raft {
            dir: dir.into(),
            node_id: default_node_id(),
            cluster: None,
            tuning: Box::default(),
            etcd_api: None,
        }
    }

    /// The embedded raft store in `dir` as cluster member `node_id`.
    pub fn raft_member(dir: impl Into<PathBuf>, node_id: u64, cluster: ClusterSettings) -> Self {
        StoreConfig::Raft {
            dir: dir.into(),
            node_id,
            cluster: Some(cluster),
            tuning: Box::default(),
            etcd_api: None,
        }
    }

    /// This store serving etcd's API too (an embedded raft store; others are
    /// unchanged).
    #[must_use]
    pub fn with_etcd_api(mut self, api: EtcdApiSettings) -> Self {
        if let StoreConfig::Raft { etcd_api, .. } = &mut self {
            *etcd_api = Some(api);
        }
        self
    }

    /// This store with `tuning` (an embedded raft store; others are unchanged).
    #[must_use]
    pub fn tuned(mut self, tuning: RaftTuning) -> Self {
        if let StoreConfig::Raft { tuning: t, .. } = &mut self {
            **t = tuning;
        }
        self
    }
}

fn default_dir() -> PathBuf {
    PathBuf::from("./data")
}

fn default_node_id() -> u64 {
    1
}

fn default_bucket() -> String {
    "datasync".into()
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig::raft(default_dir())
    }
}

/// The HTTP status endpoint.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct HttpConfig {
    /// Where to listen; `None` disables the endpoint.
    pub listen: Option<SocketAddr>,
}

/// Coordinator timeouts.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct CoordinatorSettings {
    /// How long a plugin may take to answer a resync, in ms.
    pub resync_timeout_ms: u64,
    /// How long a plugin may take to answer a change, in ms.
    pub change_timeout_ms: u64,
}

impl Default for CoordinatorSettings {
    fn default() -> Self {
        CoordinatorSettings {
            resync_timeout_ms: 30_000,
            change_timeout_ms: 10_000,
        }
    }
}

impl CoordinatorSettings {
    /// The resync timeout.
    pub fn resync_timeout(&self) -> Duration {
        Duration::from_millis(self.resync_timeout_ms)
    }

    /// The change timeout.
    pub fn change_timeout(&self) -> Duration {
        Duration::from_millis(self.change_timeout_ms)
    }
}

/// The agent's configuration. `Default` is the zero-setup agent: the embedded raft
/// store in `./data`, no HTTP endpoint.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct AgentConfig {
    /// The store.
    pub store: StoreConfig,
    /// The status endpoint.
    pub http: HttpConfig,
    /// Coordinator timeouts.
    pub coordinator: CoordinatorSettings,
    /// Each plugin's settings, by plugin name.
    pub plugins: BTreeMap<String, serde_json::Value>,
}

const ENV_PREFIX: &str = "DATASYNC__";

impl AgentConfig {
    /// Reads `path` (if given) and applies the process's `DATASYNC__…` overrides.
    pub fn load(path: Option<&Path>) -> Result<AgentConfig, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_owned(),
                source,
            })?,
            None => String::new(),
        };
        let origin = path.map_or_else(|| "(no file)".to_owned(), |p| p.display().to_string());
        // `vars()` panics on a variable that is not Unicode: read them raw.
        let mut env = Vec::new();
        for (name, value) in std::env::vars_os() {
            let Some(name) = name.to_str().filter(|n| n.starts_with(ENV_PREFIX)) else {
                continue;
            };
            let value = value.into_string().map_err(|_| ConfigError::Invalid {
                origin: "the environment".to_owned(),
                message: format!("{name}: the value is not Unicode"),
            })?;
            env.push((name.to_owned(), value));
        }
        Self::parse(&text, &origin, env)
    }

    /// Parses TOML `text` (from `origin`, for messages) with overrides from `env`.
    pub fn parse(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<AgentConfig, ConfigError> {
        let invalid = |origin: &str, message: String| ConfigError::Invalid {
            origin: origin.to_owned(),
            message,
        };
        // Check the file alone first, so that its errors point into it.
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| invalid(origin, syntax_error(text, &e)))?;
        let _: AgentConfig = AgentConfig::deserialize(toml::Value::Table(table.clone()))
            .map_err(|e| invalid(origin, e.to_string()))?;
        let mut overridden = Vec::new();
        let mut typed = Vec::new();
        for (name, value) in env {
            let Some(path) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let parts: Vec<&str> = path.split("__").collect();
            let (last, sections) = parts
                .split_last()
                .filter(|(l, s)| !l.is_empty() && s.iter().all(|p| !p.is_empty()))
                .ok_or_else(|| invalid("the environment", format!("{name}: no key")))?;
            // The keys the override sets, sections made where missing.
            let mut keys = Vec::with_capacity(parts.len());
            let mut t = &mut table;
            for s in sections {
                let k = key_in(t, s);
                t = t
                    .entry(k.clone())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                    .as_table_mut()
                    .ok_or_else(|| {
                        invalid("the environment", format!("{name}: `{k}` is not a section"))
                    })?;
                keys.push(k);
            }
            keys.push(key_in(t, last));
            // A secret is taken as it is (a password may look like TOML); any other
            // value that reads as TOML is taken so (a quoted string unquoted), else as
            // the string it is.
            if matches!(
                keys.iter().map(String::as_str).collect::<Vec<_>>()[..],
                ["store", "auth", "password" | "token"]
            ) {
                set(&mut table, &keys, toml::Value::String(value));
                overridden.push(name);
                continue;
            }
            let parsed = format!("v = {value}")
                .parse::<toml::Table>()
                .ok()
                .and_then(|mut t| t.remove("v"));
            match parsed {
                Some(v) if !v.is_str() => {
                    set(&mut table, &keys, v);
                    typed.push((keys, toml::Value::String(value)));
                }
                Some(v) => set(&mut table, &keys, v),
                None => set(&mut table, &keys, toml::Value::String(value)),
            }
            overridden.push(name);
        }
        // A typed value where the configuration wants a string (a bucket named "123")
        // is taken as the string it was, once every override is in (their order does
        // not matter).
        // Fewest strings first; a handful of typed overrides at most is tried.
        if !fits(&table) && typed.len() <= 8 {
            let typed_values: Vec<_> = typed.iter().map(|(k, _)| get(&table, k)).collect();
            let mut sets: Vec<u32> = (1..1u32 << typed.len()).collect();
            sets.sort_by_key(|m| m.count_ones());
            for mask in sets {
                for (i, (keys, as_string)) in typed.iter().enumerate() {
                    let v = if mask & (1 << i) != 0 {
                        Some(as_string.clone())
                    } else {
                        typed_values[i].clone()
                    };
                    if let Some(v) = v {
                        set(&mut table, keys, v);
                    }
                }
                if fits(&table) {
                    break;
                }
            }
            if !fits(&table) {
                // None fits: the typed values, whose error is the one to report.
                for ((keys, _), v) in typed.iter().zip(typed_values) {
                    if let Some(v) = v {
                        set(&mut table, keys, v);
                    }
                }
            }
        }
        let origin = match overridden.is_empty() {
            true => origin.to_owned(),
            false => format!("{origin} with overrides {}", overridden.join(", ")),
        };
        let config = AgentConfig::deserialize(toml::Value::Table(table))
            .map_err(|e| invalid(&origin, e.to_string()))?;
        if let StoreConfig::Raft {
            tuning, cluster, ..
        } = &config.store
        {
            tuning
                .check(cluster.is_some())
                .map_err(|m| invalid(&origin, m))?;
        }
        config.store.check().map_err(|m| invalid(&origin, m))?;
        Ok(config)
    }
}

/// A TOML syntax error by line and column, without the snippet of the line that
/// `toml`'s message shows (it could be a password).
fn syntax_error(text: &str, e: &toml::de::Error) -> String {
    let Some(at) = e.span().map(|s| s.start.min(text.len())) else {
        return e.message().trim().to_owned();
    };
    let before = text.get(..at).unwrap_or("");
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("line {line}, column {column}: {}", e.message().trim())
}

/// The key of `table` that `part` (an environment variable's name part) names: one
/// that matches ignoring case, with `_` for `-`; else `part` in lower case.
fn key_in(table: &toml::Table, part: &str) -> String {
    let norm = |s: &str| s.to_ascii_lowercase().replace('-', "_");
    table
        .keys()
        .find(|k| norm(k) == norm(part))
        .cloned()
        .unwrap_or_else(|| part.to_ascii_lowercase())
}

/// Whether `table` is a valid configuration.
fn fits(table: &toml::Table) -> bool {
    AgentConfig::deserialize(toml::Value::Table(table.clone())).is_ok()
}

/// The value at `keys`, if set.
fn get(table: &toml::Table, keys: &[String]) -> Option<toml::Value> {
    let (last, sections) = keys.split_last()?;
    let mut t = table;
    for k in sections {
        t = t.get(k)?.as_table()?;
    }
    t.get(last).cloned()
}

/// Sets the value at `keys` (its sections exist).
fn set(table: &mut toml::Table, keys: &[String], value: toml::Value) {
    let (last, sections) = keys.split_last().expect("a key at least");
    let mut t = table;
    for k in sections {
        t = t
            .get_mut(k)
            .and_then(toml::Value::as_table_mut)
            .expect("made by the override");
    }
    t.insert(last.clone(), value);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn overrides_reach_any_key_and_keep_strings_strings() {
        let text = r#"
            [store]
            kind = "nats"
            servers = ["nats://127.0.0.1:4222"]
            [plugins.file-mirror]
            dirName = "/a"
        "#;
        let c = AgentConfig::parse(
            text,
            "agent.toml",
            env(&[
                ("DATASYNC__STORE__BUCKET", "123"),
                ("DATASYNC__PLUGINS__FILE_MIRROR__DIRNAME", "/b"),
                ("DATASYNC__PLUGINS__FILE_MIRROR__RETRIES", "3"),
                ("DATASYNC__", "x"),
            ]),
        );
        assert!(c.is_err(), "a name with no key is refused");
        let c = AgentConfig::parse(
            text,
            "agent.toml",
            env(&[
                ("DATASYNC__STORE__BUCKET", "123"),
                ("DATASYNC__PLUGINS__FILE_MIRROR__DIRNAME", "/b"),
                ("DATASYNC__PLUGINS__FILE_MIRROR__RETRIES", "3"),
            ]),
        )
        .expect("valid");
        let StoreConfig::Nats { bucket, .. } = &c.store else {
            panic!("{:?}", c.store)
        };
        assert_eq!(bucket, "123");
        let fm = &c.plugins["file-mirror"];
        assert_eq!(fm["dirName"], "/b", "{fm}");
        assert_eq!(fm["retries"], 3, "{fm}");
        assert!(fm.get("dirname").is_none(), "{fm}");
    }

    #[tokio::test]
    async fn override_order_and_quotes_do_not_matter() {
        let c = AgentConfig::parse(
            "",
            "agent.toml",
            env(&[
                ("DATASYNC__STORE__SERVERS", r#"["nats://a:4222"]"#),
                ("DATASYNC__STORE__BUCKET", "123"),
                ("DATASYNC__STORE__KIND", r#""nats""#),
                ("DATASYNC__PLUGINS__FILE_MIRROR__DIR", "/m"),
            ]),
        )
        .expect("valid");
        let StoreConfig::Nats {
            servers, bucket, ..
        } = &c.store
        else {
            panic!("{:?}", c.store)
        };
        assert_eq!(servers, &["nats://a:4222"]);
        assert_eq!(bucket, "123");
        let ctx = datasync::coordinator::PluginContext::new(std::sync::Arc::new(
            datasync::local::Local::new(),
        ))
        .with_settings(c.plugins.clone());
        assert_eq!(ctx.settings_for("file-mirror")["dir"], "/m");
        // Two values that both must stay strings.
        let raft = AgentConfig::parse(
            "",
            "agent.toml",
            env(&[
                ("DATASYNC__STORE__KIND", "raft"),
                ("DATASYNC__STORE__DIR", "2024"),
                ("DATASYNC__STORE__CLUSTER__SECRET_FILE", "7"),
                ("DATASYNC__STORE__CLUSTER__LISTEN", "127.0.0.1:7400"),
            ]),
        )
        .expect("valid");
        let StoreConfig::Raft { dir, cluster, .. } = &raft.store else {
            panic!("{:?}", raft.store)
        };
        assert_eq!(dir, Path::new("2024"));
        assert_eq!(cluster.as_ref().unwrap().secret_file, Path::new("7"));
    }

    /// `load` in a child process with a variable that is not Unicode: no panic, and one
    /// under `DATASYNC__` is named in the error.
    #[test]
    fn a_variable_that_is_not_unicode_does_not_panic() {
        use std::os::unix::ffi::OsStrExt;
        if std::env::var_os("DATASYNC_CONFIG_CHILD").is_some() {
            let r = AgentConfig::load(None);
            match std::env::var("DATASYNC_CONFIG_CHILD").as_deref() {
                Ok("foreign") => assert!(r.is_ok(), "{r:?}"),
                _ => assert!(
                    r.as_ref()
                        .is_err_and(|e| e.to_string().contains("DATASYNC__STORE__DIR")
                            || format!("{e:?}").contains("DATASYNC__STORE__DIR")),
                    "{r:?}"
                ),
            }
            return;
        }
        let bad = std::ffi::OsStr::from_bytes(b"\xff\xfe");
        let exe = std::env::current_exe().expect("test binary");
        for (mode, name) in [
            ("foreign", "SOMETHING_ELSE"),
            ("ours", "DATASYNC__STORE__DIR"),
        ] {
            let out = std::process::Command::new(&exe)
                .args([
                    "--exact",
                    "config::tests::a_variable_that_is_not_unicode_does_not_panic",
                ])
                .env("DATASYNC_CONFIG_CHILD", mode)
                .env(name, bad)
                .output()
                .expect("run the child");
            assert!(out.status.success(), "{mode}: {out:?}");
            assert!(
                String::from_utf8_lossy(&out.stdout).contains("1 passed"),
                "{mode}: {out:?}"
            );
        }
    }

    #[test]
    fn empty_is_the_zero_setup_default() {
        let c = AgentConfig::parse("", "x", env(&[])).expect("valid");
        assert_eq!(c, AgentConfig::default());
        assert_eq!(c.store, StoreConfig::raft("./data"));
    }

    #[test]
    fn file_then_environment() {
        let text = r#"
            [store]
            kind = "nats"
            servers = ["nats://127.0.0.1:4222"]
            [http]
            listen = "127.0.0.1:9191"
            [plugins.file-mirror]
            dir = "/tmp/m"
        "#;
        let c = AgentConfig::parse(
            text,
            "agent.toml",
            env(&[
                ("DATASYNC__STORE__BUCKET", "agents"),
                ("DATASYNC__COORDINATOR__CHANGE_TIMEOUT_MS", "500"),
                ("UNRELATED", "1"),
            ]),
        )
        .expect("valid");
        assert_eq!(
            c.store,
            StoreConfig::Nats {
                servers: vec!["nats://127.0.0.1:4222".into()],
                bucket: "agents".into(),
                tls: None,
                auth: AuthSettings::default(),
            }
        );
        assert_eq!(c.coordinator.change_timeout(), Duration::from_millis(500));
        assert_eq!(c.plugins["file-mirror"]["dir"], "/tmp/m");
    }

    #[test]
    fn tls_and_credentials_from_the_file_and_the_environment() {
        let text = r#"
            [store]
            kind = "etcd"
            endpoints = ["https://10.0.0.1:2379"]
            [store.tls]
            ca_file = "/etc/ca.pem"
            cert_file = "/etc/client.pem"
            key_file = "/etc/client.key"
            [store.auth]
            user = "agent"
        "#;
        let c = AgentConfig::parse(
            text,
            "agent.toml",
            env(&[("DATASYNC__STORE__AUTH__PASSWORD", "s3cret")]),
        )
        .expect("valid");
        let StoreConfig::Etcd { tls, auth, .. } = &c.store else {
            panic!("{:?}", c.store)
        };
        assert_eq!(
            tls.as_ref().and_then(|t| t.ca_file.clone()),
            Some("/etc/ca.pem".into())
        );
        assert_eq!(auth.password.as_deref(), Some("s3cret"));
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "Debug prints the password"
        );
        // Each misfit is refused, naming the field.
        let refused = |text: &str, field: &str| {
            let e = AgentConfig::parse(text, "agent.toml", env(&[])).expect_err(text);
            assert!(e.to_string().contains(field), "{field}: {e}");
        };
        let etcd = "[store]\nkind = \"etcd\"\nendpoints = [\"https://h:1\"]\n";
        let nats = "[store]\nkind = \"nats\"\nservers = [\"nats://h:1\"]\n";
        refused(
            &format!("{etcd}[store.auth]\nuser = \"u\"\n"),
            "user needs password",
        );
        refused(
            &format!("{etcd}[store.auth]\npassword = \"p\"\n"),
            "password needs user",
        );
        refused(
            &format!("{etcd}[store.auth]\ntoken = \"t\"\n"),
            "etcd takes user and password only",
        );
        refused(
            &format!("{etcd}[store.tls]\ncert_file = \"c\"\nca_file = \"a\"\n"),
            "cert_file and key_file",
        );
        refused(
            &format!("{etcd}[store.tls]\nkey_file = \"k\"\nca_file = \"a\"\n"),
            "cert_file and key_file",
        );
        refused(
            &format!("{nats}[store.tls]\nserver_name = \"n\"\n"),
            "server_name is etcd's",
        );
        // A secret is never repeated in an error.
        for text in [
            format!("{etcd}[store.auth]\nuser = \"u\"\npassword = hunter2\n"),
            format!("{etcd}[store.auth]\nuser = \"u\"\npassword = [\"hunter2\"]\n"),
        ] {
            let e = AgentConfig::parse(&text, "agent.toml", env(&[])).expect_err(&text);
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
        // A password must be a string in the file (TOML would rewrite a number), and is
        // not shown when it is not.
        let e = AgentConfig::parse(
            &format!("{etcd}[store.auth]\nuser = \"u\"\npassword = 0x5EC12E7\n"),
            "agent.toml",
            env(&[]),
        )
        .expect_err("a number as a password");
        assert!(e.to_string().contains("quote it"), "{e}");
        assert!(
            !e.to_string().contains("5EC12E7") && !e.to_string().contains("99161831"),
            "{e}"
        );
        // From the environment, a secret is taken as written (a TOML string too);
        // elsewhere a value named `token` is typed as before.
        for pw in ["0x5EC12E7", "\"pw\""] {
            let c = AgentConfig::parse(
                &format!("{etcd}[store.auth]\nuser = \"u\"\n"),
                "agent.toml",
                env(&[("DATASYNC__STORE__AUTH__PASSWORD", pw)]),
            )
            .expect("valid");
            assert!(
                matches!(&c.store, StoreConfig::Etcd { auth, .. } if auth.password.as_deref() == Some(pw))
            );
        }
        let c = AgentConfig::parse(
            "",
            "agent.toml",
            env(&[("DATASYNC__PLUGINS__X__TOKEN", "42")]),
        )
        .expect("valid");
        assert_eq!(c.plugins["x"]["token"], 42);
        refused(&format!("{etcd}[store.tls]\n"), "needs ca_file");
        refused(
            "[store]\nkind = \"etcd\"\nendpoints = [\"http://h:1\"]\n[store.tls]\nca_file = \"a\"\n",
            "is not https://",
        );
        refused(
            &format!("{nats}[store.auth]\ntoken = \"t\"\nnkey_file = \"n\"\n"),
            "one of",
        );
        refused(
            &format!("{nats}[store.auth]\ntoken = \"t\"\ntoken_file = \"f\"\n"),
            "not both",
        );
        refused(&format!("{nats}[store.auth]\ntokn = \"t\"\n"), "tokn");
        // NATS: a token from the environment alone.
        let c = AgentConfig::parse(
            nats,
            "agent.toml",
            env(&[("DATASYNC__STORE__AUTH__TOKEN", "t0k")]),
        )
        .expect("valid");
        let StoreConfig::Nats { auth, .. } = &c.store else {
            panic!("{:?}", c.store)
        };
        assert_eq!(auth.token.as_deref(), Some("t0k"));
    }

    #[test]
    fn raft_cluster_and_remote_settings() {
        let text = r#"
            [store]
            kind = "raft"
            dir = "/var/lib/datasync"
            node_id = 2
            [store.cluster]
            listen = "0.0.0.0:7400"
            advertise = "10.0.0.2:7400"
            secret_file = "/etc/datasync/secret"
            join = ["10.0.0.1:7400"]
        "#;
        let c = AgentConfig::parse(text, "agent.toml", env(&[])).expect("valid");
        let StoreConfig::Raft {
            node_id, cluster, ..
        } = c.store
        else {
            panic!("a raft store: {:?}", c.store);
        };
        assert_eq!(node_id, 2);
        let cluster = cluster.expect("cluster settings");
        assert_eq!(cluster.join, ["10.0.0.1:7400"]);
        assert!(!cluster.learner);
        let c = AgentConfig::parse(
            "[store]\nkind = \"remote\"\nendpoints = [\"10.0.0.1:7400\"]\nsecret_file = \"s\"\n",
            "agent.toml",
            env(&[]),
        )
        .expect("valid");
        assert!(
            matches!(c.store, StoreConfig::Remote { .. }),
            "{:?}",
            c.store
        );
        let err = AgentConfig::parse(
            "[store]\nkind = \"raft\"\n[store.cluster]\nlisten = \"0.0.0.0:7400\"\n",
            "agent.toml",
            env(&[]),
        )
        .expect_err("no secret");
        assert!(err.to_string().contains("secret_file"), "{err}");
    }

    #[test]
    fn errors_name_the_file_and_the_field() {
        let err = AgentConfig::parse(
            "[store]\nkind = \"raft\"\ndri = \"x\"\n",
            "agent.toml",
            env(&[]),
        )
        .expect_err("unknown field");
        let text = err.to_string();
        assert!(
            text.contains("agent.toml") && text.contains("dri"),
            "{text}"
        );
        let err = AgentConfig::parse("[http]\nlisten = \"nowhere\"\n", "agent.toml", env(&[]))
            .expect_err("bad address");
        assert!(err.to_string().contains("listen"), "{err}");
        let err = AgentConfig::parse(
            "",
            "agent.toml",
            env(&[("DATASYNC__COORDINATOR__RESYNC_TIMEOUT_MS", "soon")]),
        )
        .expect_err("bad override");
        let text = err.to_string();
        assert!(
            text.contains("DATASYNC__COORDINATOR__RESYNC_TIMEOUT_MS"),
            "{text}"
        );
    }
}

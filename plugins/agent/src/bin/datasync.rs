//! `datasync`: the command line — read and write a store, watch it, run the agent.
//!
//! ```text
//! datasync put config/a '{"mtu":1500}' --ttl 30s
//! datasync get config/a
//! datasync ls config/ --output json
//! datasync watch config/ --count 10
//! datasync cas config/a '{"mtu":9000}' --expect 12
//! datasync del config/ --prefix
//! datasync agent --config agent.toml
//! datasync serve --id 1 --listen 127.0.0.1:7400 --secret-file secret --dir n1
//! datasync --store raft://127.0.0.1:7400 --secret-file secret members
//! datasync status --agent http://127.0.0.1:9191
//! datasync resync --agent http://127.0.0.1:9191
//! ```
//!
//! `--store` (or `DATASYNC_STORE`) picks the store: a directory (or `raft:DIR`) for the
//! embedded raft store (default `./data`; while another process holds it — an agent,
//! `serve`, a `watch` — the CLI reaches it through that process's Unix socket in the
//! directory), `raft://HOST:PORT[,…]`
//! for a raft cluster reached as a remote client (with `--secret-file`),
//! `nats://HOST:PORT[,…]` or `tls://…` (`?bucket=NAME`, default `datasync`), or
//! `etcd://HOST:PORT[,…]` (`?namespace=N`) when built with the `etcd` feature. Any
//! other scheme is bad usage. TLS and credentials for NATS and etcd go in the URL:
//! `user:password@` (or a NATS `token@`) before the hosts, and `ca=`, `cert=`, `key=`,
//! `password_file=`, `token_file=`, `creds=`, `nkey=` parameters
//! (`etcd://agent@10.0.0.1:2379?ca=ca.pem&cert=c.pem&key=c.key&password_file=pw`).
//!
//! Text output escapes what could drive a terminal (control and bidirectional
//! formatting characters as `\u{…}`); `ls` and `watch` also escape newline, tab and
//! backslash, one line per key. `--output json` shows values exactly (as a string when
//! UTF-8, else in base64 as `value_base64`); `get --output raw` writes a value's bytes
//! as they are. `put KEY -` reads the value from standard input, `put KEY --file F`
//! from a file.
//!
//! Logs go to stderr, filtered by `RUST_LOG` (default `info` for `agent` and `serve`,
//! `warn` else). Long listings and resyncs show a progress bar on a terminal's stderr.
//!
//! Exit codes: 0 done; 1 the store or the agent failed (or the agent stopped following
//! the store); 2 bad usage (an invalid key or `--store` included); 3 the key does not
//! exist (`get`); 4 the compare-and-swap found another revision (`cas`); 5 the value is
//! not its model's message (`get --json`); 141 the reader of the output went away (a
//! closed pipe), as for tools killed by SIGPIPE.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use datasync::{
    CasOutcome, DeleteOptions, Event, Expect, Key, KeyValue, Prefix, PutOptions, ReadOptions,
    Revision, Value, WatchOptions,
};
use datasync_agent::{Agent, AgentConfig, AnyStore, ClusterSettings, RaftTuning, StoreConfig};
use datasync_raft::Role;
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::Write;

/// `println!` that returns a failed write (a reader gone: a closed pipe) as the
/// command's failure instead of panicking.
macro_rules! out {
    ($($t:tt)*) => {
        writeln!(std::io::stdout().lock(), $($t)*)?
    };
}
// Plugins linked into this agent (a crate nothing references is not linked).
use datasync_file_mirror as _;
use datasync_netconfig as _;

#[derive(Parser, Debug)]
#[command(
    name = "datasync",
    version,
    about = "Read, write and watch a datasync store; run the agent.",
    after_help = "Exit codes: 0 done; 1 the store or the agent failed (or the agent stopped \
        following the store); 2 bad usage (an invalid key, value, TTL or --store \
        included); 3 the key does not exist (get); 4 the compare-and-swap found another \
        revision (cas); 5 the value is not its model's message (get --json); 141 the reader \
        of the output went away (a closed pipe)."
)]
struct Cli {
    /// The store: a directory or raft:DIR (embedded), raft://HOST:PORT,HOST:PORT… (a raft cluster, remote), nats://HOST:PORT?bucket=B, tls://HOST:PORT, etcd://HOST:PORT?namespace=N. NATS and etcd take user:password@ (NATS also token@) before the host and ca=, cert=, key=, password_file= (NATS also token_file=, creds=, nkey=) parameters.
    #[arg(
        long,
        global = true,
        env = "DATASYNC_STORE",
        hide_env_values = true,
        default_value = "./data"
    )]
    store: String,
    /// The raft cluster's secret (for raft:// stores and `serve`).
    #[arg(long, global = true, env = "DATASYNC_SECRET_FILE")]
    secret_file: Option<PathBuf>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    /// Values exactly: as a string when UTF-8, else base64 (`value_base64`).
    Json,
    /// `get` only: the value's bytes as they are, nothing added.
    Raw,
}

// Parsed once per run: the size of `serve`'s flags costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Writes a value: the argument, `-` for standard input, or `--file F` (any bytes).
    Put {
        key: String,
        value: Option<String>,
        /// Read the value from this file.
        #[arg(long, conflicts_with = "value")]
        file: Option<PathBuf>,
        /// Delete the key after this long (e.g. 500ms, 30s, 1h 30m; a bare number is
        /// seconds).
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<Duration>,
        /// The value is JSON of the message registered for the key's prefix (see
        /// `datasync models`), stored as that protobuf message.
        #[arg(long)]
        json: bool,
    },
    /// Reads a value (exit code 3 if absent).
    Get {
        key: String,
        /// Read at this past revision.
        #[arg(long)]
        rev: Option<u64>,
        /// Print the value as JSON of the message registered for the key's prefix.
        #[arg(long)]
        json: bool,
    },
    /// Lists the registered models: key prefix, protobuf message.
    Models,
    /// Deletes a key, or every key under a prefix.
    Del {
        key: String,
        #[arg(long)]
        prefix: bool,
    },
    /// Lists the keys under a prefix, at one revision.
    Ls {
        #[arg(default_value = "")]
        prefix: String,
        #[arg(long)]
        rev: Option<u64>,
        /// Print keys only.
        #[arg(long)]
        keys_only: bool,
        /// Print at most this many keys (the first, in key order).
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Prints the resync, then every change (previous and current value, revision).
    Watch {
        #[arg(required = true)]
        prefixes: Vec<String>,
        /// Stop after this many events (the resync counts as one).
        #[arg(long)]
        count: Option<u64>,
    },
    /// Writes only if the key is at the expected revision (exit code 4 if not).
    Cas {
        key: String,
        value: String,
        /// The key's current revision.
        #[arg(long, conflicts_with = "absent", required_unless_present = "absent")]
        expect: Option<u64>,
        /// The key must not exist.
        #[arg(long)]
        absent: bool,
    },
    /// Runs the agent with its plugins until SIGINT or SIGTERM.
    Agent {
        /// The agent's TOML configuration (DATASYNC__SECTION__KEY overrides it).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Runs a raft store node (a cluster member serving other members and remote
    /// clients) until SIGINT or SIGTERM.
    Serve {
        /// The data directory.
        #[arg(long, default_value = "./data")]
        dir: PathBuf,
        /// This node's id, unique in the cluster and kept across restarts (decimal, or
        /// hex as `0x…`: `etcdctl member add` prints ids in hex).
        #[arg(long, default_value_t = 1, value_parser = node_id)]
        id: u64,
        /// Where to listen for members and clients.
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// The address others reach this node at (default: the bound listen address).
        #[arg(long)]
        advertise: Option<String>,
        /// On the first start, join through this member (repeatable); none bootstraps.
        #[arg(long)]
        join: Vec<String>,
        /// Join as a non-voting learner.
        #[arg(long)]
        learner: bool,
        /// Serve /healthz, /readyz, /status and /metrics here.
        #[arg(long)]
        http: Option<std::net::SocketAddr>,
        /// Serve etcd's v3 API here, for etcdctl and etcd clients (built with the
        /// `etcd-api` feature).
        #[arg(long)]
        etcd_listen: Option<std::net::SocketAddr>,
        /// Serve etcd's API over TLS with this certificate chain (PEM; with
        /// --etcd-key).
        #[arg(long, requires_all = ["etcd_listen", "etcd_key"])]
        etcd_cert: Option<PathBuf>,
        /// The private key of --etcd-cert (PEM).
        #[arg(long, requires = "etcd_cert")]
        etcd_key: Option<PathBuf>,
        /// Clients of etcd's API must present a certificate this CA (PEM) signed.
        #[arg(long, requires = "etcd_cert")]
        etcd_client_ca: Option<PathBuf>,
        #[command(flatten)]
        tuning: RaftTuning,
    },
    /// Shows a running agent's status (store, sources, plugins) with --agent, else the
    /// store's (revision, leader, members, database size).
    Status {
        /// The agent's (or serve's) status endpoint, e.g. http://127.0.0.1:9191.
        #[arg(long, env = "DATASYNC_AGENT")]
        agent: Option<String>,
    },
    /// Backs up the raft store, restores a backup into a new store, or checks one.
    Snapshot {
        #[command(subcommand)]
        action: SnapshotCommand,
    },
    /// Asks a running agent for a resync pass of its plugins (every plugin, in order:
    /// naming one checks that it exists).
    Resync {
        plugin: Option<String>,
        /// The agent's status endpoint.
        #[arg(long, env = "DATASYNC_AGENT", default_value = "http://127.0.0.1:9191")]
        agent: String,
    },
    /// Lists a raft cluster's members, or changes them.
    Members {
        #[command(subcommand)]
        change: Option<MembersCommand>,
    },
}

#[derive(Subcommand, Debug)]
enum SnapshotCommand {
    /// Saves the state at one revision to FILE (checksummed), from --store: the
    /// embedded store, a running agent's (through its data directory) or a cluster.
    Save { file: PathBuf },
    /// Makes a new store in --dir from FILE: a single node, or with --listen the first
    /// member of a new cluster (with --secret-file), which others then join.
    Restore {
        file: PathBuf,
        /// The new data directory (absent or empty).
        #[arg(long)]
        dir: PathBuf,
        /// The new node's id (decimal, or hex as `0x…`).
        #[arg(long, default_value_t = 1, value_parser = node_id)]
        id: u64,
        /// Make a cluster member listening here (as `serve --listen` will).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// The address others reach it at (default: the listen address).
        #[arg(long, requires = "listen")]
        advertise: Option<String>,
    },
    /// Checks FILE (header, length, checksum, content) and says what it holds.
    Status { file: PathBuf },
}

#[derive(Subcommand, Debug)]
enum MembersCommand {
    /// Adds a node as a voter (or promotes a learner), or as a learner.
    Add {
        #[arg(value_parser = node_id)]
        id: u64,
        /// Its cluster address.
        addr: String,
        #[arg(long)]
        learner: bool,
    },
    /// Removes a node (it keeps its data).
    Remove {
        #[arg(value_parser = node_id)]
        id: u64,
    },
    /// Moves a member to a new cluster address (then restart it listening there).
    Update {
        #[arg(value_parser = node_id)]
        id: u64,
        /// Its new cluster address.
        addr: String,
    },
}

/// A TTL as people write it (`humantime`: `500ms`, `30s`, `1h 30m`; a bare number is
/// seconds), positive and at most [`datasync::MAX_TTL`] (bad usage, not a store error).
fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse()
            .map(Duration::from_secs)
            .map_err(|e| format!("bad duration {s:?}: {e}"))?
    } else {
        humantime::parse_duration(s)
            .map_err(|e| format!("bad duration {s:?}: {e} (e.g. 500ms, 30s, 5m, 1h 30m)"))?
    };
    if d.is_zero() || d > datasync::MAX_TTL {
        return Err(format!(
            "a TTL must be positive and at most ten years, got {s:?}"
        ));
    }
    Ok(d)
}

/// A key argument; an invalid one is bad usage (exit code 2).
fn key_arg(key: &str) -> Result<Key, Failure> {
    Key::new(key).map_err(|e| Failure::Usage(format!("invalid key {key:?}: {e}")))
}

/// A prefix argument; an invalid one is bad usage (exit code 2).
fn prefix_arg(prefix: &str) -> Result<Prefix, Failure> {
    Prefix::new(prefix).map_err(|e| Failure::Usage(format!("invalid prefix {prefix:?}: {e}")))
}

/// Text output of a value, safe for a terminal: control characters (C0 but newline and
/// tab, DEL, C1) and bidirectional formatting characters become `\u{…}` escapes, so a
/// value cannot retitle the terminal or reorder what is shown. With `line`, for output
/// of one line per key (`ls`, `watch`), newline, tab, carriage return and backslash are
/// escaped too, so a value cannot forge a line. `--output json` shows values exactly.
fn escape(s: &str, line: bool) -> std::borrow::Cow<'_, str> {
    let needs = |c: char| {
        (c.is_control() && (line || !matches!(c, '\n' | '\t')))
            || (line && c == '\\')
            || matches!(c, '\u{61c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !s.chars().any(needs) {
        return s.into();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            _ if !needs(c) => out.push(c),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\\' => out.push_str("\\\\"),
            c => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
        }
    }
    out.into()
}

/// What a command ends with.
enum Failure {
    Error(Box<dyn std::error::Error>),
    Usage(String),
    NotFound,
    Conflict,
    /// The stored value is not its model's message (`get --json`).
    NotMessage(String),
}

impl<E: Into<Box<dyn std::error::Error>>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::Error(e.into())
    }
}

fn text(v: &Value) -> String {
    String::from_utf8_lossy(v.as_bytes()).into_owned()
}

fn kv_json(kv: &KeyValue) -> serde_json::Value {
    let mut j = serde_json::json!({"key": kv.key.as_str(), "revision": kv.revision.0});
    value_json(&mut j, "value", Some(&kv.value));
    j
}

/// Sets `name` in `j` to the value as a string when it is UTF-8, else `name_base64` to
/// its bytes in base64 (so JSON output is exact for any bytes); `None` is `null`.
fn value_json(j: &mut serde_json::Value, name: &str, v: Option<&Value>) {
    use base64::Engine;
    let (name, v) = match v.map(|v| std::str::from_utf8(v.as_bytes()).map_err(|_| v)) {
        None => (name.to_owned(), serde_json::Value::Null),
        Some(Ok(s)) => (name.to_owned(), s.into()),
        Some(Err(v)) => (
            format!("{name}_base64"),
            base64::engine::general_purpose::STANDARD
                .encode(v.as_bytes())
                .into(),
        ),
    };
    j[name] = v;
}

/// The most a value read from a file or standard input may hold: the built-in store's
/// largest limit (the others' are lower). Reading stops there, so an endless input
/// (`/dev/zero`) is refused, not taken into memory.
const MAX_READ: usize = datasync_raft::MAX_VALUE_SIZE;

/// The value of `put`: the argument, standard input (`-`) or a file.
/// The model of `key`, or bad usage naming the models there are.
fn model(key: &str) -> Result<&'static datasync::model::Model, Failure> {
    let found =
        datasync::model::model_for(&key_arg(key)?).map_err(|e| Failure::Usage(e.to_string()))?;
    found.ok_or_else(|| {
        let known: Vec<String> = datasync::model::models()
            .map(|m| format!("{} ({})", m.prefix, m.name))
            .collect();
        Failure::Usage(format!(
            "no model is registered for {key:?}: --json needs one (models: {})",
            known.join(", ")
        ))
    })
}

/// `v`, JSON of `key`'s model, as that protobuf message (bad usage if it is not one).
fn json_value(key: &str, v: &Value) -> Result<Value, Failure> {
    let m = model(key)?;
    let json: serde_json::Value = serde_json::from_slice(v.as_bytes())
        .map_err(|e| Failure::Usage(format!("the value is not JSON: {e}")))?;
    let bytes = m
        .from_json(&json)
        .map_err(|e| Failure::Usage(e.to_string()))?;
    Ok(Value::from(bytes))
}

fn value_arg(value: Option<String>, file: Option<PathBuf>) -> Result<Value, Failure> {
    let read = |what: &str, source: std::io::Result<Box<dyn std::io::Read>>| {
        let failed =
            |e: std::io::Error| Failure::Usage(format!("cannot read the value from {what}: {e}"));
        let mut buf = Vec::new();
        let source = source.map_err(failed)?;
        std::io::Read::read_to_end(
            &mut std::io::Read::take(source, MAX_READ as u64 + 1),
            &mut buf,
        )
        .map_err(failed)?;
        if buf.len() > MAX_READ {
            return Err(Failure::Usage(format!(
                "the value from {what} is larger than {MAX_READ} bytes"
            )));
        }
        Ok(Value::from(buf))
    };
    match (value, file) {
        (_, Some(f)) => read(
            &f.display().to_string(),
            std::fs::File::open(&f).map(|f| Box::new(f) as Box<dyn std::io::Read>),
        ),
        (Some(v), None) if v == "-" => read("standard input", Ok(Box::new(std::io::stdin()))),
        (Some(v), None) => Ok(Value::from(v)),
        (None, None) => Err(Failure::Usage(
            "put needs a value: VALUE, - (standard input) or --file F".into(),
        )),
    }
}

async fn run(mut cli: Cli) -> Result<(), Failure> {
    if cli.output == Output::Raw && !matches!(cli.command, Command::Get { .. }) {
        return Err(Failure::Usage("--output raw is for get".into()));
    }
    if let Command::Agent { config } = &cli.command {
        let config = AgentConfig::load(config.as_deref())?;
        let agent = Agent::start(config).await?;
        agent.ready().await;
        eprintln!("agent ready: {} plugin(s)", agent.status().plugins.len());
        agent.run_until_signal().await?;
        return Ok(());
    }
    if let Command::Serve {
        dir,
        id,
        listen,
        advertise,
        join,
        learner,
        http,
        etcd_listen,
        etcd_cert,
        etcd_key,
        etcd_client_ca,
        tuning,
    } = cli.command
    {
        let secret_file = cli.secret_file.ok_or_else(|| {
            Failure::Usage("serve needs --secret-file (or DATASYNC_SECRET_FILE)".into())
        })?;
        tuning.check(true).map_err(Failure::Usage)?;
        let cluster = ClusterSettings::new(listen, secret_file)
            .advertise(advertise)
            .join(join)
            .learner(learner);
        let mut store = StoreConfig::raft_member(dir, id, cluster).tuned(tuning);
        if let Some(addr) = etcd_listen {
            let mut api = datasync_agent::EtcdApiSettings::new(addr);
            if let (Some(cert), Some(key)) = (etcd_cert, etcd_key) {
                api = api.tls(cert, key, etcd_client_ca);
            }
            store = store.with_etcd_api(api);
            store.check().map_err(Failure::Usage)?;
        }
        return serve(store, http).await;
    }
    let json = cli.output == Output::Json;
    if let Command::Snapshot { action } = &cli.command
        && !matches!(action, SnapshotCommand::Save { .. })
    {
        return snapshot_offline(action, cli.secret_file.as_deref(), json).await;
    }
    match &cli.command {
        Command::Models => {
            for m in datasync::model::models() {
                say(
                    json,
                    serde_json::json!({"prefix": m.prefix, "message": m.name}),
                    || format!("{}\t{}", m.prefix, m.name),
                )?;
            }
            return Ok(());
        }
        Command::Status { agent: Some(url) } => {
            let url = url.clone();
            let s =
                tokio::task::spawn_blocking(move || datasync_agent::agent_status(&url)).await??;
            match json {
                true => out!("{}", serde_json::to_string(&s)?),
                false => write!(
                    std::io::stdout().lock(),
                    "{}",
                    escape(&datasync_agent::status_text(&s), false)
                )?,
            }
            return Ok(());
        }
        Command::Resync { plugin, agent } => {
            let (url, plugin) = (agent.clone(), plugin.clone());
            tokio::task::spawn_blocking(move || {
                datasync_agent::request_resync(&url, plugin.as_deref())
            })
            .await??;
            say(json, serde_json::json!({"requested": true}), || {
                "resync requested".to_owned()
            })?;
            return Ok(());
        }
        _ => {}
    }
    let config =
        StoreConfig::from_url(&cli.store, cli.secret_file.as_deref()).map_err(Failure::Usage)?;
    // A value is read before the store is opened: reading standard input must not hold
    // the store, and a bad source is bad usage whatever the store.
    if let Command::Get {
        key, json: true, ..
    } = &cli.command
    {
        model(key)?;
    }
    let put_value = match &mut cli.command {
        Command::Put {
            key,
            value,
            file,
            json,
            ..
        } => {
            let v = value_arg(value.take(), file.take())?;
            Some(match json {
                true => json_value(key, &v)?,
                false => v,
            })
        }
        _ => None,
    };
    // A long-running watch serves other CLI calls while it holds the store.
    let serve = matches!(cli.command, Command::Watch { .. });
    let store = AnyStore::open_or_reach(&config, serve).await?;
    let result = command(&store, cli.command, cli.output, put_value).await;
    store.shutdown().await;
    result
}

/// Runs `command` on `store`; `put_value` is the value of a `put`, read before the store
/// was opened.
async fn command(
    store: &AnyStore,
    command: Command,
    output: Output,
    put_value: Option<Value>,
) -> Result<(), Failure> {
    let json = output == Output::Json;
    let w = store.writer();
    let read = |rev: Option<u64>| match rev {
        Some(r) => ReadOptions::new().at(Revision(r)),
        None => ReadOptions::new(),
    };
    match command {
        Command::Put {
            key,
            value,
            file,
            ttl,
            ..
        } => {
            let mut opts = PutOptions::new();
            if let Some(t) = ttl {
                opts = opts.ttl(t);
            }
            let key = key_arg(&key)?;
            let value = match put_value {
                Some(v) => v,
                None => value_arg(value, file)?,
            };
            let rev = w.put(&key, value, opts).await?;
            say(json, serde_json::json!({"revision": rev.0}), || {
                format!("r{rev}")
            })?;
        }
        Command::Get {
            key,
            rev,
            json: true,
        } => {
            let m = model(&key)?;
            match w.get(&key_arg(&key)?, read(rev)).await? {
                Some(kv) => match m.to_json(kv.value.as_bytes()) {
                    Ok(j) => out!("{j}"),
                    Err(e) => return Err(Failure::NotMessage(format!("{key}: {e}"))),
                },
                None => return Err(Failure::NotFound),
            }
        }
        Command::Get { key, rev, .. } => match w.get(&key_arg(&key)?, read(rev)).await? {
            Some(kv) if output == Output::Raw => {
                let mut out = std::io::stdout().lock();
                out.write_all(kv.value.as_bytes())?;
                out.flush()?;
            }
            Some(kv) => say(json, kv_json(&kv), || {
                escape(&text(&kv.value), false).into_owned()
            })?,
            None => return Err(Failure::NotFound),
        },
        Command::Del { key, prefix } => {
            let opts = if prefix {
                DeleteOptions::new().prefix()
            } else {
                DeleteOptions::new()
            };
            let d = w.delete(&key_arg(&key)?, opts).await?;
            say(
                json,
                serde_json::json!({"deleted": d.count, "revision": d.revision.0}),
                || format!("deleted {} at r{}", d.count, d.revision),
            )?;
        }
        Command::Ls {
            prefix,
            rev,
            keys_only,
            limit,
        } => {
            let waiting = spinner(format!("listing {prefix:?}"));
            let l = w.list(&prefix_arg(&prefix)?, read(rev)).await?;
            waiting.finish_and_clear();
            let shown = &l.values[..limit.unwrap_or(usize::MAX).min(l.values.len())];
            let more = shown.len() < l.values.len();
            let bar = progress(shown.len(), "keys");
            if json {
                let values: Vec<_> = shown
                    .iter()
                    .map(|kv| match keys_only {
                        true => {
                            serde_json::json!({"key": kv.key.as_str(), "revision": kv.revision.0})
                        }
                        false => kv_json(kv),
                    })
                    .collect();
                out!(
                    "{}",
                    serde_json::json!({"revision": l.revision.0, "values": values, "more": more})
                );
            } else {
                let mut out = std::io::BufWriter::new(std::io::stdout().lock());
                for kv in shown {
                    match keys_only {
                        true => writeln!(out, "{}", kv.key)?,
                        false => writeln!(out, "{}\t{}", kv.key, escape(&text(&kv.value), true))?,
                    }
                    bar.inc(1);
                }
                out.flush()?;
                bar.finish_and_clear();
                match more {
                    true => eprintln!(
                        "{} of {} keys at r{}",
                        shown.len(),
                        l.values.len(),
                        l.revision
                    ),
                    false => eprintln!("{} keys at r{}", l.values.len(), l.revision),
                }
            }
        }
        Command::Cas {
            key,
            value,
            expect,
            absent,
        } => {
            let expect = match expect {
                Some(r) if !absent => Expect::Revision(Revision(r)),
                _ => Expect::Absent,
            };
            match w
                .compare_and_swap(
                    &key_arg(&key)?,
                    expect,
                    Value::from(value),
                    PutOptions::new(),
                )
                .await?
            {
                CasOutcome::Swapped(rev) => say(
                    json,
                    serde_json::json!({"swapped": true, "revision": rev.0}),
                    || format!("r{rev}"),
                )?,
                CasOutcome::Conflict(current) => {
                    let cur = current.as_ref().map(kv_json);
                    say(
                        json,
                        serde_json::json!({"swapped": false, "current": cur}),
                        || match &current {
                            Some(kv) => format!("conflict: {} is at r{}", kv.key, kv.revision),
                            None => "conflict: the key does not exist".to_owned(),
                        },
                    )?;
                    return Err(Failure::Conflict);
                }
            }
        }
        Command::Watch { prefixes, count } => watch(store, &prefixes, count, json).await?,
        Command::Members { change } => members(store, change, json).await?,
        Command::Status { .. } => {
            let s = store.status_with_members().await;
            match json {
                true => out!("{}", serde_json::to_string(&s)?),
                false => write!(
                    std::io::stdout().lock(),
                    "{}",
                    escape(&datasync_agent::store_text(&s), false)
                )?,
            }
        }
        Command::Snapshot {
            action: SnapshotCommand::Save { file },
        } => {
            let bytes = store.backup().await?;
            let info = datasync_raft::backup::verify(&bytes)?;
            write_durably(&file, &bytes)?;
            say(json, backup_json(&info), || {
                format!(
                    "saved r{} ({} keys, {} bytes, sha256 {}) to {}",
                    info.revision,
                    info.keys,
                    info.bytes,
                    info.sha256,
                    file.display()
                )
            })?;
        }
        Command::Agent { .. }
        | Command::Serve { .. }
        | Command::Resync { .. }
        | Command::Models
        | Command::Snapshot { .. } => {
            unreachable!("handled before opening a store")
        }
    }
    Ok(())
}

fn say(json: bool, j: serde_json::Value, t: impl FnOnce() -> String) -> Result<(), Failure> {
    if json {
        out!("{j}");
    } else {
        out!("{}", t());
    }
    Ok(())
}

async fn watch(
    store: &AnyStore,
    prefixes: &[String],
    count: Option<u64>,
    json: bool,
) -> Result<(), Failure> {
    let prefixes: Vec<Prefix> = prefixes
        .iter()
        .map(|p| prefix_arg(p))
        .collect::<Result<_, _>>()?;
    let mut w = store
        .watcher()
        .watch("cli", &prefixes, WatchOptions::default())
        .await?;
    let mut seen = 0;
    while count.is_none_or(|c| seen < c) {
        let ev = tokio::select! {
            ev = w.next() => ev,
            _ = tokio::signal::ctrl_c() => break,
        };
        let ev = match ev {
            None => break,
            Some(Err(e)) if e.is_retryable() => {
                eprintln!("watch interrupted: {e}; a resync follows");
                continue;
            }
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(ev)) => ev,
        };
        match &ev {
            Event::Resync(r) => {
                if json {
                    let values: Vec<_> = r.values().map(kv_json).collect();
                    out!(
                        "{}",
                        serde_json::json!({"resync": {"revision": r.revision.0, "reason": format!("{:?}", r.reason), "values": values}})
                    );
                } else {
                    out!("resync r{} ({:?}): {} keys", r.revision, r.reason, r.len());
                    let bar = progress(r.len(), "keys of the resync");
                    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
                    for kv in r.values() {
                        writeln!(out, "  {}\t{}", kv.key, escape(&text(&kv.value), true))?;
                        bar.inc(1);
                    }
                    out.flush()?;
                    bar.finish_and_clear();
                }
            }
            Event::Change(c) => {
                for kc in &c.changes {
                    let (prev, now) = (kc.prev.as_ref().map(text), kc.value.as_ref().map(text));
                    if json {
                        let mut change = serde_json::json!({"revision": c.revision.0, "op": format!("{:?}", kc.op), "key": kc.key.as_str()});
                        value_json(&mut change, "prev", kc.prev.as_ref());
                        value_json(&mut change, "value", kc.value.as_ref());
                        out!("{}", serde_json::json!({ "change": change }));
                    } else {
                        out!(
                            "r{} {:?} {} prev={} now={}",
                            c.revision,
                            kc.op,
                            kc.key,
                            prev.as_deref().map_or("-".into(), |v| escape(v, true)),
                            now.as_deref().map_or("-".into(), |v| escape(v, true))
                        );
                    }
                }
            }
            _ => {}
        }
        ev.into_done().ok();
        seen += 1;
    }
    Ok(())
}

/// A progress bar on stderr for `len` items, drawn only on a terminal and only when
/// there are many.
fn progress(len: usize, what: &'static str) -> ProgressBar {
    if len < 1000 {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len as u64), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}") {
        bar.set_style(style);
    }
    bar.set_message(what);
    bar
}

/// A spinner on stderr while a call runs (drawn only on a terminal).
fn spinner(msg: String) -> ProgressBar {
    let s = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    s.set_message(msg);
    s.enable_steady_tick(Duration::from_millis(120));
    s
}

/// Runs a raft store node until SIGINT or SIGTERM, then shuts it down cleanly.
async fn serve(config: StoreConfig, http: Option<std::net::SocketAddr>) -> Result<(), Failure> {
    let store = AnyStore::open(&config).await?;
    let AnyStore::Raft(node) = &store else {
        return Err(Failure::Usage("serve runs a raft store".into()));
    };
    let http = match http {
        Some(addr) => {
            let h = datasync_agent::serve_store_http(addr, store.clone()).await?;
            eprintln!("status endpoint on http://{}", h.addr());
            Some(h)
        }
        None => None,
    };
    let etcd_api = match &config {
        StoreConfig::Raft {
            etcd_api: Some(api),
            ..
        } => {
            let api = datasync_agent::serve_etcd_api(&store, api).await?;
            eprintln!("etcd API on {}", api.addr());
            Some(api)
        }
        _ => None,
    };
    eprintln!(
        "node {} serving on {} (members: {:?})",
        node.node_id(),
        node.cluster_addr().unwrap_or("-"),
        node.members().voters.keys().collect::<Vec<_>>()
    );
    wait_for_signal().await?;
    eprintln!("shutting down");
    if let Some(h) = http {
        h.stop().await;
    }
    if let Some(api) = etcd_api {
        api.stop().await;
    }
    store.shutdown().await;
    Ok(())
}

fn backup_json(info: &datasync_raft::backup::BackupInfo) -> serde_json::Value {
    serde_json::json!({
        "revision": info.revision,
        "keys": info.keys,
        "bytes": info.bytes,
        "sha256": info.sha256,
    })
}

/// Writes `bytes` to `path` whole or not at all: a temporary file beside it, synced,
/// renamed over it, and the directory synced.
fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), Failure> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// `snapshot restore` and `snapshot status`: they work on files, not on a store.
async fn snapshot_offline(
    action: &SnapshotCommand,
    secret_file: Option<&Path>,
    json: bool,
) -> Result<(), Failure> {
    let read = |file: &Path| {
        std::fs::read(file)
            .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", file.display())))
    };
    match action {
        SnapshotCommand::Status { file } => {
            let info = datasync_raft::backup::verify(&read(file)?)?;
            say(json, backup_json(&info), || {
                format!(
                    "r{}, {} keys, {} bytes, sha256 {}",
                    info.revision, info.keys, info.bytes, info.sha256
                )
            })
        }
        SnapshotCommand::Restore {
            file,
            dir,
            id,
            listen,
            advertise,
        } => {
            let bytes = read(file)?;
            let mut config = datasync_raft::RaftConfig::new(dir);
            config.node_id = *id;
            if let Some(listen) = listen {
                let secret = secret_file
                    .ok_or_else(|| Failure::Usage("a cluster member needs --secret-file".into()))?;
                let mut c = datasync_raft::ClusterConfig::new(
                    *listen,
                    datasync_raft::Secret::from_file(secret)?,
                );
                if let Some(a) = advertise {
                    c = c.advertise(a.clone());
                }
                config = config.cluster(*id, c);
            }
            let info = datasync_raft::RaftStore::restore(&bytes, config).await?;
            say(json, backup_json(&info), || {
                format!(
                    "restored r{} ({} keys) into {}",
                    info.revision,
                    info.keys,
                    dir.display()
                )
            })
        }
        SnapshotCommand::Save { .. } => unreachable!("save needs the store"),
    }
}

/// A node id: decimal, or hex after `0x` (as `etcdctl` prints member ids, without it).
fn node_id(s: &str) -> Result<u64, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|e| format!("{s:?} is not a node id (decimal, or hex as 0x…): {e}"))
}

async fn wait_for_signal() -> Result<(), Failure> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

async fn members(
    store: &AnyStore,
    change: Option<MembersCommand>,
    json: bool,
) -> Result<(), Failure> {
    match change {
        Some(MembersCommand::Add { id, addr, learner }) => {
            let role = if learner { Role::Learner } else { Role::Voter };
            store.add_member(id, &addr, role).await?;
        }
        Some(MembersCommand::Remove { id }) => store.remove_member(id).await?,
        Some(MembersCommand::Update { id, addr }) => store.update_member(id, &addr).await?,
        None => {}
    }
    let m = store.members().await?;
    if json {
        let list = |m: &std::collections::BTreeMap<u64, String>| {
            m.iter()
                .map(|(id, addr)| serde_json::json!({"id": id, "addr": addr}))
                .collect::<Vec<_>>()
        };
        out!(
            "{}",
            serde_json::json!({"voters": list(&m.voters), "learners": list(&m.learners), "joint": m.joint})
        );
    } else {
        for (id, addr) in &m.voters {
            out!("{id}\tvoter\t{addr}");
        }
        for (id, addr) in &m.learners {
            out!("{id}\tlearner\t{addr}");
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // Logs go to stderr; RUST_LOG picks what (default: info for the agent, warn else).
    let default = if matches!(cli.command, Command::Agent { .. } | Command::Serve { .. }) {
        "info,openraft=warn"
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(2)
        }
        Err(Failure::NotFound) => ExitCode::from(3),
        Err(Failure::NotMessage(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(5)
        }
        Err(Failure::Conflict) => ExitCode::from(4),
        Err(Failure::Error(e))
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::from(141)
        }
        Err(Failure::Error(e)) => {
            eprintln!("error: {}", datasync::error_chain(&*e));
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::node_id;

    #[test]
    fn node_ids_are_decimal_or_0x_hex() {
        assert_eq!(node_id("10"), Ok(10));
        assert_eq!(node_id("0x10"), Ok(16));
        assert_eq!(node_id("0XfF"), Ok(255));
        for bad in ["", "0x", "-1", "10x", "0x1g", "18446744073709551616"] {
            assert!(node_id(bad).is_err(), "{bad:?}");
        }
    }
}

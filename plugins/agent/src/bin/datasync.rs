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
//! ```
//!
//! `--store` (or `DATASYNC_STORE`) picks the store: a directory (or `raft:DIR`) for the
//! embedded raft store (default `./data`; one process at a time), `nats://HOST:PORT`
//! (`?bucket=NAME`, default `datasync`), or `etcd://HOST:PORT` when built with the
//! `etcd` feature.
//!
//! Logs go to stderr, filtered by `RUST_LOG` (default `info` for `agent`, `warn` else).
//!
//! Exit codes: 0 done; 1 the store or the agent failed; 2 bad usage; 3 the key does not
//! exist (`get`); 4 the compare-and-swap found another revision (`cas`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use datasync::{
    CasOutcome, DeleteOptions, Event, Expect, Key, KeyValue, Prefix, PutOptions, ReadOptions,
    Revision, Value, WatchOptions,
};
use datasync_agent::{Agent, AgentConfig, AnyStore, StoreConfig};
use futures_util::StreamExt;
// Plugins linked into this agent (a crate nothing references is not linked).
use datasync_file_mirror as _;

#[derive(Parser, Debug)]
#[command(
    name = "datasync",
    version,
    about = "Read, write and watch a datasync store; run the agent."
)]
struct Cli {
    /// The store: a directory or raft:DIR (embedded), nats://HOST:PORT[?bucket=B], etcd://HOST:PORT.
    #[arg(long, global = true, env = "DATASYNC_STORE", default_value = "./data")]
    store: String,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Writes a value.
    Put {
        key: String,
        value: String,
        /// Delete the key after this long (e.g. 500ms, 30s, 5m).
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
    },
    /// Reads a value (exit code 3 if absent).
    Get {
        key: String,
        /// Read at this past revision.
        #[arg(long)]
        rev: Option<u64>,
    },
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
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("bad duration unit in {s:?} (ms, s, m, h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("bad duration {s:?}: {e}"))
}

fn store_config(url: &str) -> Result<StoreConfig, String> {
    if url.starts_with("nats://") || url.starts_with("tls://") {
        let (server, query) = url.split_once('?').unwrap_or((url, ""));
        let bucket = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("bucket="))
            .unwrap_or("datasync");
        let toml =
            format!("[store]\nkind = \"nats\"\nservers = [{server:?}]\nbucket = {bucket:?}\n");
        return parse_store(&toml);
    }
    if let Some(rest) = url.strip_prefix("etcd://") {
        let toml = format!("[store]\nkind = \"etcd\"\nendpoints = [\"http://{rest}\"]\n");
        return parse_store(&toml);
    }
    let dir = url.strip_prefix("raft:").unwrap_or(url);
    Ok(StoreConfig::Raft { dir: dir.into() })
}

fn parse_store(toml: &str) -> Result<StoreConfig, String> {
    AgentConfig::parse(toml, "--store", std::iter::empty())
        .map(|c| c.store)
        .map_err(|e| e.to_string())
}

/// What a command ends with.
enum Failure {
    Error(Box<dyn std::error::Error>),
    NotFound,
    Conflict,
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
    serde_json::json!({"key": kv.key.as_str(), "value": text(&kv.value), "revision": kv.revision.0})
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let json = cli.output == Output::Json;
    if let Command::Agent { config } = &cli.command {
        let config = AgentConfig::load(config.as_deref())?;
        let agent = Agent::start(config).await?;
        agent.ready().await;
        eprintln!("agent ready: {} plugin(s)", agent.status().plugins.len());
        agent.run_until_signal().await?;
        return Ok(());
    }
    let store = AnyStore::open(&store_config(&cli.store)?).await?;
    let result = command(&store, cli.command, json).await;
    store.shutdown().await;
    result
}

async fn command(store: &AnyStore, command: Command, json: bool) -> Result<(), Failure> {
    let w = store.writer();
    let read = |rev: Option<u64>| match rev {
        Some(r) => ReadOptions::new().at(Revision(r)),
        None => ReadOptions::new(),
    };
    match command {
        Command::Put { key, value, ttl } => {
            let mut opts = PutOptions::new();
            if let Some(t) = ttl {
                opts = opts.ttl(t);
            }
            let rev = w.put(&Key::new(&key)?, Value::from(value), opts).await?;
            say(json, serde_json::json!({"revision": rev.0}), || {
                format!("r{rev}")
            });
        }
        Command::Get { key, rev } => match w.get(&Key::new(&key)?, read(rev)).await? {
            Some(kv) => say(json, kv_json(&kv), || text(&kv.value)),
            None => return Err(Failure::NotFound),
        },
        Command::Del { key, prefix } => {
            let opts = if prefix {
                DeleteOptions::new().prefix()
            } else {
                DeleteOptions::new()
            };
            let d = w.delete(&Key::new(&key)?, opts).await?;
            say(
                json,
                serde_json::json!({"deleted": d.count, "revision": d.revision.0}),
                || format!("deleted {} at r{}", d.count, d.revision),
            );
        }
        Command::Ls { prefix, rev } => {
            let l = w.list(&Prefix::new(&prefix)?, read(rev)).await?;
            if json {
                let values: Vec<_> = l.values.iter().map(kv_json).collect();
                println!(
                    "{}",
                    serde_json::json!({"revision": l.revision.0, "values": values})
                );
            } else {
                for kv in &l.values {
                    println!("{}\t{}", kv.key, text(&kv.value));
                }
                eprintln!("{} keys at r{}", l.values.len(), l.revision);
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
                    &Key::new(&key)?,
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
                ),
                CasOutcome::Conflict(current) => {
                    let cur = current.as_ref().map(kv_json);
                    say(
                        json,
                        serde_json::json!({"swapped": false, "current": cur}),
                        || match &current {
                            Some(kv) => format!("conflict: {} is at r{}", kv.key, kv.revision),
                            None => "conflict: the key does not exist".to_owned(),
                        },
                    );
                    return Err(Failure::Conflict);
                }
            }
        }
        Command::Watch { prefixes, count } => watch(store, &prefixes, count, json).await?,
        Command::Agent { .. } => unreachable!("handled before opening a store"),
    }
    Ok(())
}

fn say(json: bool, j: serde_json::Value, t: impl FnOnce() -> String) {
    if json {
        println!("{j}");
    } else {
        println!("{}", t());
    }
}

async fn watch(
    store: &AnyStore,
    prefixes: &[String],
    count: Option<u64>,
    json: bool,
) -> Result<(), Failure> {
    let prefixes: Vec<Prefix> = prefixes.iter().map(Prefix::new).collect::<Result<_, _>>()?;
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
                    println!(
                        "{}",
                        serde_json::json!({"resync": {"revision": r.revision.0, "reason": format!("{:?}", r.reason), "values": values}})
                    );
                } else {
                    println!("resync r{} ({:?}): {} keys", r.revision, r.reason, r.len());
                    for kv in r.values() {
                        println!("  {}\t{}", kv.key, text(&kv.value));
                    }
                }
            }
            Event::Change(c) => {
                for kc in &c.changes {
                    let (prev, now) = (kc.prev.as_ref().map(text), kc.value.as_ref().map(text));
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"change": {"revision": c.revision.0, "op": format!("{:?}", kc.op), "key": kc.key.as_str(), "prev": prev, "value": now}})
                        );
                    } else {
                        println!(
                            "r{} {:?} {} prev={} now={}",
                            c.revision,
                            kc.op,
                            kc.key,
                            prev.as_deref().unwrap_or("-"),
                            now.as_deref().unwrap_or("-")
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

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // Logs go to stderr; RUST_LOG picks what (default: info for the agent, warn else).
    let default = if matches!(cli.command, Command::Agent { .. }) {
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
        Err(Failure::NotFound) => ExitCode::from(3),
        Err(Failure::Conflict) => ExitCode::from(4),
        Err(Failure::Error(e)) => {
            let mut msg = format!("error: {e}");
            let mut src = e.source();
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            eprintln!("{msg}");
            ExitCode::from(1)
        }
    }
}

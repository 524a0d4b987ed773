//! The agent's configuration: a TOML file, then environment overrides.
//!
//! ```toml
//! [store]                 # which store; the default is the embedded raft store
//! kind = "raft"           # "raft" | "nats" | "etcd"
//! dir = "./data"          # raft: the data directory
//! # servers = ["nats://127.0.0.1:4222"]   # nats
//! # bucket = "datasync"                   # nats
//! # endpoints = ["http://127.0.0.1:2379"] # etcd
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
//! (`DATASYNC__STORE__KIND=nats`); its value is read as TOML if it parses (numbers,
//! booleans, arrays), else as a string. Errors name the file and the field.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

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
    /// The embedded raft store (single node).
    Raft {
        /// The data directory.
        #[serde(default = "default_dir")]
        dir: PathBuf,
    },
    /// NATS JetStream Key-Value.
    Nats {
        /// Server URLs.
        servers: Vec<String>,
        /// The bucket.
        #[serde(default = "default_bucket")]
        bucket: String,
    },
    /// etcd v3.
    Etcd {
        /// Client URLs.
        endpoints: Vec<String>,
        /// Prefix of every key in etcd.
        #[serde(default)]
        namespace: String,
    },
}

fn default_dir() -> PathBuf {
    PathBuf::from("./data")
}

fn default_bucket() -> String {
    "datasync".into()
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig::Raft { dir: default_dir() }
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
        Self::parse(&text, &origin, std::env::vars())
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
            toml::from_str(text).map_err(|e| invalid(origin, e.to_string()))?;
        let _: AgentConfig = AgentConfig::deserialize(toml::Value::Table(table.clone()))
            .map_err(|e| invalid(origin, e.to_string()))?;
        let mut overridden = Vec::new();
        for (name, value) in env {
            let Some(path) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let parts: Vec<String> = path.split("__").map(|p| p.to_ascii_lowercase()).collect();
            let (last, sections) = parts
                .split_last()
                .ok_or_else(|| invalid("the environment", format!("{name}: no key")))?;
            let mut t = &mut table;
            for s in sections {
                t = t
                    .entry(s.clone())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                    .as_table_mut()
                    .ok_or_else(|| {
                        invalid("the environment", format!("{name}: `{s}` is not a section"))
                    })?;
            }
            let parsed = format!("v = {value}")
                .parse::<toml::Table>()
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or(toml::Value::String(value));
            t.insert(last.clone(), parsed);
            overridden.push(name);
        }
        AgentConfig::deserialize(toml::Value::Table(table)).map_err(|e| {
            invalid(
                &format!("{origin} with overrides {}", overridden.join(", ")),
                e.to_string(),
            )
        })
    }
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
    fn empty_is_the_zero_setup_default() {
        let c = AgentConfig::parse("", "x", env(&[])).expect("valid");
        assert_eq!(c, AgentConfig::default());
        assert_eq!(
            c.store,
            StoreConfig::Raft {
                dir: "./data".into()
            }
        );
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
                bucket: "agents".into()
            }
        );
        assert_eq!(c.coordinator.change_timeout(), Duration::from_millis(500));
        assert_eq!(c.plugins["file-mirror"]["dir"], "/tmp/m");
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

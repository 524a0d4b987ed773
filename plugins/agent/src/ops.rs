//! Talking to a running agent's status endpoint (the CLI's `status` and `resync`).

use std::fmt::Write as _;
use std::time::Duration;

use crate::{AgentError, StatusBody, StoreStatus};

/// How long a call to an agent may take.
const WITHIN: Duration = Duration::from_secs(10);

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(WITHIN))
        .http_status_as_error(false)
        .build()
        .into()
}

fn failed(url: &str, reason: impl std::fmt::Display) -> AgentError {
    AgentError::Endpoint {
        url: url.to_owned(),
        reason: reason.to_string(),
    }
}

/// `url` without a trailing slash, with `path`.
fn at(base: &str, path: &str) -> String {
    format!("{}{path}", base.trim_end_matches('/'))
}

/// Reads `GET /status` of the agent (or `datasync serve`) at `base`
/// (e.g. `http://127.0.0.1:9191`). Blocking.
pub fn agent_status(base: &str) -> Result<StatusBody, AgentError> {
    let url = at(base, "/status");
    let mut resp = agent().get(&url).call().map_err(|e| failed(&url, e))?;
    let code = resp.status();
    let body = resp
        .body_mut()
        .with_config()
        .limit(16 << 20)
        .read_to_string()
        .map_err(|e| failed(&url, e))?;
    if !code.is_success() {
        return Err(failed(&url, format!("{code}: {}", body.trim())));
    }
    serde_json::from_str(&body).map_err(|e| failed(&url, format!("not a status: {e}")))
}

/// Asks the agent at `base` for a resync pass (`POST /resync`, `?plugin=NAME` to check
/// the plugin exists). Blocking.
pub fn request_resync(base: &str, plugin: Option<&str>) -> Result<(), AgentError> {
    let url = at(base, "/resync");
    let mut req = agent().post(&url);
    if let Some(p) = plugin {
        req = req.query("plugin", p);
    }
    let mut resp = req.send_empty().map_err(|e| failed(&url, e))?;
    let code = resp.status();
    if code.is_success() {
        return Ok(());
    }
    let body = resp
        .body_mut()
        .with_config()
        .limit(1 << 16)
        .read_to_string()
        .unwrap_or_default();
    Err(failed(&url, format!("{code}: {}", body.trim())))
}

/// The store's part of a status, as text (one `name value` line per fact).
pub fn store_text(s: &StoreStatus) -> String {
    let mut out = String::new();
    let _ = write!(out, "store\t{}", s.kind);
    if let Some(id) = s.node_id {
        let _ = write!(out, " (node {id})");
    }
    out.push('\n');
    if s.kind == "raft" {
        let leader = s.leader.map_or("none".to_owned(), |l| l.to_string());
        let _ = writeln!(out, "leader\t{leader} (term {})", s.term.unwrap_or(0));
    }
    if let Some(r) = s.revision {
        let _ = writeln!(out, "revision\t{r}");
    }
    if let Some(b) = s.db_bytes {
        let _ = writeln!(out, "database\t{b} bytes");
    }
    if let Some(w) = s.watches {
        let _ = writeln!(out, "watches\t{w}");
    }
    for m in &s.members {
        let _ = writeln!(out, "member\t{} {} {}", m.id, m.role, m.addr);
    }
    if let Some(why) = &s.stopped {
        let _ = writeln!(out, "stopped\t{why}");
    }
    if let Some(e) = &s.error {
        let _ = writeln!(out, "error\t{e}");
    }
    out
}

/// A whole status as text: the store, then the agent's sources and plugins.
pub fn status_text(s: &StatusBody) -> String {
    let mut out = store_text(&s.store);
    let _ = writeln!(out, "ready\t{}", if s.ready { "yes" } else { "no" });
    if let Some(why) = &s.stopped {
        let _ = writeln!(out, "coordinator\tstopped: {why}");
    }
    for src in &s.sources {
        let name = if src.name.is_empty() {
            "store"
        } else {
            &src.name
        };
        let _ = write!(
            out,
            "source\t{name}: {} passes, revision {}",
            src.passes, src.revision
        );
        if let Some(r) = &src.last_resync {
            let _ = write!(out, ", last resync {r}");
        }
        if let Some(why) = src.stopped.as_ref().or(src.interrupted.as_ref()) {
            let _ = write!(out, ", {why}");
        }
        out.push('\n');
    }
    for p in &s.plugins {
        let _ = write!(
            out,
            "plugin\t{}: {}, revision {}, {} resyncs, {} changes, {} failures",
            p.name, p.state, p.revision, p.resyncs, p.changes, p.failures
        );
        if let Some(e) = &p.last_error {
            let _ = write!(out, ", last error at r{}: {}", e.revision, e.error);
        }
        out.push('\n');
    }
    out
}

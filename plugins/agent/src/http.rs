//! The status endpoint: `/healthz`, `/readyz`, `/status` (JSON), `/metrics`
//! (Prometheus text).

use std::fmt::Write as _;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use datasync::coordinator::{CoordinatorStatus, PluginState, PluginStatus};
use serde::Serialize;
use tokio::sync::watch;

type Status = watch::Receiver<CoordinatorStatus>;

/// A metric family over plugins: name, type, help, value.
type Family = (
    &'static str,
    &'static str,
    &'static str,
    fn(&PluginStatus) -> u64,
);

pub(crate) fn router(status: Status) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status_json))
        .route("/metrics", get(metrics))
        .with_state(status)
}

fn state_name(s: PluginState) -> &'static str {
    match s {
        PluginState::Pending => "pending",
        PluginState::Resyncing => "resyncing",
        PluginState::Ready => "ready",
        PluginState::Failed => "failed",
        PluginState::TimedOut => "timed_out",
        PluginState::OutOfSync => "out_of_sync",
        _ => "unknown",
    }
}

/// A Prometheus label value: backslash, quote and newline escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Ready while the coordinator follows every source (each had a pass, none stopped)
/// and every plugin took its resync.
pub(crate) fn is_ready(s: &CoordinatorStatus) -> bool {
    s.following() && s.plugins.iter().all(|p| p.state == PluginState::Ready)
}

/// Alive until the coordinator has stopped (the agent then exits, non-zero).
async fn healthz(State(status): State<Status>) -> Response {
    match &status.borrow().stopped {
        None => (StatusCode::OK, "ok\n").into_response(),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("coordinator stopped: {why}\n"),
        )
            .into_response(),
    }
}

async fn readyz(State(status): State<Status>) -> Response {
    let s = status.borrow().clone();
    if is_ready(&s) {
        return (StatusCode::OK, "ready\n").into_response();
    }
    if let Some(why) = &s.stopped {
        let body = format!("not ready: coordinator stopped: {why}\n");
        return (StatusCode::SERVICE_UNAVAILABLE, body).into_response();
    }
    let sources: Vec<String> = s
        .sources
        .iter()
        .filter_map(|src| match (&src.stopped, &src.interrupted) {
            (Some(why), _) => Some(format!("source {:?} stopped: {why}", src.name)),
            (None, Some(why)) => Some(format!("source {:?} interrupted: {why}", src.name)),
            (None, None) if src.passes == 0 => Some(format!("source {:?}: no pass yet", src.name)),
            (None, None) => None,
        })
        .collect();
    if !sources.is_empty() {
        let body = format!("not ready: {}\n", sources.join(", "));
        return (StatusCode::SERVICE_UNAVAILABLE, body).into_response();
    }
    let waiting: Vec<String> = s
        .plugins
        .iter()
        .filter(|p| p.state != PluginState::Ready)
        .map(|p| format!("{}: {}", p.name, state_name(p.state)))
        .collect();
    let body = format!("not ready ({} passes): {}\n", s.passes, waiting.join(", "));
    (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
}

#[derive(Serialize)]
struct StatusBody {
    ready: bool,
    passes: u64,
    stopped: Option<String>,
    sources: Vec<SourceBody>,
    plugins: Vec<PluginBody>,
}

#[derive(Serialize)]
struct SourceBody {
    name: String,
    passes: u64,
    revision: u64,
    stopped: Option<String>,
    interrupted: Option<String>,
}

#[derive(Serialize)]
struct PluginBody {
    name: String,
    state: &'static str,
    revision: u64,
    answer_seconds: f64,
    resyncs: u64,
    changes: u64,
    failures: u64,
    last_error: Option<ErrorBody>,
}

#[derive(Serialize)]
struct ErrorBody {
    revision: u64,
    error: String,
}

async fn status_json(State(status): State<Status>) -> Response {
    let s = status.borrow().clone();
    let body = StatusBody {
        ready: is_ready(&s),
        passes: s.passes,
        stopped: s.stopped.clone(),
        sources: s
            .sources
            .iter()
            .map(|src| SourceBody {
                name: src.name.to_string(),
                passes: src.passes,
                revision: src.revision.0,
                stopped: src.stopped.clone(),
                interrupted: src.interrupted.clone(),
            })
            .collect(),
        plugins: s
            .plugins
            .iter()
            .map(|p| PluginBody {
                name: p.name.clone(),
                state: state_name(p.state),
                revision: p.revision.0,
                answer_seconds: p.answer_time.as_secs_f64(),
                resyncs: p.resyncs,
                changes: p.changes,
                failures: p.failures,
                last_error: p.last_error.as_ref().map(|(r, e)| ErrorBody {
                    revision: r.0,
                    error: e.to_string(),
                }),
            })
            .collect(),
    };
    axum::Json(body).into_response()
}

async fn metrics(State(status): State<Status>) -> Response {
    let s = status.borrow().clone();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP datasync_resync_passes_total Completed resync passes."
    );
    let _ = writeln!(out, "# TYPE datasync_resync_passes_total counter");
    let _ = writeln!(out, "datasync_resync_passes_total {}", s.passes);
    let _ = writeln!(
        out,
        "# HELP datasync_coordinator_up 1 while the coordinator runs, 0 once it stopped."
    );
    let _ = writeln!(out, "# TYPE datasync_coordinator_up gauge");
    let _ = writeln!(
        out,
        "datasync_coordinator_up {}",
        u8::from(s.stopped.is_none())
    );
    let families: [Family; 5] = [
        (
            "datasync_plugin_resyncs_total",
            "counter",
            "Resyncs handed to the plugin.",
            |p| p.resyncs,
        ),
        (
            "datasync_plugin_changes_total",
            "counter",
            "Change events handed to the plugin.",
            |p| p.changes,
        ),
        (
            "datasync_plugin_errors_total",
            "counter",
            "Events the plugin failed, timed out or dropped.",
            |p| p.failures,
        ),
        (
            "datasync_plugin_revision",
            "gauge",
            "Revision of the last event the plugin answered with success.",
            |p| p.revision.0,
        ),
        (
            "datasync_plugin_ready",
            "gauge",
            "1 if the plugin took its last resync and receives changes.",
            |p| u64::from(p.state == PluginState::Ready),
        ),
    ];
    for (name, kind, help, value) in families {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for p in &s.plugins {
            let _ = writeln!(out, "{name}{{plugin=\"{}\"}} {}", label(&p.name), value(p));
        }
    }
    let name = "datasync_plugin_answer_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Time from handing an event to the plugin to its answer."
    );
    let _ = writeln!(out, "# TYPE {name} summary");
    for p in &s.plugins {
        let plugin = label(&p.name);
        let sum = p.answer_time.as_secs_f64();
        let _ = writeln!(out, "{name}_sum{{plugin=\"{plugin}\"}} {sum}");
        let count = p.resyncs + p.changes;
        let _ = writeln!(out, "{name}_count{{plugin=\"{plugin}\"}} {count}");
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

#[cfg(test)]
mod tests {
    #[test]
    fn labels_are_escaped() {
        assert_eq!(super::label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}

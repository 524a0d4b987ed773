//! The status endpoint: `/healthz`, `/readyz`, `/status` (JSON), `/metrics`
//! (Prometheus text, by `prometheus-client`), `POST /resync`.
//!
//! Served by the agent (store, coordinator and plugins) and by `datasync serve` (the
//! store alone: no coordinator).

use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use datasync::coordinator::{CoordinatorStatus, PluginState, ResyncTrigger};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{AnyStore, StoreStatus};

type Status = watch::Receiver<CoordinatorStatus>;

/// What the endpoint serves from.
#[derive(Clone)]
pub(crate) struct Endpoint {
    /// The agent's coordinator (`None` for `datasync serve`).
    pub(crate) coordinator: Option<(Status, ResyncTrigger)>,
    pub(crate) store: AnyStore,
    pub(crate) registry: Arc<Registry>,
}

impl Endpoint {
    /// An endpoint for `store`, with the store's metrics, and the coordinator's if any.
    /// With `requests`, the plugins' requests too.
    pub(crate) fn new(
        store: AnyStore,
        coordinator: Option<(Status, ResyncTrigger)>,
        requests: Option<&crate::metered::RequestMetrics>,
    ) -> Self {
        let mut registry = Registry::default();
        store.register_metrics(&mut registry);
        if let Some(r) = requests {
            r.register(&mut registry);
        }
        if let Some((status, _)) = &coordinator {
            registry.register_collector(Box::new(CoordinatorMetrics(status.clone())));
        }
        Endpoint {
            coordinator,
            store,
            registry: Arc::new(registry),
        }
    }
}

pub(crate) fn router(endpoint: Endpoint) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status_json))
        .route("/metrics", get(metrics))
        .route("/resync", post(resync))
        .with_state(endpoint)
}

pub(crate) fn state_name(s: PluginState) -> &'static str {
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

/// Ready while the coordinator follows every source (each had a pass, none stopped)
/// and every plugin took its resync.
pub(crate) fn is_ready(s: &CoordinatorStatus) -> bool {
    s.following() && s.plugins.iter().all(|p| p.state == PluginState::Ready)
}

fn unavailable(body: String) -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
}

/// Alive until the store has stopped for good (raft failed, its writer failed) or the
/// coordinator has stopped (the agent then exits, non-zero).
async fn healthz(State(ep): State<Endpoint>) -> Response {
    if let Some(why) = ep.store.status().stopped {
        return unavailable(format!("store stopped: {why}\n"));
    }
    if let Some((status, _)) = &ep.coordinator
        && let Some(why) = &status.borrow().stopped
    {
        return unavailable(format!("coordinator stopped: {why}\n"));
    }
    (StatusCode::OK, "ok\n").into_response()
}

/// Ready when the store can serve (running, a leader known) and, on an agent, the
/// coordinator follows every source and every plugin took its resync.
async fn readyz(State(ep): State<Endpoint>) -> Response {
    let store = ep.store.status();
    if let Some(why) = &store.stopped {
        return unavailable(format!("not ready: store stopped: {why}\n"));
    }
    if !store.can_serve() {
        return unavailable(match store.leader {
            None => "not ready: the store knows no leader\n".into(),
            Some(l) => {
                format!("not ready: the store hears no live leader (last: {l}), or has left\n")
            }
        });
    }
    let Some((status, _)) = &ep.coordinator else {
        return (StatusCode::OK, "ready\n").into_response();
    };
    let s = status.borrow().clone();
    if is_ready(&s) {
        return (StatusCode::OK, "ready\n").into_response();
    }
    if let Some(why) = &s.stopped {
        return unavailable(format!("not ready: coordinator stopped: {why}\n"));
    }
    let sources: Vec<String> = s
        .sources
        .iter()
        .filter_map(|src| match (&src.stopped, &src.interrupted) {
            (Some(why), _) => Some(format!("source {:?} stopped: {why}", src.name)),
            (None, Some(why)) => Some(format!("source {:?} interrupted: {why}", src.name)),
            (None, None) if !src.synced() => Some(format!("source {:?}: no pass yet", src.name)),
            (None, None) => None,
        })
        .collect();
    if !sources.is_empty() {
        return unavailable(format!("not ready: {}\n", sources.join(", ")));
    }
    let waiting: Vec<String> = s
        .plugins
        .iter()
        .filter(|p| p.state != PluginState::Ready)
        .map(|p| format!("{}: {}", p.name, state_name(p.state)))
        .collect();
    unavailable(format!(
        "not ready ({} passes): {}\n",
        s.passes,
        waiting.join(", ")
    ))
}

/// `GET /status`: the store, and on an agent the coordinator, its sources and plugins.
#[derive(Serialize, Deserialize, Debug)]
pub struct StatusBody {
    /// As `/readyz` answers.
    pub ready: bool,
    /// The store.
    pub store: StoreStatus,
    /// Completed resync passes (an agent's).
    pub passes: u64,
    /// Why the coordinator stopped, if it did.
    pub stopped: Option<String>,
    /// The watch's sources.
    pub sources: Vec<SourceBody>,
    /// The plugins, in resync order.
    pub plugins: Vec<PluginBody>,
}

/// One source of the agent's watch.
#[derive(Serialize, Deserialize, Debug)]
pub struct SourceBody {
    /// Its name (`""` for a plain store).
    pub name: String,
    /// Resync passes.
    pub passes: u64,
    /// Revision of the last event handed to the plugins.
    pub revision: u64,
    /// Why its watch stopped.
    pub stopped: Option<String>,
    /// Why its watch is interrupted.
    pub interrupted: Option<String>,
    /// The reason of its last resync pass (`requested` after `POST /resync`).
    pub last_resync: Option<String>,
}

/// One plugin.
#[derive(Serialize, Deserialize, Debug)]
pub struct PluginBody {
    /// Its name.
    pub name: String,
    /// `pending`, `resyncing`, `ready`, `failed`, `timed_out` or `out_of_sync`.
    pub state: String,
    /// Revision of the last event it answered with success.
    pub revision: u64,
    /// Time it took to answer, summed over every event.
    pub answer_seconds: f64,
    /// Resyncs handed to it.
    pub resyncs: u64,
    /// Changes handed to it.
    pub changes: u64,
    /// Events it failed, timed out or dropped.
    pub failures: u64,
    /// Its latest failure.
    pub last_error: Option<ErrorBody>,
}

/// A plugin's failure.
#[derive(Serialize, Deserialize, Debug)]
pub struct ErrorBody {
    /// The revision of the event.
    pub revision: u64,
    /// What went wrong.
    pub error: String,
}

async fn status_json(State(ep): State<Endpoint>) -> Response {
    let store = ep.store.status_with_members().await;
    let store_ready = store.can_serve();
    let Some((status, _)) = &ep.coordinator else {
        return axum::Json(StatusBody {
            ready: store_ready,
            store,
            passes: 0,
            stopped: None,
            sources: Vec::new(),
            plugins: Vec::new(),
        })
        .into_response();
    };
    let s = status.borrow().clone();
    let body = StatusBody {
        ready: store_ready && is_ready(&s),
        store,
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
                last_resync: src.last_reason.map(|r| r.as_str().to_owned()),
            })
            .collect(),
        plugins: s
            .plugins
            .iter()
            .map(|p| PluginBody {
                name: p.name.clone(),
                state: state_name(p.state).to_owned(),
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

async fn metrics(State(ep): State<Endpoint>) -> Response {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &ep.registry) {
        return (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        )],
        out,
    )
        .into_response()
}

#[derive(Deserialize)]
struct ResyncQuery {
    plugin: Option<String>,
}

/// `POST /resync[?plugin=NAME]`: a resync pass of every plugin, in order (202). A pass
/// is a cut of the one stream every plugin shares, so asking for one plugin's resync
/// (checked to exist: 404 if not) resyncs them all; each gets reason `Requested`.
async fn resync(State(ep): State<Endpoint>, Query(q): Query<ResyncQuery>) -> Response {
    let Some((status, trigger)) = &ep.coordinator else {
        return (StatusCode::NOT_FOUND, "no plugins here: not an agent\n").into_response();
    };
    if let Some(name) = &q.plugin
        && status.borrow().plugin(name).is_none()
    {
        return (StatusCode::NOT_FOUND, format!("no plugin {name:?}\n")).into_response();
    }
    trigger.request_resync();
    (StatusCode::ACCEPTED, "resync requested\n").into_response()
}

/// The coordinator's metrics, read from its status at each scrape.
#[derive(Debug)]
struct CoordinatorMetrics(Status);

type Family = (
    &'static str,
    MetricType,
    &'static str,
    fn(&datasync::coordinator::PluginStatus) -> f64,
);

impl Collector for CoordinatorMetrics {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let s = self.0.borrow().clone();
        let c = ConstCounter::new(s.passes);
        c.encode(e.encode_descriptor(
            "datasync_resync_passes",
            "Completed resync passes.",
            None,
            c.metric_type(),
        )?)?;
        let g = ConstGauge::new(i64::from(s.stopped.is_none()));
        g.encode(e.encode_descriptor(
            "datasync_coordinator_up",
            "1 while the coordinator runs, 0 once it stopped.",
            None,
            g.metric_type(),
        )?)?;
        let mut m = e.encode_descriptor(
            "datasync_source_resyncs",
            "Resync passes of each source, by reason.",
            None,
            MetricType::Counter,
        )?;
        for src in &s.sources {
            for (reason, n) in &src.reasons {
                let source = src.name.to_string();
                let labels = [("source", source.as_str()), ("reason", reason.as_str())];
                ConstCounter::new(*n).encode(m.encode_family(&labels)?)?;
            }
        }
        let mut m = e.encode_descriptor(
            "datasync_source_following",
            "1 while the source's watch streams (a pass done, neither stopped nor interrupted).",
            None,
            MetricType::Gauge,
        )?;
        for src in &s.sources {
            let following = src.synced() && src.stopped.is_none() && src.interrupted.is_none();
            ConstGauge::new(i64::from(following))
                .encode(m.encode_family(&[("source", src.name.to_string())])?)?;
        }
        let families: [Family; 6] = [
            (
                "datasync_plugin_resyncs",
                MetricType::Counter,
                "Resyncs handed to the plugin.",
                |p| p.resyncs as f64,
            ),
            (
                "datasync_plugin_changes",
                MetricType::Counter,
                "Change events handed to the plugin.",
                |p| p.changes as f64,
            ),
            (
                "datasync_plugin_errors",
                MetricType::Counter,
                "Events the plugin failed, timed out or dropped.",
                |p| p.failures as f64,
            ),
            (
                "datasync_plugin_answer_seconds",
                MetricType::Counter,
                "Time from handing events to the plugin to its answers, summed.",
                |p| p.answer_time.as_secs_f64(),
            ),
            (
                "datasync_plugin_revision",
                MetricType::Gauge,
                "Revision of the last event the plugin answered with success.",
                |p| p.revision.0 as f64,
            ),
            (
                "datasync_plugin_ready",
                MetricType::Gauge,
                "1 if the plugin took its last resync and receives changes.",
                |p| f64::from(u8::from(p.state == PluginState::Ready)),
            ),
        ];
        for (name, kind, help, value) in families {
            let mut m = e.encode_descriptor(name, help, None, kind)?;
            for p in &s.plugins {
                let labels = [("plugin", p.name.as_str())];
                let fam = m.encode_family(&labels)?;
                match kind {
                    MetricType::Counter => ConstCounter::new(value(p)).encode(fam)?,
                    _ => ConstGauge::new(value(p)).encode(fam)?,
                }
            }
        }
        Ok(())
    }
}

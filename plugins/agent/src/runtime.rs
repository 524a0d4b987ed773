//! [`Agent`]: the store, the coordinator with every plugin, the status endpoint.

use std::net::SocketAddr;

use datasync::coordinator::{
    Coordinator, CoordinatorConfig, CoordinatorHandle, CoordinatorStatus, PluginContext,
    PluginSpec, Registry,
};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::{AgentConfig, AgentError, AnyStore};

/// A running agent. Stop it with [`Agent::shutdown`] (or run it with
/// [`Agent::run_until_signal`]).
#[derive(Debug)]
pub struct Agent {
    store: AnyStore,
    coordinator: CoordinatorHandle,
    http: Option<Http>,
    etcd_api: Option<crate::EtcdApiServing>,
}

/// A running status endpoint.
#[derive(Debug)]
pub(crate) struct Http {
    pub(crate) addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Http {
    /// Stops serving and waits for the server to end.
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

impl Agent {
    /// Opens the store, orders every plugin linked in with `datasync::register_plugin!`
    /// (dependencies first, then by name) and starts feeding them; serves the status
    /// endpoint if configured. Returns once the coordinator runs: wait for
    /// [`ready`](Self::ready) to know the first resync is done.
    pub async fn start(config: AgentConfig) -> Result<Agent, AgentError> {
        Self::start_with(config, |_| Vec::new()).await
    }

    /// Like [`start`](Self::start), with plugins made at run time as well.
    pub async fn start_with(
        config: AgentConfig,
        plugins: impl FnOnce(&PluginContext) -> Vec<PluginSpec>,
    ) -> Result<Agent, AgentError> {
        let store = AnyStore::open(&config.store).await?;
        let requests = crate::metered::RequestMetrics::new();
        let writer = crate::metered::Metered::wrap(store.writer(), requests.clone());
        let ctx = PluginContext::new(writer).with_settings(config.plugins.clone());
        let mut registry = Registry::from_inventory(&ctx)
            .map_err(datasync::coordinator::CoordinatorError::from)?;
        for spec in plugins(&ctx) {
            registry.add(spec);
        }
        let names = registry.names().join(", ");
        if names.is_empty() {
            tracing::warn!("no plugins found: is every plugin crate referenced by the binary?");
        } else {
            tracing::info!(plugins = %names, "plugins found");
        }
        let cc = CoordinatorConfig::default().timeouts(
            config.coordinator.resync_timeout(),
            config.coordinator.change_timeout(),
        );
        let coordinator = match Coordinator::start(store.watcher(), registry, cc).await {
            Ok(c) => c,
            Err(e) => {
                store.shutdown().await;
                return Err(e.into());
            }
        };
        ctx.attach(&coordinator);
        let etcd_api = match crate::etcd_api::from_config(&config.store, &store).await {
            Ok(api) => api,
            Err(e) => {
                coordinator.shutdown().await;
                store.shutdown().await;
                return Err(e);
            }
        };
        let http = match config.http.listen {
            None => None,
            Some(addr) => match serve(
                addr,
                crate::http::Endpoint::new(
                    store.clone(),
                    Some((coordinator.subscribe(), coordinator.trigger())),
                    Some(&requests),
                ),
            )
            .await
            {
                Ok(h) => Some(h),
                Err(e) => {
                    coordinator.shutdown().await;
                    store.shutdown().await;
                    return Err(e);
                }
            },
        };
        Ok(Agent {
            store,
            coordinator,
            http,
            etcd_api,
        })
    }

    /// Every plugin's status.
    pub fn status(&self) -> CoordinatorStatus {
        self.coordinator.status()
    }

    /// Resolves once the first resync pass is done.
    pub async fn ready(&self) {
        self.coordinator.ready().await
    }

    /// The coordinator (request resyncs, subscribe to status).
    pub fn coordinator(&self) -> &CoordinatorHandle {
        &self.coordinator
    }

    /// The store.
    pub fn store(&self) -> &AnyStore {
        &self.store
    }

    /// Where the etcd API listens, if it does.
    pub fn etcd_api_addr(&self) -> Option<SocketAddr> {
        self.etcd_api.as_ref().map(crate::EtcdApiServing::addr)
    }

    /// Where the status endpoint listens, if it does.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(|h| h.addr)
    }

    /// Resolves when the coordinator stops by itself (the store's watch ended or
    /// failed for good), with the reason: the agent no longer follows the store.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn stopped(&self) -> String {
        self.coordinator.stopped().await
    }

    /// Runs until SIGINT or SIGTERM, then shuts down; or until the coordinator stops
    /// by itself, then shuts down and returns [`AgentError::Stopped`] (a supervisor
    /// should restart the agent: it no longer follows the store).
    pub async fn run_until_signal(self) -> Result<(), AgentError> {
        tokio::select! {
            r = wait_for_signal() => {
                r?;
                tracing::info!("signal received: shutting down");
                self.shutdown().await;
                Ok(())
            }
            why = self.coordinator.stopped() => {
                tracing::error!(reason = %why, "the coordinator stopped: shutting down");
                self.shutdown().await;
                Err(AgentError::Stopped(why))
            }
        }
    }

    /// Stops feeding plugins (the event in hand is answered or times out first), closes
    /// them, closes the watch, stops the status endpoint and shuts the store down (the
    /// raft store flushes). The embedded store's files close once the last handle to it
    /// is gone: plugins release their writers in `close`.
    pub async fn shutdown(self) {
        self.coordinator.shutdown().await;
        if let Some(h) = self.http {
            h.stop().await;
        }
        if let Some(api) = self.etcd_api {
            api.stop().await;
        }
        self.store.shutdown().await;
    }
}

/// Serves `endpoint` on `addr` until stopped.
pub(crate) async fn serve(
    addr: SocketAddr,
    endpoint: crate::http::Endpoint,
) -> Result<Http, AgentError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| AgentError::Http { addr, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| AgentError::Http { addr, source })?;
    let (stop, stopped) = oneshot::channel::<()>();
    let app = crate::http::router(endpoint);
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });
    tracing::info!(%addr, "status endpoint listening");
    Ok(Http { addr, stop, task })
}

#[cfg(unix)]
async fn wait_for_signal() -> Result<(), AgentError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(AgentError::Signal)?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.map_err(AgentError::Signal),
        _ = term.recv() => Ok(()),
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() -> Result<(), AgentError> {
    tokio::signal::ctrl_c().await.map_err(AgentError::Signal)
}

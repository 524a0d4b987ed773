//! The coordinator task.

use std::pin::Pin;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::registry::{PluginSpec, Registry, RegistryError};
use super::status::{CoordinatorStatus, PluginState, PluginStatus};
use crate::{
    Change, Done, DoneError, Event, KeyChange, PrefixSet, PrefixValues, Registration, Resync,
    StoreError, Watch, WatchOptions, Watcher,
};

/// Timeouts and retry policy of the coordinator.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CoordinatorConfig {
    /// How long one plugin may take to answer a resync (default 30 s).
    pub resync_timeout: Duration,
    /// How long one plugin may take to answer a change (default 30 s).
    pub change_timeout: Duration,
    /// Attempts at one plugin's resync within a pass, at least 1 (default 3).
    pub resync_attempts: u32,
    /// Pause between those attempts (default 100 ms).
    pub retry_backoff: Duration,
    /// After a pass in which a plugin failed, start another full pass this much later
    /// (default 5 s; `None`: wait for the next trigger).
    pub retry_failed_after: Option<Duration>,
    /// Options of the coordinator's single watch registration.
    pub watch: WatchOptions,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            resync_timeout: Duration::from_secs(30),
            change_timeout: Duration::from_secs(30),
            resync_attempts: 3,
            retry_backoff: Duration::from_millis(100),
            retry_failed_after: Some(Duration::from_secs(5)),
            watch: WatchOptions::default(),
        }
    }
}

impl CoordinatorConfig {
    /// Sets both timeouts.
    #[must_use]
    pub fn timeouts(mut self, resync: Duration, change: Duration) -> Self {
        self.resync_timeout = resync;
        self.change_timeout = change;
        self
    }

    /// Sets the attempts per plugin resync and the pause between them.
    #[must_use]
    pub fn retries(mut self, attempts: u32, backoff: Duration) -> Self {
        self.resync_attempts = attempts;
        self.retry_backoff = backoff;
        self
    }

    /// Sets [`retry_failed_after`](Self::retry_failed_after).
    #[must_use]
    pub fn retry_failed_after(mut self, after: Option<Duration>) -> Self {
        self.retry_failed_after = after;
        self
    }

    /// Sets the watch options.
    #[must_use]
    pub fn watch(mut self, opts: WatchOptions) -> Self {
        self.watch = opts;
        self
    }

    /// Checks the invariants.
    pub fn validate(&self) -> Result<(), CoordinatorError> {
        if self.resync_timeout.is_zero() || self.change_timeout.is_zero() {
            return Err(CoordinatorError::Config("timeouts must be positive"));
        }
        if self.resync_attempts == 0 {
            return Err(CoordinatorError::Config(
                "resync_attempts must be at least 1",
            ));
        }
        Ok(())
    }
}

/// The coordinator could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoordinatorError {
    /// The plugin set is invalid.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The watch could not be registered.
    #[error("cannot watch the store")]
    Store(#[from] StoreError),
    /// The configuration is invalid.
    #[error("invalid coordinator configuration: {0}")]
    Config(&'static str),
}

/// Drives registered plugins through resync and changes. See the [module docs](super).
#[derive(Debug)]
pub struct Coordinator;

impl Coordinator {
    /// Orders the plugins, registers one watch of all their prefixes and spawns the task
    /// that feeds them. Returns once the watch is registered; use
    /// [`CoordinatorHandle::ready`] to wait for the first pass.
    pub async fn start(
        watcher: &dyn Watcher,
        registry: Registry,
        config: CoordinatorConfig,
    ) -> Result<CoordinatorHandle, CoordinatorError> {
        config.validate()?;
        let plugins = registry.resolve()?;
        info!(order = ?plugins.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), "plugins in resync order");
        let all_prefixes: Vec<_> = plugins.iter().flat_map(|p| p.prefixes.clone()).collect();
        let watch = watcher
            .watch("coordinator", &all_prefixes, config.watch.clone())
            .await?;
        let registration = watch.registration().clone();
        let initial = CoordinatorStatus {
            passes: 0,
            plugins: plugins.iter().map(|p| PluginStatus::new(&p.name)).collect(),
        };
        let (status_tx, status_rx) = watch::channel(initial);
        let stop = CancellationToken::new();
        let plugins = plugins
            .into_iter()
            .map(|spec| Plugin {
                set: PrefixSet::new(spec.prefixes.iter().cloned()),
                spec,
            })
            .collect();
        let task = tokio::spawn(
            Runner {
                plugins,
                config,
                status: status_tx,
            }
            .run(watch, stop.clone()),
        );
        Ok(CoordinatorHandle {
            status: status_rx,
            registration,
            stop,
            task,
        })
    }
}

/// Controls a running coordinator.
#[derive(Debug)]
pub struct CoordinatorHandle {
    status: watch::Receiver<CoordinatorStatus>,
    registration: Registration,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl CoordinatorHandle {
    /// The current status of every plugin, in resync order.
    pub fn status(&self) -> CoordinatorStatus {
        self.status.borrow().clone()
    }

    /// Receives every status update.
    pub fn subscribe(&self) -> watch::Receiver<CoordinatorStatus> {
        self.status.clone()
    }

    /// Asks for a full resync of every plugin, in order. Requests made while a pass runs
    /// coalesce into one follow-up pass.
    pub fn request_resync(&self) {
        self.registration.request_resync();
    }

    /// A cloneable trigger for [`request_resync`](Self::request_resync), to hand to
    /// plugins or an operator endpoint.
    pub fn trigger(&self) -> ResyncTrigger {
        ResyncTrigger(self.registration.clone())
    }

    /// Resolves once the first pass has finished (every plugin answered, failed or timed
    /// out).
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn ready(&self) {
        let mut rx = self.status.clone();
        // An error means the task ended; there is nothing more to wait for.
        let _ = rx.wait_for(|s| s.passes > 0).await;
    }

    /// Stops after the event in hand is answered, closes the watch and waits for the task.
    pub async fn shutdown(self) {
        self.stop.cancel();
        if let Err(e) = self.task.await {
            warn!(error = %e, "coordinator task failed");
        }
    }
}

/// Requests a full resync from a running coordinator.
#[derive(Debug, Clone)]
pub struct ResyncTrigger(Registration);

impl ResyncTrigger {
    /// See [`CoordinatorHandle::request_resync`].
    pub fn request_resync(&self) {
        self.0.request_resync();
    }
}

struct Plugin {
    spec: PluginSpec,
    set: PrefixSet,
}

struct Runner {
    plugins: Vec<Plugin>,
    config: CoordinatorConfig,
    status: watch::Sender<CoordinatorStatus>,
}

impl Runner {
    async fn run(self, mut watch: Watch, stop: CancellationToken) {
        let mut retry: Option<Pin<Box<Sleep>>> = None;
        loop {
            let item = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                _ = async { retry.as_mut().expect("guarded").await }, if retry.is_some() => {
                    retry = None;
                    watch.registration().request_resync();
                    continue;
                }
                item = watch.next() => item,
            };
            match item {
                None => {
                    warn!("watch ended; coordinator stops");
                    break;
                }
                Some(Err(e)) if e.is_retryable() => warn!(error = %e, "watch interrupted"),
                Some(Err(e)) => {
                    warn!(error = %e, "watch stopped");
                    break;
                }
                Some(Ok(Event::Resync(r))) => {
                    let all_ok = self.pass(r).await;
                    retry = match (all_ok, self.config.retry_failed_after) {
                        (false, Some(after)) => Some(Box::pin(tokio::time::sleep(after))),
                        _ => None,
                    };
                }
                Some(Ok(Event::Change(c))) => self.change(c).await,
            }
        }
        drop(watch);
        // Dependents first: a plugin closes while what it depends on is still open.
        for plugin in self.plugins.iter().rev() {
            let close = plugin.spec.handler.close();
            if tokio::time::timeout(self.config.change_timeout, close)
                .await
                .is_err()
            {
                warn!(plugin = %plugin.spec.name, "close timed out");
            }
        }
    }

    /// One resync pass: every plugin in order, each with its own prefixes. Returns
    /// whether every plugin succeeded.
    async fn pass(&self, r: Resync) -> bool {
        debug!(revision = %r.revision, reason = ?r.reason, "resync pass");
        let dones = r.done.split(self.plugins.len());
        let mut all_ok = true;
        for (i, (plugin, done)) in self.plugins.iter().zip(dones).enumerate() {
            let groups = slice(&r.prefixes, &plugin.set);
            self.update(i, |s| s.state = PluginState::Resyncing);
            let mut outcome = Err(DoneError::Dropped);
            let mut took = Duration::ZERO;
            for attempt in 1..=self.config.resync_attempts {
                if attempt > 1 {
                    tokio::time::sleep(self.config.retry_backoff).await;
                }
                let (d, waiter) = Done::channel();
                let ev = Resync::new(r.source.clone(), r.revision, r.reason, groups.clone(), d);
                let elapsed;
                (outcome, elapsed) = deliver(
                    &*plugin.spec.handler,
                    Event::Resync(ev),
                    waiter,
                    self.config.resync_timeout,
                )
                .await;
                took += elapsed;
                match &outcome {
                    Ok(()) => break,
                    Err(e) => {
                        warn!(plugin = %plugin.spec.name, attempt, error = %e, "resync failed")
                    }
                }
            }
            self.update(i, |s| {
                s.record(r.revision, &outcome, took);
                s.resyncs += 1;
                s.state = match &outcome {
                    Ok(()) => PluginState::Ready,
                    Err(DoneError::TimedOut(_)) => PluginState::TimedOut,
                    Err(_) => PluginState::Failed,
                };
            });
            all_ok &= outcome.is_ok();
            done.complete(outcome);
        }
        self.status.send_modify(|s| s.passes += 1);
        all_ok
    }

    /// Delivers a change to every ready plugin it concerns, in plugin order.
    async fn change(&self, c: Change) {
        let targets: Vec<(usize, Vec<KeyChange>)> = self
            .plugins
            .iter()
            .enumerate()
            .filter(|(i, _)| self.status.borrow().plugins[*i].state == PluginState::Ready)
            .filter_map(|(i, p)| {
                let mine: Vec<_> = c
                    .changes
                    .iter()
                    .filter(|kc| p.set.matches(kc.key.as_str()))
                    .cloned()
                    .collect();
                (!mine.is_empty()).then_some((i, mine))
            })
            .collect();
        let dones = c.done.split(targets.len());
        for ((i, changes), done) in targets.into_iter().zip(dones) {
            let plugin = &self.plugins[i];
            let (d, waiter) = Done::channel();
            let ev = Change::new(c.source.clone(), c.revision, changes, d);
            let (outcome, took) = deliver(
                &*plugin.spec.handler,
                Event::Change(ev),
                waiter,
                self.config.change_timeout,
            )
            .await;
            if let Err(e) = &outcome {
                warn!(plugin = %plugin.spec.name, revision = %c.revision, error = %e, "change failed");
            }
            self.update(i, |s| {
                s.record(c.revision, &outcome, took);
                s.changes += 1;
            });
            done.complete(outcome);
        }
    }

    fn update(&self, i: usize, f: impl FnOnce(&mut PluginStatus)) {
        self.status.send_modify(|s| f(&mut s.plugins[i]));
    }
}

/// Hands `event` to `handler` and waits for its answer, up to `timeout`.
/// Hands `event` to `handler` and waits for its answer; returns it and how long it took.
async fn deliver(
    handler: &dyn super::Handler,
    event: Event,
    waiter: crate::DoneWaiter,
    timeout: Duration,
) -> (Result<(), DoneError>, Duration) {
    let started = Instant::now();
    let answered = tokio::time::timeout(timeout, async {
        handler.handle(event).await;
        waiter.await
    })
    .await;
    let elapsed = started.elapsed();
    debug!(?elapsed, "answered");
    (
        answered.unwrap_or(Err(DoneError::TimedOut(timeout))),
        elapsed,
    )
}

/// The values of `snapshot` under `set`'s prefixes, grouped per prefix.
fn slice(snapshot: &[PrefixValues], set: &PrefixSet) -> Vec<PrefixValues> {
    set.prefixes()
        .iter()
        .map(|p| {
            let values = snapshot
                .iter()
                .filter(|g| g.prefix.covers(p))
                .flat_map(|g| {
                    let start = g.values.partition_point(|kv| kv.key.as_str() < p.as_str());
                    g.values[start..]
                        .iter()
                        .take_while(|kv| p.matches(kv.key.as_str()))
                        .cloned()
                })
                .collect();
            PrefixValues {
                prefix: p.clone(),
                values,
            }
        })
        .collect()
}

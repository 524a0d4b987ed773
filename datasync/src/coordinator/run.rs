//! The coordinator task.

use std::pin::Pin;
use std::sync::Arc;

use crate::ResyncReason;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::registry::{OnChangeFailure, PluginSpec, Registry, RegistryError};
use super::status::{CoordinatorStatus, PluginState, PluginStatus, SourceStatus};
use crate::{
    Change, Done, DoneError, Event, KeyChange, PrefixSet, PrefixValues, Registration, Resync,
    Revision, StoreError, Watch, WatchOptions, Watcher, error_chain,
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
    /// (default 5 s; `None`: wait for the next trigger), doubled for each further
    /// failed pass in a row, up to 32 times.
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
        let mut initial = CoordinatorStatus {
            passes: 0,
            plugins: plugins.iter().map(|p| PluginStatus::new(&p.name)).collect(),
            sources: watcher
                .sources()
                .into_iter()
                .map(SourceStatus::new)
                .collect(),
            stopped: None,
        };
        // Resuming, every plugin holds the state at `r` already: ready, with no pass.
        // (A composite resyncs its parts: it does not resume.)
        if let Some(r) = config.watch.resume
            && let [source] = &mut initial.sources[..]
            && source.name.is_empty()
        {
            source.resumed = Some(r);
            source.revision = r;
            for p in &mut initial.plugins {
                p.state = PluginState::Ready;
                p.revision = r;
            }
        }
        let (status_tx, status_rx) = watch::channel(initial);
        let stop = CancellationToken::new();
        let plugins = plugins
            .into_iter()
            .map(|spec| Running {
                set: PrefixSet::new(spec.prefixes.iter().cloned()),
                spec,
                busy: std::sync::Mutex::new(None),
                unsynced: std::sync::Mutex::default(),
            })
            .collect();
        let asked = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(
            Runner {
                plugins,
                config,
                status: status_tx,
                asked: asked.clone(),
                registration: registration.clone(),
            }
            .run(watch, stop.clone()),
        );
        Ok(CoordinatorHandle {
            status: status_rx,
            registration,
            asked,
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
    /// Set by a request from outside (the handle, a trigger, a plugin's context): the
    /// next `Requested` pass is theirs, not a retry of the coordinator's own.
    asked: Arc<AtomicBool>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl CoordinatorHandle {
    /// The current status of every plugin, in resync order.
    pub fn status(&self) -> CoordinatorStatus {
        self.status.borrow().clone()
    }

    /// What the store's watch registration recorded of the coordinator's answers: the
    /// highest revision acknowledged, and failures (a change a plugin failed, or missed
    /// while not in sync).
    pub fn acks(&self) -> crate::AckStatus {
        self.registration.acks()
    }

    /// Receives every status update.
    pub fn subscribe(&self) -> watch::Receiver<CoordinatorStatus> {
        self.status.clone()
    }

    /// Asks for a full resync of every plugin, in order. Requests made while a pass runs
    /// coalesce into one follow-up pass.
    pub fn request_resync(&self) {
        self.trigger().request_resync();
    }

    /// A cloneable trigger for [`request_resync`](Self::request_resync), to hand to
    /// plugins or an operator endpoint.
    pub fn trigger(&self) -> ResyncTrigger {
        ResyncTrigger(self.registration.clone(), self.asked.clone())
    }

    /// Resolves once every source has had its first pass (every plugin answered,
    /// failed or timed out) or resumed, or stopped, or the coordinator stopped.
    ///
    /// Started resuming (`CoordinatorConfig::watch` with
    /// [`WatchOptions::resume`](crate::WatchOptions::resume)), the plugins count as
    /// holding the state at that revision from the start: if the store answers with a
    /// resync instead (it does not resume, or no longer holds the changes), that pass
    /// comes as the first event.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn ready(&self) {
        let mut rx = self.status.clone();
        // An error means the task ended; there is nothing more to wait for.
        let _ = rx
            .wait_for(|s| {
                s.stopped.is_some()
                    || s.sources
                        .iter()
                        .all(|src| src.synced() || src.stopped.is_some())
            })
            .await;
    }

    /// Resolves when the coordinator stops by itself (see
    /// [`CoordinatorStatus::stopped`]), with the reason. Never resolves while it runs.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn stopped(&self) -> String {
        let mut rx = self.status.clone();
        match rx.wait_for(|s| s.stopped.is_some()).await {
            Ok(s) => s.stopped.clone().unwrap_or_default(),
            Err(_) => "the coordinator's task ended".to_owned(),
        }
    }

    /// Stops after the event in hand is answered, closes the watch and waits for the task.
    pub async fn shutdown(self) {
        self.stop.cancel();
        if let Err(e) = self.task.await {
            warn!(error = %e, "coordinator task failed");
        }
    }
}

impl crate::coordinator::PluginContext {
    /// Binds the context (and every clone of it) to the coordinator its plugins run
    /// under, for [`request_resync`](Self::request_resync). The first binding holds.
    pub fn attach(&self, coordinator: &CoordinatorHandle) {
        let trigger = coordinator.trigger();
        self.bind_resync(Arc::new(move || trigger.request_resync()));
    }
}

/// Requests a full resync from a running coordinator.
#[derive(Debug, Clone)]
pub struct ResyncTrigger(Registration, Arc<AtomicBool>);

impl ResyncTrigger {
    /// See [`CoordinatorHandle::request_resync`].
    pub fn request_resync(&self) {
        self.1.store(true, Ordering::Release);
        self.0.request_resync();
    }
}

struct Running {
    spec: PluginSpec,
    set: PrefixSet,
    /// A handler still running after its time was up (never cancelled): the plugin
    /// gets no event until it has returned.
    busy: std::sync::Mutex<Option<JoinHandle<()>>>,
    /// Sources whose state the plugin does not hold (a failed resync or change of
    /// theirs): it is ready only once every one has been resynced, whatever other
    /// sources' passes do meanwhile.
    unsynced: std::sync::Mutex<std::collections::BTreeSet<crate::Source>>,
}

struct Runner {
    plugins: Vec<Running>,
    config: CoordinatorConfig,
    status: watch::Sender<CoordinatorStatus>,
    /// The coordinator's watch: a handler that returns after its time was up asks it
    /// for a pass, so its plugin is resynced once it can take events again.
    registration: Registration,
    /// See [`CoordinatorHandle`]'s field.
    asked: Arc<AtomicBool>,
}

impl Running {
    /// Records whether the plugin holds `source`'s state; returns whether it holds
    /// every source's.
    fn synced(&self, source: &crate::Source, ok: bool) -> bool {
        let mut u = self.unsynced.lock().unwrap_or_else(|e| e.into_inner());
        if ok {
            u.remove(source);
        } else {
            u.insert(source.clone());
        }
        u.is_empty()
    }

    /// Whether a handler that ran past its time is still running.
    fn busy(&self) -> bool {
        self.busy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|h| !h.is_finished())
    }
}

impl Runner {
    async fn run(self, mut watch: Watch, stop: CancellationToken) {
        let mut retry: Option<Pin<Box<Sleep>>> = None;
        // Failed passes in a row: the pause before the next one doubles with each.
        let mut failed_passes = 0u32;
        let stopped = loop {
            let item = tokio::select! {
                biased;
                _ = stop.cancelled() => break None,
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
                    break Some("the store's watch ended".to_owned());
                }
                Some(Err(e)) if e.is_retryable() => {
                    warn!(error = %e, "watch interrupted");
                    let reason = error_chain(&e);
                    match e.part() {
                        Some(part) => self.source(part, |s| s.interrupted = Some(reason)),
                        // The whole watch: every source.
                        None => self.status.send_modify(|s| {
                            for src in &mut s.sources {
                                src.interrupted = Some(reason.clone());
                            }
                        }),
                    }
                }
                // One part of a composite stopped: the others go on.
                Some(Err(e)) if e.part().is_some() => {
                    let part = e.part().cloned().unwrap_or_default();
                    warn!(error = %e, source = %part, "a source's watch stopped; the others go on");
                    let reason = error_chain(&e);
                    self.source(&part, |s| s.stopped = Some(reason));
                    // Nothing more comes from it: plugins keep what it gave them, and
                    // no plugin waits for its resync.
                    for p in &self.plugins {
                        p.synced(&part, true);
                    }
                }
                Some(Err(e)) => {
                    warn!(error = %e, "watch stopped; coordinator stops");
                    break Some(error_chain(&e));
                }
                Some(Ok(Event::Resync(mut r))) => {
                    // A request nobody outside made is the coordinator's own.
                    if r.reason == ResyncReason::Requested
                        && !self.asked.swap(false, Ordering::AcqRel)
                    {
                        r.reason = ResyncReason::Retry;
                    }
                    let (source, revision, reason) = (r.source.clone(), r.revision, r.reason);
                    let all_ok = self.pass(r).await;
                    self.source(&source, |s| {
                        s.passes += 1;
                        s.count(reason);
                        s.revision = revision;
                        s.interrupted = None;
                    });
                    failed_passes = if all_ok {
                        0
                    } else {
                        failed_passes.saturating_add(1)
                    };
                    retry = match (all_ok, self.config.retry_failed_after) {
                        (false, Some(after)) => {
                            let pause = after.saturating_mul(1 << (failed_passes - 1).min(5));
                            Some(Box::pin(tokio::time::sleep(pause)))
                        }
                        _ => None,
                    };
                }
                Some(Ok(Event::Change(c))) => {
                    let (source, revision) = (c.source.clone(), c.revision);
                    let resync = self.change(c).await;
                    self.source(&source, |s| s.revision = revision);
                    // A plugin out of sync waits `retry_backoff`, not a longer pause
                    // left by failed passes.
                    if resync {
                        let soon = Instant::now() + self.config.retry_backoff;
                        if retry.as_ref().is_none_or(|r| r.deadline() > soon) {
                            retry = Some(Box::pin(tokio::time::sleep_until(soon)));
                        }
                    }
                }
            }
        };
        drop(watch);
        // Handlers that ran past their time may still be working: give them as long as
        // a change may take before their plugins close.
        for plugin in &self.plugins {
            let running = plugin.busy.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(h) = running
                && tokio::time::timeout(self.config.change_timeout, h)
                    .await
                    .is_err()
            {
                warn!(plugin = %plugin.spec.name, "a handler still runs at shutdown");
            }
        }
        // Dependents first: a plugin closes while what it depends on is still open.
        for plugin in self.plugins.iter().rev() {
            let close = plugin.spec.plugin.close();
            if tokio::time::timeout(self.config.change_timeout, close)
                .await
                .is_err()
            {
                warn!(plugin = %plugin.spec.name, "close timed out");
            }
        }
        // Said last: whoever waits for it finds the plugins closed.
        if let Some(reason) = stopped {
            self.status.send_modify(|s| s.stopped = Some(reason));
        }
    }

    /// Updates the status of `source` (added if the watcher did not name it).
    fn source(&self, source: &crate::Source, f: impl FnOnce(&mut SourceStatus)) {
        self.status.send_modify(|s| {
            let i = match s.sources.iter().position(|x| &x.name == source) {
                Some(i) => i,
                None => {
                    s.sources.push(SourceStatus::new(source.clone()));
                    s.sources.len() - 1
                }
            };
            f(&mut s.sources[i]);
        });
    }

    /// One resync pass (of one source): every plugin in order, each with its own
    /// prefixes. Returns whether every plugin holds every source's state.
    async fn pass(&self, r: Resync) -> bool {
        debug!(revision = %r.revision, reason = ?r.reason, "resync pass");
        let dones = r.done.split(self.plugins.len());
        let mut all_ok = true;
        for (i, (plugin, done)) in self.plugins.iter().zip(dones).enumerate() {
            let groups = slice(&r.prefixes, &plugin.set);
            let before = self.status.borrow().plugins[i].state;
            self.update(i, |s| s.state = PluginState::Resyncing);
            let (outcome, took, _) = self
                .attempts(
                    plugin,
                    self.config.resync_attempts,
                    self.config.resync_timeout,
                    r.revision,
                    |d| {
                        Event::Resync(Resync::new(
                            r.source.clone(),
                            r.revision,
                            r.reason,
                            groups.clone(),
                            d,
                        ))
                    },
                )
                .await;
            let all_sources = plugin.synced(&r.source, outcome.is_ok());
            self.update(i, |s| {
                s.record(r.revision, &outcome, took);
                s.resyncs += 1;
                s.state = match &outcome {
                    // Another source's state is still missing: as it was.
                    Ok(()) if !all_sources => match before {
                        PluginState::Pending | PluginState::Resyncing | PluginState::Ready => {
                            PluginState::Failed
                        }
                        other => other,
                    },
                    Ok(()) => PluginState::Ready,
                    Err(DoneError::TimedOut(_)) => PluginState::TimedOut,
                    Err(_) => PluginState::Failed,
                };
                // Out of sync no more: resynced, or failed (see `last_error`).
                if all_sources || outcome.is_err() {
                    s.unapplied = None;
                }
            });
            all_ok &= all_sources;
            done.complete(outcome);
        }
        self.status.send_modify(|s| s.passes += 1);
        all_ok
    }

    /// Delivers a change to every ready plugin it concerns, in plugin order. A plugin
    /// that fails it follows its [`OnChangeFailure`]; returns whether one of them now
    /// waits for a resync.
    async fn change(&self, c: Change) -> bool {
        // A plugin that is not ready misses this change: it lacks its source's state
        // until that source's next resync, whatever other sources' passes do. (The
        // pass that resyncs it is already due: it is not ready.) The store hears so:
        // this revision is not applied everywhere it should be.
        let mut missed = Vec::new();
        for (i, p) in self.plugins.iter().enumerate() {
            if self.status.borrow().plugins[i].state != PluginState::Ready
                && c.changes.iter().any(|kc| p.set.matches(kc.key.as_str()))
            {
                p.synced(&c.source, false);
                missed.push(p.spec.name.clone());
            }
        }
        let mut resync = false;
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
        let mut dones = c
            .done
            .split(targets.len() + usize::from(!missed.is_empty()));
        if !missed.is_empty()
            && let Some(done) = dones.pop()
        {
            done.fail(format!(
                "not applied by {} (not in sync; resynced later)",
                missed.join(", ")
            ));
        }
        for ((i, changes), done) in targets.into_iter().zip(dones) {
            let plugin = &self.plugins[i];
            let attempts = match plugin.spec.on_change_failure {
                OnChangeFailure::Retry { attempts } => attempts.clamp(1, MAX_CHANGE_ATTEMPTS),
                _ => 1,
            };
            let (outcome, took, skipped) = self
                .attempts(
                    plugin,
                    attempts,
                    self.config.change_timeout,
                    c.revision,
                    |d| {
                        Event::Change(Change::new(
                            c.source.clone(),
                            c.revision,
                            changes.clone(),
                            d,
                        ))
                    },
                )
                .await;
            // A plugin whose handler still runs never saw this change: whatever its
            // policy, it is out of sync.
            let out_of_sync = outcome.is_err()
                && (skipped || plugin.spec.on_change_failure != OnChangeFailure::Report);
            self.update(i, |s| {
                s.record(c.revision, &outcome, took);
                s.changes += 1;
                if out_of_sync {
                    s.state = PluginState::OutOfSync;
                    s.unapplied = Some((
                        c.revision,
                        changes.iter().map(|kc| kc.key.clone()).collect(),
                    ));
                }
            });
            if out_of_sync {
                plugin.synced(&c.source, false);
            }
            resync |= out_of_sync;
            done.complete(outcome);
        }
        resync
    }

    /// Hands `plugin` the event `make` builds, up to `attempts` times with
    /// `retry_backoff` between, until it succeeds, waiting up to `timeout` for each. Returns the last outcome, the time
    /// taken in all, and whether the plugin's handler was still busy with an earlier
    /// event (then the event never reached it, and trying again is no use).
    async fn attempts(
        &self,
        plugin: &Running,
        attempts: u32,
        timeout: Duration,
        revision: Revision,
        make: impl Fn(Done) -> Event,
    ) -> (Result<(), DoneError>, Duration, bool) {
        let mut outcome = Err(DoneError::Dropped);
        let mut took = Duration::ZERO;
        for attempt in 1..=attempts {
            if attempt > 1 {
                tokio::time::sleep(self.config.retry_backoff).await;
            }
            if plugin.busy() {
                warn!(plugin = %plugin.spec.name, %revision, "still handling an earlier event: this one fails as timed out");
                return (Err(DoneError::TimedOut(timeout)), took, true);
            }
            let (d, waiter) = Done::channel();
            let event = make(d);
            let elapsed;
            (outcome, elapsed) = deliver(plugin, event, waiter, timeout, &self.registration).await;
            took += elapsed;
            match &outcome {
                Ok(()) => break,
                Err(e) => {
                    warn!(plugin = %plugin.spec.name, %revision, attempt, error = %e, "event failed")
                }
            }
        }
        (outcome, took, false)
    }

    fn update(&self, i: usize, f: impl FnOnce(&mut PluginStatus)) {
        self.status.send_modify(|s| f(&mut s.plugins[i]));
    }
}

/// Attempts at one change under [`OnChangeFailure::Retry`], at most.
const MAX_CHANGE_ATTEMPTS: u32 = 10;

/// Hands `event` to `plugin`'s handler and waits for its answer, up to `timeout`;
/// returns it and how long it took.
///
/// The handler's `handle` runs in a task of its own and is never cancelled: one still
/// running when the time is up goes on (a half-done apply is worse than a late one),
/// the plugin gets no further event until it has returned (see [`Runner::attempts`]),
/// and then it asks for a pass through `registration`. (Work a
/// handler spawns to answer `Done` later is its own to track.) A handler that panics
/// counts as a dropped `Done`.
async fn deliver(
    plugin: &Running,
    event: Event,
    waiter: crate::DoneWaiter,
    timeout: Duration,
    registration: &Registration,
) -> (Result<(), DoneError>, Duration) {
    let started = Instant::now();
    let handle = plugin.spec.plugin.clone();
    let mut task = tokio::spawn(async move { handle.handle(event).await });
    let answered = tokio::time::timeout(timeout, async {
        if let Err(e) = (&mut task).await {
            warn!(plugin = %plugin.spec.name, error = %e, "handler panicked");
        }
        waiter.await
    })
    .await;
    if !task.is_finished() {
        let registration = registration.clone();
        *plugin.busy.lock().unwrap_or_else(|e| e.into_inner()) = Some(tokio::spawn(async move {
            let _ = task.await;
            registration.request_resync();
        }));
    }
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

//! Observable state of the coordinator and its plugins.

use std::time::Duration;

use crate::{DoneError, ResyncReason, Revision, Source};

/// Where a plugin stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PluginState {
    /// Waiting for its first resync.
    Pending,
    /// Its resync was handed over; waiting for the answer.
    Resyncing,
    /// Resynced; receiving changes.
    Ready,
    /// Its last resync failed (see `last_error`); no changes until a resync succeeds.
    Failed,
    /// Its last resync was not answered in time; no changes until a resync succeeds.
    TimedOut,
    /// It failed or did not answer a change in time (see
    /// [`PluginStatus::unapplied`]); no more changes until a resync succeeds.
    OutOfSync,
}

/// One plugin's status.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PluginStatus {
    /// The plugin's name.
    pub name: String,
    /// Where it stands.
    pub state: PluginState,
    /// Revision of the last event it answered with success.
    pub revision: Revision,
    /// Resyncs handed to it (all attempts of one pass count once).
    pub resyncs: u64,
    /// Change events handed to it.
    pub changes: u64,
    /// Events it failed, timed out or dropped.
    pub failures: u64,
    /// The latest failure, with the revision of its event.
    pub last_error: Option<(Revision, DoneError)>,
    /// While [`PluginState::OutOfSync`]: the first change it did not apply (revision
    /// and keys); later changes were not handed to it either.
    pub unapplied: Option<(Revision, Vec<crate::Key>)>,
    /// Time from handing over an event to its answer (or timeout), summed over every
    /// event (all attempts of a resync together).
    pub answer_time: Duration,
}

impl PluginStatus {
    pub(super) fn new(name: &str) -> Self {
        PluginStatus {
            name: name.to_owned(),
            state: PluginState::Pending,
            revision: Revision::ZERO,
            resyncs: 0,
            changes: 0,
            failures: 0,
            last_error: None,
            unapplied: None,
            answer_time: Duration::ZERO,
        }
    }

    pub(super) fn record(
        &mut self,
        revision: Revision,
        outcome: &Result<(), DoneError>,
        took: Duration,
    ) {
        self.answer_time += took;
        match outcome {
            Ok(()) => self.revision = revision,
            Err(e) => {
                self.failures += 1;
                self.last_error = Some((revision, e.clone()));
            }
        }
    }
}

/// One source's status: the store, or one part of a composite.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SourceStatus {
    /// The source, as its events name it (`""` for a plain store).
    pub name: Source,
    /// Resync passes of this source.
    pub passes: u64,
    /// The revision of its last event handed to the plugins.
    pub revision: Revision,
    /// Why its watch stopped, if it did: the plugins keep what it last delivered but
    /// get nothing more from it.
    pub stopped: Option<String>,
    /// Why its watch is interrupted (the store unreachable, say), until the resync
    /// that follows the recovery: the plugins hold what it last delivered.
    pub interrupted: Option<String>,
    /// Resync passes by reason, in the order reasons were first seen.
    pub reasons: Vec<(ResyncReason, u64)>,
    /// The reason of its last resync pass.
    pub last_reason: Option<ResyncReason>,
    /// The revision its stream resumed after, when the coordinator started resuming
    /// ([`WatchOptions::resume`](crate::WatchOptions::resume)): the plugins hold its
    /// state without a pass.
    pub resumed: Option<Revision>,
}

impl SourceStatus {
    pub(super) fn new(name: Source) -> Self {
        SourceStatus {
            name,
            passes: 0,
            revision: Revision::ZERO,
            stopped: None,
            interrupted: None,
            reasons: Vec::new(),
            last_reason: None,
            resumed: None,
        }
    }

    /// Whether the plugins hold this source's state: it had a pass, or resumed.
    pub fn synced(&self) -> bool {
        self.passes > 0 || self.resumed.is_some()
    }

    pub(super) fn count(&mut self, reason: ResyncReason) {
        self.last_reason = Some(reason);
        match self.reasons.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, n)) => *n += 1,
            None => self.reasons.push((reason, 1)),
        }
    }
}

/// The coordinator's status.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CoordinatorStatus {
    /// Completed resync passes, of every source.
    pub passes: u64,
    /// Every plugin, in resync order.
    pub plugins: Vec<PluginStatus>,
    /// Every source of the watch (one for a plain store, a composite's parts).
    pub sources: Vec<SourceStatus>,
    /// Why the coordinator stopped by itself (the store's watch ended or failed for
    /// good): no plugin gets anything more. `None` while it runs, and after
    /// [`shutdown`](super::CoordinatorHandle::shutdown).
    pub stopped: Option<String>,
}

impl CoordinatorStatus {
    /// The status of plugin `name`.
    pub fn plugin(&self, name: &str) -> Option<&PluginStatus> {
        self.plugins.iter().find(|p| p.name == name)
    }

    /// Whether the plugins follow the store: the coordinator runs, and every source
    /// has had a pass and streams, neither stopped nor interrupted. (Each plugin's own
    /// state is in `plugins`.)
    pub fn following(&self) -> bool {
        self.stopped.is_none()
            && self
                .sources
                .iter()
                .all(|s| s.synced() && s.stopped.is_none() && s.interrupted.is_none())
    }
}

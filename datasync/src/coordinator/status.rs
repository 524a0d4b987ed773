//! Observable state of the coordinator and its plugins.

use std::time::Duration;

use crate::{DoneError, Revision};

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

/// The coordinator's status.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CoordinatorStatus {
    /// Completed resync passes.
    pub passes: u64,
    /// Every plugin, in resync order.
    pub plugins: Vec<PluginStatus>,
}

impl CoordinatorStatus {
    /// The status of plugin `name`.
    pub fn plugin(&self, name: &str) -> Option<&PluginStatus> {
        self.plugins.iter().find(|p| p.name == name)
    }
}

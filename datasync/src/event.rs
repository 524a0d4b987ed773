//! The events of a watch stream.
//!
//! A stream starts with a [`Resync`] and then carries [`Change`]s, ordered by revision.
//! Whenever continuity is lost, another [`Resync`] follows: the consumer replaces its
//! state for the resync's source with the resync's values.

use std::sync::Arc;

use crate::{Done, Key, Prefix, Revision, Value};

/// Names where events came from. Empty for a single transport; the part's name in a
/// [`crate::CompositeWatcher`], so resyncs of one source never touch another's keys.
pub type Source = Arc<str>;

/// One item of a watch stream.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// The full state under the registration's prefixes at one revision.
    Resync(Resync),
    /// The changes of one committed transaction.
    Change(Change),
}

impl Event {
    /// The revision of the event.
    pub fn revision(&self) -> Revision {
        match self {
            Event::Resync(r) => r.revision,
            Event::Change(c) => c.revision,
        }
    }

    /// The source of the event.
    pub fn source(&self) -> &Source {
        match self {
            Event::Resync(r) => &r.source,
            Event::Change(c) => &c.source,
        }
    }

    /// Splits off the `Done` to answer.
    pub fn into_done(self) -> Done {
        match self {
            Event::Resync(r) => r.done,
            Event::Change(c) => c.done,
        }
    }
}

/// Why a resync was sent (serde: remote transports send it on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum ResyncReason {
    /// The first event of a registration.
    Initial,
    /// The consumer fell behind its queue (or the retained history) and was caught up.
    Overflow,
    /// Requested through [`crate::Registration::request_resync`].
    Requested,
    /// The connection to the store was re-established without proof of continuity.
    Reconnect,
    /// The history needed to resume was compacted away.
    Compacted,
    /// The replica restored a snapshot.
    SnapshotInstalled,
    /// The store's revision went backwards (restored from a backup). The only event
    /// whose revision may be lower than the one before it: revisions are the store's
    /// own, and continue from this one.
    StoreReset,
    /// Prefixes were added to a live registration
    /// ([`Registration::add_prefix`](crate::Registration::add_prefix)). Unlike every other
    /// reason, the resync replaces the consumer's state only under the prefixes it
    /// lists: the added ones (or, on a transport that cannot read them alone, all of
    /// them); the state under the others carries on.
    PrefixAdded,
    /// The resync coordinator's own pass: after a pass that failed (its retry pause),
    /// or for a plugin whose handler returned after its time was up. Only a
    /// coordinator's plugins see it; a transport sends `Requested` for every request.
    Retry,
}

impl ResyncReason {
    /// A stable snake-case name (a metric label, a status field).
    pub fn as_str(&self) -> &'static str {
        match self {
            ResyncReason::Initial => "initial",
            ResyncReason::Overflow => "overflow",
            ResyncReason::Requested => "requested",
            ResyncReason::Reconnect => "reconnect",
            ResyncReason::Compacted => "compacted",
            ResyncReason::SnapshotInstalled => "snapshot_installed",
            ResyncReason::StoreReset => "store_reset",
            ResyncReason::PrefixAdded => "prefix_added",
            ResyncReason::Retry => "retry",
        }
    }
}

/// A key with its value and the revision that last modified it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: Key,
    /// The value.
    pub value: Value,
    /// Revision of the last modification.
    pub revision: Revision,
}

/// The values under one prefix, sorted by key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixValues {
    /// The prefix.
    pub prefix: Prefix,
    /// Its values, sorted by key.
    pub values: Vec<KeyValue>,
}

/// Full state of a registration's prefixes at one revision.
#[derive(Debug)]
#[non_exhaustive]
pub struct Resync {
    /// Where the values come from (see [`Source`]).
    pub source: Source,
    /// The revision the values were read at.
    pub revision: Revision,
    /// Why this resync was sent.
    pub reason: ResyncReason,
    /// Values grouped per (normalized) prefix of the registration.
    pub prefixes: Vec<PrefixValues>,
    /// Answer when the values are applied.
    pub done: Done,
}

impl Resync {
    /// Builds a resync event (for transports).
    pub fn new(
        source: Source,
        revision: Revision,
        reason: ResyncReason,
        prefixes: Vec<PrefixValues>,
        done: Done,
    ) -> Self {
        Resync {
            source,
            revision,
            reason,
            prefixes,
            done,
        }
    }

    /// All values, in prefix then key order.
    pub fn values(&self) -> impl Iterator<Item = &KeyValue> {
        self.prefixes.iter().flat_map(|p| p.values.iter())
    }

    /// Whether the resync replaces the state under its listed prefixes only
    /// ([`ResyncReason::PrefixAdded`]), not the registration's whole state.
    pub fn is_partial(&self) -> bool {
        self.reason == ResyncReason::PrefixAdded
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.prefixes.iter().map(|p| p.values.len()).sum()
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Put or Delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// The key was created or updated.
    Put,
    /// The key was deleted (explicitly or by TTL expiry).
    Delete,
}

/// One key's change within a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyChange {
    /// The key.
    pub key: Key,
    /// What happened.
    pub op: Op,
    /// The value after the change (`None` for a delete).
    pub value: Option<Value>,
    /// The value before the change (`None` if the key did not exist).
    pub prev: Option<Value>,
}

/// The changes of one committed transaction, all at one revision.
#[derive(Debug)]
#[non_exhaustive]
pub struct Change {
    /// Where the change comes from (see [`Source`]).
    pub source: Source,
    /// The revision of the transaction.
    pub revision: Revision,
    /// The changed keys under the registration's prefixes, in key order.
    pub changes: Vec<KeyChange>,
    /// Answer when the changes are applied.
    pub done: Done,
}

impl Change {
    /// Builds a change event (for transports).
    pub fn new(source: Source, revision: Revision, changes: Vec<KeyChange>, done: Done) -> Self {
        Change {
            source,
            revision,
            changes,
            done,
        }
    }
}

//! The replicated key-value state machine: applies committed commands, keeps a history
//! for reads at past revisions (in memory, and in redb's `history` table across
//! restarts), and feeds watchers. redb is written
//! behind the apply path by a writer thread (see [`apply::apply_batch`]).
//!
//! This module holds what the parts share ([`Shared`], [`Inner`], the undo history);
//! `apply` turns committed entries into revisions, events and undo records; `writer`
//! stores them in redb on its own thread; `reads` answers reads, listings and resync
//! snapshots; `snapshot` is the openraft adapter (applied state, raft snapshots).

use datasync::transport::Producer;
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use datasync::transport::feed::{Feed, Hub};
use datasync::{Key, PrefixSet, PrefixValues, ResyncReason, Revision, StoreError};
use openraft::{AnyError, ErrorSubject, ErrorVerb, StorageIOError};
use redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable, Table};
use serde::Serialize;
use tokio::sync::{Notify, watch};

use super::lease::{self, Clock, LeaseObj, LeaseObjs, Leases};
use super::session::Sessions;
use super::tables::{CLIENTS, EXPIRY, HISTORY, KV, LEASE_OBJS, SM_META, Stored};

mod apply;
mod reads;
mod record_watch;
mod snapshot;
mod writer;

pub(crate) use reads::RaftSnapshots;
use reads::scan;
pub(crate) use record_watch::RecordSubs;
pub use record_watch::RecordWatch;
pub(crate) use snapshot::StateMachine;
pub(crate) use snapshot::{backup_payload, payload_summary, restore_payload};
#[cfg(test)]
pub(crate) use snapshot::{payload_decodes, payload_seed};
pub(crate) use writer::take_clean_close;
use writer::{BACKLOG, Pending, PendingState, Queue, close_clean, writer};

use crate::types::{StorageError, StoredMembership};

fn sm_err(verb: ErrorVerb, e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::new(ErrorSubject::StateMachine, verb, AnyError::new(&e)).into()
}

fn rd(e: impl std::error::Error + 'static) -> StorageError {
    sm_err(ErrorVerb::Read, e)
}

fn wr(e: impl std::error::Error + 'static) -> StorageError {
    sm_err(ErrorVerb::Write, e)
}

/// A redb failure on the read path, as a store error.
pub(crate) fn read_failed(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Backend(Box::new(e))
}

/// Checks that every stored record decodes (at open; the log checks its own frames).
pub(crate) fn verify(db: &Database) -> Result<(), String> {
    let tx = db.begin_read().map_err(|e| e.to_string())?;
    let kv = tx.open_table(KV).map_err(|e| e.to_string())?;
    for item in kv.iter().map_err(|e| e.to_string())? {
        let (k, v) = item.map_err(|e| e.to_string())?;
        Key::from_stored(k.value()).map_err(|e| format!("stored key {:?}: {e}", k.value()))?;
        Stored::header(v.value()).map_err(|e| format!("key {:?}: {e}", k.value()))?;
    }
    let meta = tx.open_table(SM_META).map_err(|e| e.to_string())?;
    if let Some(v) = meta.get("revision").map_err(|e| e.to_string())? {
        bincode::deserialize::<u64>(v.value()).map_err(|e| format!("revision: {e}"))?;
    }
    let history = tx.open_table(HISTORY).map_err(|e| e.to_string())?;
    for item in history.iter().map_err(|e| e.to_string())? {
        let (r, v) = item.map_err(|e| e.to_string())?;
        Undo::decode(r.value(), v.value(), |_| Ok(datasync::Value::default()))
            .map_err(|e| format!("history r{}: {e}", r.value()))?;
    }
    Ok(())
}

/// Each key a transaction changed, with its record before it.
type Before = Vec<(Key, Option<Stored>)>;

/// What a key's record holds after a change besides its value (which the change has).
#[derive(Debug, Clone, Copy)]
pub(crate) struct After {
    create_rev: u64,
    version: u64,
    lease: u64,
}

/// One transaction as the history keeps it: its change (as published) and the state
/// of its keys before it, to read at past revisions and replay to record watches.
#[derive(Debug)]
pub(crate) struct Undo {
    revision: u64,
    /// Aligned with `txn.changes`.
    before: Before,
    /// Each changed key's record after the change (`None`: deleted), aligned with
    /// `txn.changes`.
    after: Vec<Option<After>>,
    txn: Arc<datasync::transport::feed::Txn>,
}

/// One key's change as the history table keeps it. The value after is not stored:
/// it is the value before the key's next change, or its current value (see
/// [`load_history`]), which halves what the history writes.
#[derive(Serialize, serde::Deserialize)]
struct StoredChange {
    key: String,
    /// The record before, encoded as in `KV` (`None`: absent).
    before: Option<serde_bytes::ByteBuf>,
    /// The record's create revision, version and lease after (`None`: deleted).
    after: Option<(u64, u64, u64)>,
}

impl Undo {
    /// Each changed key's change event, record before and record after.
    fn entries(
        &self,
    ) -> impl Iterator<Item = (&datasync::KeyChange, &Option<Stored>, &Option<After>)> {
        self.txn
            .changes
            .iter()
            .zip(&self.before)
            .zip(&self.after)
            .map(|((c, (_, before)), after)| (c, before, after))
    }

    /// The row of the history table (bincode of each change, in the change's order).
    fn encode(&self) -> Result<Vec<u8>, bincode::Error> {
        let changes: Vec<StoredChange> = self
            .entries()
            .map(|(c, before, after)| StoredChange {
                key: c.key.as_str().to_owned(),
                before: before
                    .as_ref()
                    .map(|s| serde_bytes::ByteBuf::from(s.encode())),
                after: after.map(|a| (a.create_rev, a.version, a.lease)),
            })
            .collect();
        bincode::serialize(&changes)
    }

    /// A history row back as the undo record it was: the change event is rebuilt from
    /// the records (a change's previous value is the record before; a put's value
    /// comes from `value_after`, given the key), as apply made it.
    fn decode(
        revision: u64,
        bytes: &[u8],
        mut value_after: impl FnMut(&Key) -> Result<datasync::Value, String>,
    ) -> Result<Undo, String> {
        let stored: Vec<StoredChange> = bincode::deserialize(bytes).map_err(|e| e.to_string())?;
        let (mut changes, mut before, mut after) = (Vec::new(), Vec::new(), Vec::new());
        for c in stored {
            let key = Key::from_stored(&c.key).map_err(|e| format!("key {:?}: {e}", c.key))?;
            let prev = c
                .before
                .map(|b| Stored::decode(&b).map_err(|e| format!("key {:?}: {e}", c.key)))
                .transpose()?;
            let value = match c.after {
                Some(_) => Some(value_after(&key)?),
                None => None,
            };
            changes.push(datasync::KeyChange {
                key: key.clone(),
                op: if value.is_some() {
                    datasync::Op::Put
                } else {
                    datasync::Op::Delete
                },
                value,
                prev: prev.as_ref().map(|p| p.value.clone()),
            });
            before.push((key, prev));
            after.push(c.after.map(|(create_rev, version, lease)| After {
                create_rev,
                version,
                lease,
            }));
        }
        Ok(Undo {
            revision,
            before,
            after,
            txn: Arc::new(datasync::transport::feed::Txn {
                revision: Revision(revision),
                changes,
            }),
        })
    }
}

/// The history table's last `len` rows, as the in-memory history. Read newest first:
/// a put's value is the value before the key's next change, or its current value in
/// `KV` when no later change is kept.
fn load_history(
    tx: &ReadTransaction,
    len: usize,
    revision: u64,
) -> Result<VecDeque<Arc<Undo>>, StorageError> {
    let t = tx.open_table(HISTORY).map_err(rd)?;
    let kv = tx.open_table(KV).map_err(rd)?;
    // Revision 0 changes nothing: a row under it is no history (and would underflow
    // the floors), whatever a damaged file holds.
    let from = (revision + 1).saturating_sub(len as u64).max(1);
    let mut out = VecDeque::new();
    if from > revision {
        return Ok(out);
    }
    // Each key's value after the revision being decoded (`None`: absent then).
    let mut later: std::collections::HashMap<Key, Option<datasync::Value>> =
        std::collections::HashMap::new();
    let corrupt = |r: u64, e: String| rd(crate::storage::tables::CorruptHistory(r, e));
    for item in t.range(from..=revision).map_err(rd)?.rev() {
        let (r, v) = item.map_err(rd)?;
        let r = r.value();
        // Rows are kept for consecutive revisions up to the state's; a gap means the
        // rows before it cannot be rebuilt: the history starts after it.
        if out
            .front()
            .map_or(r != revision, |u: &Arc<Undo>| u.revision != r + 1)
        {
            break;
        }
        let undo = Undo::decode(r, v.value(), |key| {
            let known = match later.get(key) {
                Some(v) => v.clone(),
                None => match kv.get(key.as_str()).map_err(|e| e.to_string())? {
                    Some(s) => Some(Stored::decode(s.value()).map_err(|e| e.to_string())?.value),
                    None => None,
                },
            };
            known.ok_or_else(|| format!("key {key:?} is absent after a put of it"))
        })
        .map_err(|e| corrupt(r, e))?;
        for (key, before) in &undo.before {
            later.insert(key.clone(), before.as_ref().map(|s| s.value.clone()));
        }
        out.push_front(Arc::new(undo));
    }
    Ok(out)
}

/// How a new watch begins (see [`Shared::subscribe`]).
pub(crate) enum Subscribed {
    /// With these transactions from the history.
    Replay(VecDeque<Arc<datasync::transport::feed::Txn>>),
    /// With a resync for this reason, read from this state at this revision.
    Read(ReadTransaction, u64, ResyncReason),
}

/// What readers and the apply path share. The mutex orders commits with watch
/// snapshots: apply commits and publishes under it; a snapshot opens its read
/// transaction under it.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) hub: Hub,
    pub(crate) revision: u64,
    history: VecDeque<Arc<Undo>>,
    /// Record watches (etcd's), fed from the history's transactions.
    pub(crate) records: RecordSubs,
    /// The way to the writer (`None` once closed).
    writer: Option<Queue>,
    /// Lease deadlines, kept by apply (see [`super::lease`]).
    leases: Leases,
    /// Client sessions, kept by apply (see [`super::session`]).
    sessions: Sessions,
    /// Lease objects, kept by apply (see [`super::lease`]).
    objs: LeaseObjs,
    /// Whether records count versions (replicated: see `Command::CountVersions`).
    versions: bool,
    /// The revision of the last compaction (`Command::Compact`): reads before it and
    /// watches from before it are compacted, whatever the history still holds.
    compacted: u64,
}

impl Inner {
    /// The oldest revision whose change the history holds (the next one when it holds
    /// none).
    fn history_start(&self) -> u64 {
        self.history
            .front()
            .map_or(self.revision + 1, |u| u.revision)
    }

    /// The oldest revision a read can be at: the history rebuilds the state before
    /// each revision it holds.
    fn oldest_readable(&self) -> u64 {
        (self.history_start() - 1).max(self.compacted)
    }

    /// The oldest revision a watch can start from: the history holds each revision's
    /// change from here on.
    fn oldest_watchable(&self) -> u64 {
        self.history_start().max(self.compacted)
    }
}

/// The state machine's shared half (the store's handle reads through it).
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) db: Arc<Database>,
    inner: Mutex<Inner>,
    history_len: usize,
    /// Applied writes the writer thread has not stored yet.
    pending: Arc<Pending>,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Wakes the TTL task when a lease is set.
    pub(crate) ttl_changed: Arc<Notify>,
    /// The clock lease deadlines are counted on.
    clock: Clock,
    /// The applied (so committed) membership.
    pub(crate) membership: watch::Sender<StoredMembership>,
    /// Snapshots installed from a leader since open.
    pub(crate) installed: std::sync::atomic::AtomicU64,
    /// Log entries past the durable applied state at open (re-applied after a crash).
    pub(crate) behind_at_open: std::sync::atomic::AtomicU64,
    metrics: crate::metrics::Metrics,
    /// `Inner::revision`, readable without the lock (which a snapshot install holds
    /// for as long as it writes): for health checks and metrics.
    pub(crate) revision_now: std::sync::atomic::AtomicU64,
    /// The log index of the last entry applied (or installed) since open, 0 before
    /// any: set before its callers are answered, where openraft's metrics may lag.
    pub(crate) applied_index: std::sync::atomic::AtomicU64,
    /// Set once [`close`](Self::close) ran.
    closed: std::sync::atomic::AtomicBool,
}

impl Shared {
    pub(crate) fn new(
        db: Arc<Database>,
        history_len: usize,
        clock: Clock,
    ) -> Result<Arc<Self>, StorageError> {
        let (revision, membership, leases, sessions, objs, versions, history, compacted) = {
            let tx = db.begin_read().map_err(rd)?;
            let meta = tx.open_table(SM_META).map_err(rd)?;
            let revision: u64 = get_meta(&meta, "revision")?.unwrap_or(0);
            let membership: Option<StoredMembership> = get_meta(&meta, "membership")?;
            (
                revision,
                membership.unwrap_or_default(),
                load_leases(&tx, &clock)?,
                load_sessions(&tx)?,
                load_lease_objs(&tx, &clock)?,
                get_meta::<bool>(&meta, "versions")?.unwrap_or(false),
                load_history(&tx, history_len, revision)?,
                get_meta::<u64>(&meta, "compacted")?.unwrap_or(0),
            )
        };
        let metrics = crate::metrics::Metrics::default();
        let pending = Arc::new(Pending {
            commit_time: metrics.backend_commit.clone(),
            state: Mutex::new(PendingState::default()),
            progress: Condvar::new(),
            stored_changed: Notify::new(),
            backlog: tokio::sync::Semaphore::new(BACKLOG),
            complete: std::sync::atomic::AtomicBool::new(true),
        });
        let ttl_changed = Arc::new(Notify::new());
        let (queue, thread) = if crate::rt::inline() {
            let durable_at = tokio::time::Instant::now();
            (Queue::Inline { durable_at }, None)
        } else {
            let (queue, rx) = std::sync::mpsc::channel();
            let (db, pending) = (db.clone(), pending.clone());
            let thread = std::thread::Builder::new()
                .name("datasync-raft-writer".into())
                .spawn(move || writer(db, pending, rx))
                .map_err(wr)?;
            (Queue::Thread(queue), Some(thread))
        };
        Ok(Arc::new(Shared {
            db,
            inner: Mutex::new(Inner {
                hub: Hub::default(),
                revision,
                history,
                records: RecordSubs::default(),
                writer: Some(queue),
                leases,
                sessions,
                objs,
                versions,
                compacted,
            }),
            history_len,
            pending,
            writer_thread: Mutex::new(thread),
            ttl_changed,
            clock,
            membership: watch::Sender::new(membership),
            installed: std::sync::atomic::AtomicU64::new(0),
            behind_at_open: std::sync::atomic::AtomicU64::new(0),
            metrics,
            revision_now: std::sync::atomic::AtomicU64::new(revision),
            applied_index: std::sync::atomic::AtomicU64::new(0),
            closed: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// What the store measures (see [`crate::metrics`]).
    pub(crate) fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    /// Why the writer no longer stores applied state, if it does not (it failed, or
    /// the state machine closed).
    ///
    /// Takes only the writer's progress lock, never the apply lock.
    pub(crate) fn writer_stopped(&self) -> Option<String> {
        if let Some(why) = &self.pending.lock().failed {
            return Some(format!("the state machine's writer failed: {why}"));
        }
        self.closed
            .load(std::sync::atomic::Ordering::Acquire)
            .then(|| "the state machine is closed".to_owned())
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops the writer thread once it has stored everything applied (at shutdown).
    pub(crate) fn close(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        if let Some(Queue::Inline { .. }) = self.lock().writer.take()
            && self.pending.lock().failed.is_none()
        {
            close_clean(&self.db, &self.pending);
        }
        let thread = self
            .writer_thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(t) = thread
            && t.join().is_err()
        {
            tracing::error!("the state machine's writer thread panicked");
        }
    }

    /// Says whether the replica holds at least what it served before its last crash
    /// (see [`take_clean_close`]).
    pub(crate) fn set_complete(&self, complete: bool) {
        self.pending
            .complete
            .store(complete, std::sync::atomic::Ordering::Release);
    }

    /// Waits until redb holds everything applied so far.
    pub(crate) fn settle(&self) -> Result<(), StoreError> {
        self.pending.settle()
    }

    /// Pins the current state: a read transaction and its revision. Under the lock no
    /// apply runs, so once the writer has caught up redb is at `inner.revision`.
    pub(crate) fn pin(&self, inner: &Inner) -> Result<(ReadTransaction, u64), StoreError> {
        self.settle()?;
        let tx = self.db.begin_read().map_err(read_failed)?;
        Ok((tx, inner.revision))
    }

    /// Subscribes `reg`: with the history's transactions after `resume` when it holds
    /// them all, else pinning the state its first resync is read from, with that
    /// resync's reason (`StoreReset`: this store is behind `resume`; `Compacted`: the
    /// history no longer reaches it).
    pub(crate) fn subscribe(
        &self,
        reg: &Producer,
        prefixes: PrefixSet,
        capacity: usize,
        resume: Option<Revision>,
    ) -> Result<(Feed, Subscribed), StoreError> {
        let mut inner = self.lock();
        let reason = match resume {
            None => ResyncReason::Initial,
            Some(r) if r.0 > inner.revision => ResyncReason::StoreReset,
            // The history holds every revision from `oldest_watchable` on.
            Some(r) if r.0.saturating_add(1) < inner.oldest_watchable() => ResyncReason::Compacted,
            Some(r) => {
                let txns = inner
                    .history
                    .iter()
                    .filter(|u| u.revision > r.0)
                    .map(|u| u.txn.clone())
                    .collect();
                let feed = inner.hub.subscribe(reg, prefixes, capacity);
                return Ok((feed, Subscribed::Replay(txns)));
            }
        };
        let (tx, rev) = self.pin(&inner)?;
        let feed = inner.hub.subscribe(reg, prefixes, capacity);
        Ok((feed, Subscribed::Read(tx, rev, reason)))
    }

    /// Every value under `prefixes` in the pinned state.
    pub(crate) fn read_prefixes(
        tx: &ReadTransaction,
        prefixes: &PrefixSet,
    ) -> Result<Vec<PrefixValues>, StoreError> {
        prefixes
            .prefixes()
            .iter()
            .map(|p| {
                Ok(PrefixValues {
                    prefix: p.clone(),
                    values: scan(tx, p)?,
                })
            })
            .collect()
    }
}

/// The stored client sessions.
fn load_sessions(tx: &ReadTransaction) -> Result<Sessions, StorageError> {
    Sessions::load(session_records(tx)?).map_err(rd)
}

/// The stored client sessions, encoded.
fn session_records(tx: &ReadTransaction) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
    let t = tx.open_table(CLIENTS).map_err(rd)?;
    let mut out = Vec::new();
    for item in t.iter().map_err(rd)? {
        let (k, v) = item.map_err(rd)?;
        out.push((k.value(), v.value().to_vec()));
    }
    Ok(out)
}

/// Every stored lease, each with its full TTL from now (see [`super::lease`]).
fn load_leases(tx: &ReadTransaction, clock: &Clock) -> Result<Leases, StorageError> {
    let exp = tx.open_table(EXPIRY).map_err(rd)?;
    let kv = tx.open_table(KV).map_err(rd)?;
    let now = clock.now();
    let mut leases = Leases::default();
    for item in exp.iter().map_err(rd)? {
        let (k, _) = item.map_err(rd)?;
        let (word, key) = k.value();
        let Some(v) = kv.get(key).map_err(rd)? else {
            continue;
        };
        let h = Stored::header(v.value()).map_err(rd)?;
        // A key on a lease object expires with it (see `load_lease_objs`).
        if h.expires_at_ms != word || crate::types::lease_id_of(word).is_some() {
            continue;
        }
        let key = Key::from_stored(key).map_err(rd)?;
        leases.set(&key, now + lease::ttl_of(word, clock.wall_ms()), h.mod_rev);
    }
    Ok(leases)
}

/// Every stored lease object, each with its full TTL from now, and its keys.
fn load_lease_objs(tx: &ReadTransaction, clock: &Clock) -> Result<LeaseObjs, StorageError> {
    let t = tx.open_table(LEASE_OBJS).map_err(rd)?;
    let now = clock.now();
    let mut objs = LeaseObjs::default();
    for item in t.iter().map_err(rd)? {
        let (id, v) = item.map_err(rd)?;
        let stored: LeaseObj = bincode::deserialize(v.value()).map_err(rd)?;
        objs.set(id.value(), stored, now);
    }
    let exp = tx.open_table(EXPIRY).map_err(rd)?;
    let from = crate::types::LEASE_ID_FLAG;
    for item in exp
        .range((from, "")..(crate::types::TTL_FLAG, ""))
        .map_err(rd)?
    {
        let (k, _) = item.map_err(rd)?;
        let (word, key) = k.value();
        if let Some(id) = crate::types::lease_id_of(word) {
            objs.attach(id, &Key::from_stored(key).map_err(rd)?);
        }
    }
    Ok(objs)
}

/// The stored lease objects, encoded.
pub(super) fn lease_obj_records(tx: &ReadTransaction) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
    let t = tx.open_table(LEASE_OBJS).map_err(rd)?;
    let mut out = Vec::new();
    for item in t.iter().map_err(rd)? {
        let (k, v) = item.map_err(rd)?;
        out.push((k.value(), v.value().to_vec()));
    }
    Ok(out)
}

/// The mod revision the current state is at (for listings).
fn undo_base(tx: &ReadTransaction) -> Result<Revision, StoreError> {
    let meta = tx.open_table(SM_META).map_err(read_failed)?;
    let rev = match meta.get("revision").map_err(read_failed)? {
        Some(v) => {
            bincode::deserialize(v.value()).map_err(|e| StoreError::Corrupted(e.to_string()))?
        }
        None => 0,
    };
    Ok(Revision(rev))
}

fn put_meta<T: Serialize>(
    t: &mut Table<'_, &'static str, &'static [u8]>,
    key: &str,
    v: &T,
) -> Result<(), StorageError> {
    let bytes = bincode::serialize(v).map_err(wr)?;
    t.insert(key, bytes.as_slice()).map_err(wr)?;
    Ok(())
}

fn get_meta<T: serde::de::DeserializeOwned>(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<T>, StorageError> {
    match t.get(key).map_err(rd)? {
        Some(v) => Ok(Some(bincode::deserialize(v.value()).map_err(rd)?)),
        None => Ok(None),
    }
}

#[cfg(test)]
mod history_tests {
    #![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
    use super::*;

    /// A damaged file's row under revision 0 is no history: loading it would make the
    /// floors underflow.
    #[test]
    fn a_history_row_at_revision_zero_is_not_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("db")).unwrap();
        let tx = db.begin_write().unwrap();
        {
            tx.open_table(KV).unwrap();
            let mut h = tx.open_table(HISTORY).unwrap();
            let empty = bincode::serialize(&Vec::<StoredChange>::new()).unwrap();
            h.insert(0, empty.as_slice()).unwrap();
        }
        tx.commit().unwrap();
        let tx = db.begin_read().unwrap();
        assert!(load_history(&tx, 10, 0).unwrap().is_empty());
    }
}

//! The writer thread: stores applied state in redb behind the apply path.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use datasync::{Key, StoreError};
use redb::{Database, Durability, ReadableTable};
use tokio::sync::Notify;

use crate::storage::tables::{CLIENTS, EXPIRY, HISTORY, KV, LEASE_OBJS, SM_META, Stored};
use crate::types::{LogId, StorageError, StoredMembership};

use super::*;

/// A key changed by an apply, as the writer thread will store it: its record, or
/// `None` once deleted.
#[derive(Debug)]
pub(super) struct Write {
    pub(super) key: Key,
    pub(super) record: Option<Stored>,
}

/// One apply's writes, handed to the writer thread.
#[derive(Debug)]
pub(super) struct Work {
    pub(super) writes: Vec<Write>,
    pub(super) applied: Option<LogId>,
    pub(super) revision: u64,
    pub(super) membership: Option<StoredMembership>,
    /// Client sessions changed (`None`: evicted).
    pub(super) sessions: Vec<(u64, Option<Vec<u8>>)>,
    /// Lease objects changed (`None`: ended).
    pub(super) lease_objs: Vec<(u64, Option<Vec<u8>>)>,
    /// Records count versions from this apply on.
    pub(super) versions_on: bool,
    /// The history this apply added, for the history table.
    pub(super) history: Vec<Arc<Undo>>,
    /// History rows below this revision go (the history's length, compactions).
    pub(super) history_cut: u64,
    /// The last compaction, when this apply compacted.
    pub(super) compacted: Option<u64>,
}

/// Applied state not yet written to redb, and the writer's progress.
#[derive(Debug, Default)]
pub(super) struct PendingState {
    /// The newest applied record of every key changed but not yet stored (`None`:
    /// deleted), with the revision of that change.
    pub(super) keys: BTreeMap<Key, (u64, Option<Stored>)>,
    /// Applies handed to the writer, and applies it has stored.
    pub(super) queued: u64,
    pub(super) stored: u64,
    /// Why the writer stopped, if it failed.
    pub(super) failed: Option<String>,
}

/// What the apply path and the writer thread share.
#[derive(Debug)]
pub(super) struct Pending {
    pub(super) state: Mutex<PendingState>,
    pub(super) progress: Condvar,
    /// `progress` for async waiters.
    pub(super) stored_changed: Notify,
    /// Applies the writer may fall behind by; apply waits beyond it.
    pub(super) backlog: tokio::sync::Semaphore,
    /// Whether the replica holds at least what it served before its last crash (false
    /// while a restarted member catches up): only then is a close a clean one.
    pub(super) complete: std::sync::atomic::AtomicBool,
    /// The time of each commit (`etcd_disk_backend_commit_duration_seconds`).
    pub(super) commit_time: prometheus_client::metrics::histogram::Histogram,
}

/// Applies a writer thread may fall behind by before apply waits for it.
pub(super) const BACKLOG: usize = 256;

impl Pending {
    pub(super) fn lock(&self) -> MutexGuard<'_, PendingState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// [`Pending::settle`] without blocking the thread.
    pub(super) async fn caught_up(&self) -> Result<(), StoreError> {
        let target = self.lock().queued;
        loop {
            let notified = self.stored_changed.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if let Some(done) = self.lock().reached(target) {
                return done;
            }
            notified.await;
        }
    }

    /// Waits until everything applied so far is in redb.
    pub(super) fn settle(&self) -> Result<(), StoreError> {
        let mut st = self.lock();
        let target = st.queued;
        loop {
            if let Some(done) = st.reached(target) {
                return done;
            }
            st = self.progress.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl PendingState {
    /// Whether waiting for the writer to store `target` applies is over, and how.
    pub(super) fn reached(&self, target: u64) -> Option<Result<(), StoreError>> {
        match &self.failed {
            Some(why) => Some(Err(read_failed(WriterFailed(why.clone())))),
            None => (self.stored >= target).then_some(Ok(())),
        }
    }
}

/// The writer thread failed; the state machine stops.
#[derive(Debug, thiserror::Error)]
#[error("writing applied state to the database failed: {0}")]
pub(super) struct WriterFailed(pub(super) String);

/// How often the writer commits durably.
pub(super) const DURABLE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The writer thread: stores applies in order, several per redb transaction when it
/// falls behind; one transaction a second is durable, which bounds a crash's replay.
pub(super) fn writer(
    db: Arc<Database>,
    pending: Arc<Pending>,
    queue: std::sync::mpsc::Receiver<Work>,
) {
    let mut durable_at = tokio::time::Instant::now();
    while let Ok(first) = queue.recv() {
        let mut works = vec![first];
        works.extend(queue.try_iter());
        if !store_works(&db, &pending, works, &mut durable_at) {
            return;
        }
    }
    close_clean(&db, &pending);
}

/// Where applies go to be stored.
#[derive(Debug)]
pub(super) enum Queue {
    /// To the writer thread.
    Thread(std::sync::mpsc::Sender<Work>),
    /// Stored by the apply itself, under a simulation (see `rt`): the writer is never
    /// behind, but the code that stores is the same.
    Inline {
        /// When the last durable commit was.
        durable_at: tokio::time::Instant,
    },
}

/// Stores `works` in one transaction (durable if the last durable one is
/// [`DURABLE_EVERY`] old) and records the progress; `false` once the writer failed.
pub(super) fn store_works(
    db: &Database,
    pending: &Pending,
    works: Vec<Work>,
    durable_at: &mut tokio::time::Instant,
) -> bool {
    {
        let durable = durable_at.elapsed() >= DURABLE_EVERY;
        if durable {
            *durable_at = tokio::time::Instant::now();
        }
        let n = works.len();
        let revision = works.last().map_or(0, |w| w.revision);
        let start = std::time::Instant::now();
        let result = store(db, works, durable);
        if durable {
            pending.commit_time.observe(crate::metrics::since(start));
        }
        let mut st = pending.lock();
        match result {
            Ok(()) => {
                st.stored += n as u64;
                st.keys.retain(|_, (rev, _)| *rev > revision);
            }
            Err(e) => {
                tracing::error!(error = %e, "storing applied state failed; the state machine stops");
                st.failed = Some(e.to_string());
            }
        }
        let failed = st.failed.is_some();
        drop(st);
        pending.progress.notify_all();
        pending.stored_changed.notify_waiters();
        pending.backlog.add_permits(n);
        if failed {
            // Applies waiting for room fail rather than wait for a writer that is gone.
            pending.backlog.close();
            return false;
        }
    }
    true
}

/// At close, once everything applied is stored: a durable commit makes everything
/// stored so far durable and says so (see `take_clean_close`), unless the replica is
/// still behind what it served before a crash: then the next open must catch up again.
pub(super) fn close_clean(db: &Database, pending: &Pending) {
    if pending.complete.load(std::sync::atomic::Ordering::Acquire)
        && let Err(e) = mark_clean(db)
    {
        tracing::warn!(error = %e, "could not record a clean close");
    }
}

/// Records that the applied state is durable as of `applied`, at a clean close.
pub(super) fn mark_clean(db: &Database) -> Result<(), StorageError> {
    let tx = db.begin_write().map_err(wr)?;
    {
        let mut meta = tx.open_table(SM_META).map_err(wr)?;
        let applied = meta.get("applied").map_err(rd)?.map(|v| v.value().to_vec());
        if let Some(applied) = applied {
            meta.insert("closed", applied.as_slice()).map_err(wr)?;
        }
    }
    tx.commit().map_err(wr)
}

/// Whether the store closed cleanly last time: everything it had applied (and served)
/// is in redb. After a crash, applies of the last second may be missing until the log
/// is replayed, which a cluster member can only do once a leader tells it how far the
/// log is committed. The mark is removed durably here, so a later crash is not taken
/// for a clean close.
pub(crate) fn take_clean_close(db: &Database) -> Result<bool, redb::Error> {
    let tx = db.begin_write()?;
    let clean = {
        let mut meta = tx.open_table(SM_META)?;
        let closed = meta.remove("closed")?.map(|v| v.value().to_vec());
        let applied = meta.get("applied")?.map(|v| v.value().to_vec());
        closed.is_some() && closed == applied
    };
    tx.commit()?;
    Ok(clean)
}

/// Stores `works` in one redb transaction.
pub(super) fn store(db: &Database, works: Vec<Work>, durable: bool) -> Result<(), StorageError> {
    let mut tx = db.begin_write().map_err(wr)?;
    if !durable {
        tx.set_durability(Durability::None).map_err(wr)?;
    }
    {
        let mut kv = tx.open_table(KV).map_err(wr)?;
        let mut exp = tx.open_table(EXPIRY).map_err(wr)?;
        let mut meta = tx.open_table(SM_META).map_err(wr)?;
        let mut clients = tx.open_table(CLIENTS).map_err(wr)?;
        let mut objs = tx.open_table(LEASE_OBJS).map_err(wr)?;
        let mut history = tx.open_table(HISTORY).map_err(wr)?;
        let (mut last, mut revision, mut cut) = (None, None, 0);
        for w in works {
            for undo in &w.history {
                history
                    .insert(undo.revision, undo.encode().map_err(wr)?.as_slice())
                    .map_err(wr)?;
            }
            cut = cut.max(w.history_cut);
            if let Some(c) = w.compacted {
                put_meta(&mut meta, "compacted", &c)?;
            }
            for (id, obj) in &w.lease_objs {
                match obj {
                    Some(bytes) => objs.insert(id, bytes.as_slice()),
                    None => objs.remove(id),
                }
                .map_err(wr)?;
            }
            for (client, session) in &w.sessions {
                match session {
                    Some(bytes) => clients.insert(client, bytes.as_slice()),
                    None => clients.remove(client),
                }
                .map_err(wr)?;
            }
            for Write { key, record } in w.writes {
                let old = match &record {
                    Some(r) => kv.insert(key.as_str(), r.encode().as_slice()),
                    None => kv.remove(key.as_str()),
                }
                .map_err(wr)?
                .map(|v| Stored::header(v.value()).map(|h| h.expires_at_ms));
                if let Some(at) = old.transpose().map_err(rd)?
                    && at != 0
                {
                    exp.remove((at, key.as_str())).map_err(wr)?;
                }
                if let Some(r) = &record
                    && r.expires_at_ms != 0
                {
                    exp.insert((r.expires_at_ms, key.as_str()), ())
                        .map_err(wr)?;
                }
            }
            if let Some(m) = &w.membership {
                put_meta(&mut meta, "membership", m)?;
            }
            if w.versions_on {
                put_meta(&mut meta, "versions", &true)?;
            }
            if w.applied.is_some() {
                last = w.applied;
            }
            revision = Some(w.revision);
        }
        if let Some(r) = revision {
            put_meta(&mut meta, "revision", &r)?;
        }
        history.retain_in(..cut, |_, _| false).map_err(wr)?;
        if let Some(applied) = last {
            put_meta(&mut meta, "applied", &applied)?;
        }
    }
    tx.commit().map_err(wr)
}

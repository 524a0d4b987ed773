//! The replicated key-value state machine: applies committed commands, keeps a short
//! in-memory history for reads at past revisions, and feeds watchers. redb is written
//! behind the apply path by a writer thread (see [`apply_batch`]).

use datasync::transport::Producer;
use std::collections::{BTreeMap, VecDeque};
use std::io::Cursor;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use datasync::transport::feed::{Feed, Hub, Snapshots, Txn};
use datasync::{
    Key, KeyChange, KeyValue, Op, Prefix, PrefixSet, PrefixValues, Revision, StoreError, Value,
};
use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{
    AnyError, EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftSnapshotBuilder,
    StorageIOError,
};
use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    Table,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};

use super::lease::{self, Clock, Leases};
use super::session::{Seen, Sessions};
use super::{CLIENTS, EXPIRY, KV, SM_META, SNAPSHOT, Stored};
use crate::types::{
    Command, Entry, LogId, NodeId, Outcome, StorageError, StoredMembership, TypeConfig,
};

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
    Ok(())
}

/// Each key a transaction changed, with its value and mod revision before it.
type Before = Vec<(Key, Option<(Value, u64)>)>;

/// The state of keys before one transaction, to read at past revisions.
#[derive(Debug)]
struct Undo {
    revision: u64,
    before: Before,
}

/// What readers and the apply path share. The mutex orders commits with watch
/// snapshots: apply commits and publishes under it; a snapshot opens its read
/// transaction under it.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) hub: Hub,
    pub(crate) revision: u64,
    history: VecDeque<Undo>,
    /// The way to the writer thread (`None` once closed).
    writer: Option<std::sync::mpsc::Sender<Work>>,
    /// Lease deadlines, kept by apply (see [`super::lease`]).
    leases: Leases,
    /// Client sessions, kept by apply (see [`super::session`]).
    sessions: Sessions,
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
}

impl Shared {
    pub(crate) fn new(
        db: Arc<Database>,
        history_len: usize,
        clock: Clock,
    ) -> Result<Arc<Self>, StorageError> {
        let (revision, membership, leases, sessions) = {
            let tx = db.begin_read().map_err(rd)?;
            let meta = tx.open_table(SM_META).map_err(rd)?;
            let revision: Option<u64> = get_meta(&meta, "revision")?;
            let membership: Option<StoredMembership> = get_meta(&meta, "membership")?;
            (
                revision.unwrap_or(0),
                membership.unwrap_or_default(),
                load_leases(&tx, &clock)?,
                load_sessions(&tx)?,
            )
        };
        let pending = Arc::new(Pending {
            state: Mutex::new(PendingState::default()),
            progress: Condvar::new(),
            stored_changed: Notify::new(),
            backlog: tokio::sync::Semaphore::new(BACKLOG),
            complete: std::sync::atomic::AtomicBool::new(true),
        });
        let ttl_changed = Arc::new(Notify::new());
        let (queue, rx) = std::sync::mpsc::channel();
        let thread = {
            let (db, pending) = (db.clone(), pending.clone());
            std::thread::Builder::new()
                .name("datasync-raft-writer".into())
                .spawn(move || writer(db, pending, rx))
                .map_err(wr)?
        };
        Ok(Arc::new(Shared {
            db,
            inner: Mutex::new(Inner {
                hub: Hub::default(),
                revision,
                history: VecDeque::new(),
                writer: Some(queue),
                leases,
                sessions,
            }),
            history_len,
            pending,
            writer_thread: Mutex::new(Some(thread)),
            ttl_changed,
            clock,
            membership: watch::Sender::new(membership),
            installed: std::sync::atomic::AtomicU64::new(0),
        }))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops the writer thread once it has stored everything applied (at shutdown).
    pub(crate) fn close(&self) {
        self.lock().writer = None;
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

    /// Subscribes `reg` and pins the state its initial resync is read from.
    pub(crate) fn subscribe(
        &self,
        reg: &Producer,
        prefixes: PrefixSet,
        capacity: usize,
    ) -> Result<(Feed, ReadTransaction, u64), StoreError> {
        let mut inner = self.lock();
        let (tx, rev) = self.pin(&inner)?;
        let feed = inner.hub.subscribe(reg, prefixes, capacity);
        Ok((feed, tx, rev))
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

    /// Reads `key` at the current revision, without holding up applies: once the
    /// writer has stored everything applied before the call, redb's latest state holds
    /// every write acknowledged before it.
    pub(crate) async fn get_current(&self, key: &Key) -> Result<Option<KeyValue>, StoreError> {
        self.pending.caught_up().await?;
        let tx = self.db.begin_read().map_err(read_failed)?;
        let t = tx.open_table(KV).map_err(read_failed)?;
        t.get(key.as_str())
            .map_err(read_failed)?
            .map(|v| stored_kv(key.as_str(), v.value()))
            .transpose()
    }

    /// Reads `key`, at the current revision or at `at`.
    pub(crate) fn get(
        &self,
        key: &Key,
        at: Option<Revision>,
    ) -> Result<Option<KeyValue>, StoreError> {
        let (tx, undo) = self.pin_at(at)?;
        let t = tx.open_table(KV).map_err(read_failed)?;
        let mut cur = match t.get(key.as_str()).map_err(read_failed)? {
            Some(v) => {
                let s =
                    Stored::decode(v.value()).map_err(|e| StoreError::Corrupted(e.to_string()))?;
                Some((s.value, s.mod_rev))
            }
            None => None,
        };
        for before in undo.iter().rev() {
            if let Some((_, b)) = before.iter().find(|(k, _)| k == key) {
                cur = b.clone();
            }
        }
        Ok(cur.map(|(value, rev)| KeyValue {
            key: key.clone(),
            value,
            revision: Revision(rev),
        }))
    }

    /// Lists `prefix`, at the current revision or at `at`.
    pub(crate) fn list(
        &self,
        prefix: &Prefix,
        at: Option<Revision>,
    ) -> Result<(Revision, Vec<KeyValue>), StoreError> {
        let (tx, undo) = self.pin_at(at)?;
        let mut values = scan(&tx, prefix)?;
        let rev = at.map_or_else(|| undo_base(&tx), Ok)?;
        if !undo.is_empty() {
            let mut map: BTreeMap<Key, (Value, u64)> = values
                .into_iter()
                .map(|kv| (kv.key, (kv.value, kv.revision.0)))
                .collect();
            for before in undo.iter().rev() {
                for (k, before) in before {
                    if !prefix.matches(k.as_str()) {
                        continue;
                    }
                    match before {
                        Some(b) => map.insert(k.clone(), b.clone()),
                        None => map.remove(k),
                    };
                }
            }
            values = map
                .into_iter()
                .map(|(key, (value, r))| KeyValue {
                    key,
                    value,
                    revision: Revision(r),
                })
                .collect();
        }
        Ok((rev, values))
    }

    /// Pins the current state and the undo records needed to go back to `at`.
    fn pin_at(&self, at: Option<Revision>) -> Result<(ReadTransaction, Vec<Before>), StoreError> {
        let inner = self.lock();
        let (tx, current) = self.pin(&inner)?;
        let Some(Revision(at)) = at else {
            return Ok((tx, Vec::new()));
        };
        if at > current {
            return Err(StoreError::FutureRevision {
                requested: Revision(at),
                current: Revision(current),
            });
        }
        // Undo records cover revisions front.revision..=current: the state at
        // front.revision - 1 and later can be rebuilt.
        let oldest = inner.history.front().map_or(current, |u| u.revision - 1);
        if at < oldest {
            return Err(StoreError::Compacted {
                requested: Revision(at),
                compacted: Revision(oldest),
            });
        }
        let undo = inner
            .history
            .iter()
            .filter(|u| u.revision > at)
            .map(|u| u.before.clone())
            .collect();
        Ok((tx, undo))
    }

    /// A hash of the whole key space (keys, values, revisions): equal on replicas that
    /// applied the same log. FNV-1a, 64 bits.
    pub(crate) fn state_hash(&self) -> Result<u64, StoreError> {
        self.settle()?;
        let tx = self.db.begin_read().map_err(read_failed)?;
        let t = tx.open_table(KV).map_err(read_failed)?;
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut feed = |bytes: &[u8]| {
            for b in bytes.iter().chain(&(bytes.len() as u64).to_le_bytes()) {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        };
        for item in t.iter().map_err(read_failed)? {
            let (k, v) = item.map_err(read_failed)?;
            feed(k.value().as_bytes());
            feed(v.value());
        }
        // Client sessions are replicated state too: a replica that lost them would
        // apply a retried write again.
        let clients = tx.open_table(CLIENTS).map_err(read_failed)?;
        for item in clients.iter().map_err(read_failed)? {
            let (k, v) = item.map_err(read_failed)?;
            feed(&k.value().to_le_bytes());
            feed(v.value());
        }
        Ok(h)
    }

    /// The earliest lease deadline, if any, and now on the same clock.
    pub(crate) fn next_expiry(&self) -> (Option<std::time::Instant>, std::time::Instant) {
        (self.lock().leases.next(), self.clock.now())
    }

    /// Keys whose lease ran out by `now`, with their mod revisions (at most `limit`).
    pub(crate) fn due(&self, now: std::time::Instant, limit: usize) -> Vec<(String, u64)> {
        self.lock().leases.due(now, limit)
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
        let (mod_rev, _, stored) = Stored::header(v.value()).map_err(rd)?;
        if stored != word {
            continue;
        }
        let key = Key::from_stored(key).map_err(rd)?;
        leases.set(&key, now + lease::ttl_of(word, clock.wall_ms()), mod_rev);
    }
    Ok(leases)
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

/// Listings longer than this are read from both ends at once, on two threads.
const SPLIT_AFTER: usize = 4096;
/// How often (in keys) each end of a split scan checks whether the two have met.
const MEET_EVERY: usize = 256;

fn stored_kv(k: &str, v: &[u8]) -> Result<KeyValue, StoreError> {
    let s = Stored::decode(v).map_err(|e| StoreError::Corrupted(e.to_string()))?;
    Ok(KeyValue {
        key: Key::from_stored(k)
            .map_err(|e| StoreError::Corrupted(format!("stored key {k:?}: {e}")))?,
        value: s.value,
        revision: Revision(s.mod_rev),
    })
}

type Item<'a> = Result<
    (
        redb::AccessGuard<'a, &'static str>,
        redb::AccessGuard<'a, &'static [u8]>,
    ),
    redb::StorageError,
>;

/// One end of a split scan (`side` 0 forward, 1 backward): reads `items` into `out`
/// until they run out or, checked every [`MEET_EVERY`] keys, this end has reached the
/// last key the other end published.
fn read_until_met<'a>(
    items: impl Iterator<Item = Item<'a>>,
    out: &mut Vec<KeyValue>,
    met: &Mutex<[Option<Key>; 2]>,
    side: usize,
    prefix: &Prefix,
) -> Result<(), StoreError> {
    for (n, item) in items.enumerate() {
        let (k, v) = item.map_err(read_failed)?;
        if !prefix.matches(k.value()) {
            continue;
        }
        out.push(stored_kv(k.value(), v.value())?);
        if (n + 1) % MEET_EVERY == 0 {
            let mut m = met.lock().unwrap_or_else(|e| e.into_inner());
            m[side] = out.last().map(|kv| kv.key.clone());
            if let [Some(f), Some(b)] = &*m
                && f >= b
            {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Every value under `prefix`, in key order.
///
/// Each key is checked against the prefix as well as bounded by the range: the range is
/// only as right as [`Prefix::range_end`], and a key outside the prefix in a listing or
/// a resync would be a phantom that never gets an update.
///
/// Why two threads for long listings: most of a long scan is redb fetching pages its
/// cache does not hold, one read and one allocation at a time, and a cache that holds
/// a large prefix would cost its size in resident memory. Reading from both ends of the
/// range at once, on two cores, halves that time; the two meet in the middle.
fn scan(tx: &ReadTransaction, prefix: &Prefix) -> Result<Vec<KeyValue>, StoreError> {
    let t = tx.open_table(KV).map_err(read_failed)?;
    let end = prefix.range_end();
    let range = |t: &redb::ReadOnlyTable<&'static str, &'static [u8]>| match &end {
        Some(e) => t.range::<&str>(prefix.as_str()..e.as_str()),
        None => t.range::<&str>(prefix.as_str()..),
    };
    let mut fwd = range(&t).map_err(read_failed)?;
    let mut out = Vec::new();
    for item in fwd.by_ref() {
        let (k, v) = item.map_err(read_failed)?;
        if !prefix.matches(k.value()) {
            continue;
        }
        out.push(stored_kv(k.value(), v.value())?);
        if out.len() == SPLIT_AFTER {
            break;
        }
    }
    if out.len() < SPLIT_AFTER || std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        return Ok(out);
    }
    // The last key each end has read (forward, backward).
    let met = Mutex::new([None, None]);
    let back = std::thread::scope(|scope| {
        let helper = scope.spawn(|| -> Result<Vec<KeyValue>, StoreError> {
            let t = tx.open_table(KV).map_err(read_failed)?;
            let mut back = Vec::new();
            read_until_met(
                range(&t).map_err(read_failed)?.rev(),
                &mut back,
                &met,
                1,
                prefix,
            )?;
            Ok(back)
        });
        read_until_met(fwd, &mut out, &met, 0, prefix)?;
        helper
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })?;
    // `out` holds the range from its start, `back` from its end (descending); together
    // they cover it, overlapping where they met.
    if let Some(low) = back.last() {
        let cut = out.partition_point(|kv| kv.key < low.key);
        out.truncate(cut);
    }
    out.extend(back.into_iter().rev());
    Ok(out)
}

/// Resync snapshots for watch streams. Weak: a watch must not keep a stopped store's
/// files open; once the store is gone its hub drops and the stream reports `Stopped`.
#[derive(Debug, Clone)]
pub(crate) struct RaftSnapshots(pub(crate) std::sync::Weak<Shared>);

impl Snapshots for RaftSnapshots {
    fn resnapshot(&self, feed: &mut Feed) -> Result<(Revision, Vec<PrefixValues>), StoreError> {
        let shared = self.0.upgrade().ok_or(StoreError::Stopped)?;
        let (tx, rev) = {
            let inner = shared.lock();
            feed.rearm();
            shared.pin(&inner)?
        };
        // Read outside the lock: the read transaction is a consistent snapshot.
        Ok((Revision(rev), Shared::read_prefixes(&tx, feed.prefixes())?))
    }
}

/// The state machine handed to openraft.
#[derive(Debug)]
pub(crate) struct StateMachine {
    shared: Arc<Shared>,
}

impl StateMachine {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        StateMachine { shared }
    }
}

/// The serialized state in a raft snapshot.
#[derive(Serialize, Deserialize)]
struct Payload {
    revision: u64,
    /// Key and encoded [`Stored`] record, sorted by key.
    kv: Vec<(String, Vec<u8>)>,
    /// Client id and encoded session (see [`super::session`]).
    sessions: Vec<(u64, Vec<u8>)>,
}

/// A snapshot's state as stores before client sessions wrote it.
#[derive(Deserialize)]
struct PayloadV1 {
    revision: u64,
    kv: Vec<(String, Vec<u8>)>,
}

/// A valid snapshot payload, for the decoder fuzz test to mutate.
#[cfg(test)]
pub(crate) fn payload_seed() -> Vec<u8> {
    let rec = Stored {
        mod_rev: 9,
        create_rev: 2,
        expires_at_ms: 0,
        value: Value::from("v"),
    };
    Payload {
        revision: 9,
        kv: vec![("k/é".into(), rec.encode())],
        sessions: vec![(7, vec![1, 2, 3])],
    }
    .encode()
    .unwrap_or_default()
}

/// Whether `data` decodes as a snapshot payload (for the decoder fuzz test).
#[cfg(test)]
pub(crate) fn payload_decodes(data: &[u8]) -> bool {
    Payload::decode(data).is_ok()
}

/// The first bytes of a snapshot with client sessions; without them, a [`PayloadV1`]
/// (whose first bytes are its revision: never this large).
const PAYLOAD_V2: &[u8; 8] = b"DSSNAP02";

impl Payload {
    fn encode(&self) -> Result<Vec<u8>, bincode::Error> {
        let mut out = PAYLOAD_V2.to_vec();
        bincode::serialize_into(&mut out, self)?;
        Ok(out)
    }

    /// Decodes either format, told apart by the tag, never by trying one and then the
    /// other (a damaged new snapshot must not pass for an old one without sessions).
    fn decode(data: &[u8]) -> Result<Payload, bincode::Error> {
        match data.strip_prefix(PAYLOAD_V2) {
            Some(v2) => bincode::deserialize(v2),
            None => bincode::deserialize::<PayloadV1>(data).map(|v1| Payload {
                revision: v1.revision,
                kv: v1.kv,
                sessions: Vec::new(),
            }),
        }
    }
}

/// A key changed by an apply, as the writer thread will store it: its record, or
/// `None` once deleted.
#[derive(Debug)]
struct Write {
    key: Key,
    record: Option<Stored>,
}

/// One apply's writes, handed to the writer thread.
#[derive(Debug)]
struct Work {
    writes: Vec<Write>,
    applied: Option<LogId>,
    revision: u64,
    membership: Option<StoredMembership>,
    /// Client sessions changed (`None`: evicted).
    sessions: Vec<(u64, Option<Vec<u8>>)>,
}

/// Applied state not yet written to redb, and the writer's progress.
#[derive(Debug, Default)]
struct PendingState {
    /// The newest applied record of every key changed but not yet stored (`None`:
    /// deleted), with the revision of that change.
    keys: BTreeMap<Key, (u64, Option<Stored>)>,
    /// Applies handed to the writer, and applies it has stored.
    queued: u64,
    stored: u64,
    /// Why the writer stopped, if it failed.
    failed: Option<String>,
}

/// What the apply path and the writer thread share.
#[derive(Debug)]
struct Pending {
    state: Mutex<PendingState>,
    progress: Condvar,
    /// `progress` for async waiters.
    stored_changed: Notify,
    /// Applies the writer may fall behind by; apply waits beyond it.
    backlog: tokio::sync::Semaphore,
    /// Whether the replica holds at least what it served before its last crash (false
    /// while a restarted member catches up): only then is a close a clean one.
    complete: std::sync::atomic::AtomicBool,
}

/// Applies a writer thread may fall behind by before apply waits for it.
const BACKLOG: usize = 256;

impl Pending {
    fn lock(&self) -> MutexGuard<'_, PendingState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// [`Pending::settle`] without blocking the thread.
    async fn caught_up(&self) -> Result<(), StoreError> {
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
    fn settle(&self) -> Result<(), StoreError> {
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
    fn reached(&self, target: u64) -> Option<Result<(), StoreError>> {
        match &self.failed {
            Some(why) => Some(Err(read_failed(WriterFailed(why.clone())))),
            None => (self.stored >= target).then_some(Ok(())),
        }
    }
}

/// The writer thread failed; the state machine stops.
#[derive(Debug, thiserror::Error)]
#[error("writing applied state to the database failed: {0}")]
struct WriterFailed(String);

/// Where apply reads a key's current record: pending writes first, then redb.
struct View<'a> {
    kv: redb::ReadOnlyTable<&'static str, &'static [u8]>,
    pending: &'a mut PendingState,
    writes: Vec<Write>,
    lease_written: bool,
    leases: &'a mut Leases,
    /// When this apply runs, on the lease clock (and its wall clock).
    now: std::time::Instant,
    wall_ms: u64,
    sessions: &'a mut Sessions,
    /// The log index of the entry being applied.
    index: u64,
}

type Change = (KeyChange, Option<(Value, u64)>);

impl View<'_> {
    fn current(&self, key: &str) -> Result<Option<Stored>, StorageError> {
        if let Some((_, rec)) = self.pending.keys.get(key) {
            return Ok(rec.clone());
        }
        match self.kv.get(key).map_err(rd)? {
            Some(v) => Ok(Some(Stored::decode(v.value()).map_err(rd)?)),
            None => Ok(None),
        }
    }

    fn record(&mut self, key: &Key, revision: u64, record: Option<Stored>) {
        self.pending
            .keys
            .insert(key.clone(), (revision, record.clone()));
        self.writes.push(Write {
            key: key.clone(),
            record,
        });
    }

    fn put(
        &mut self,
        key: &str,
        value: Vec<u8>,
        expires: Option<u64>,
        rev: u64,
    ) -> Result<Change, StorageError> {
        // 0 is "no lease" in a stored record: a command carrying it has none.
        let expires = expires.filter(|w| *w != 0);
        let prev = self.current(key)?;
        let rec = Stored {
            mod_rev: rev,
            create_rev: prev.as_ref().map_or(rev, |p| p.create_rev),
            expires_at_ms: expires.unwrap_or(0),
            value: Value::from(value),
        };
        self.lease_written |= expires.is_some();
        let value = rec.value.clone();
        let key = Key::from_stored(key).map_err(wr)?;
        match expires {
            Some(word) => {
                let ttl = lease::ttl_of(word, self.wall_ms);
                self.leases.set(&key, self.now + ttl, rev)
            }
            None => self.leases.clear(&key),
        }
        self.record(&key, rev, Some(rec));
        let before = prev.map(|p| (p.value, p.mod_rev));
        Ok((
            KeyChange {
                key,
                op: Op::Put,
                value: Some(value),
                prev: before.as_ref().map(|(v, _)| v.clone()),
            },
            before,
        ))
    }

    fn delete(&mut self, key: &str, rev: u64) -> Result<Option<Change>, StorageError> {
        let Some(prev) = self.current(key)? else {
            return Ok(None);
        };
        let key = Key::from_stored(key).map_err(wr)?;
        self.leases.clear(&key);
        self.record(&key, rev, None);
        Ok(Some((
            KeyChange {
                key,
                op: Op::Delete,
                value: None,
                prev: Some(prev.value.clone()),
            },
            Some((prev.value, prev.mod_rev)),
        )))
    }

    /// Keys under `prefix` in redb or among the pending writes (including ones deleted
    /// since, which `delete` skips).
    fn keys_under(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let mut keys = std::collections::BTreeSet::new();
        for item in self.kv.range(prefix..).map_err(rd)? {
            let (k, _) = item.map_err(rd)?;
            if !k.value().starts_with(prefix) {
                break;
            }
            keys.insert(k.value().to_owned());
        }
        let pending = self.pending.keys.range::<str, _>((
            std::ops::Bound::Included(prefix),
            std::ops::Bound::Unbounded,
        ));
        keys.extend(
            pending
                .map(|(k, _)| k.as_str())
                .take_while(|k| k.starts_with(prefix))
                .map(str::to_owned),
        );
        Ok(keys.into_iter().collect())
    }

    /// Applies one command as revision `rev` (used only if something changes).
    fn apply(&mut self, cmd: Command, rev: u64) -> Result<(Outcome, Vec<Change>), StorageError> {
        Ok(match cmd {
            Command::Put {
                key,
                value,
                expires_at_ms,
            } => {
                let c = self.put(&key, value, expires_at_ms, rev)?;
                (Outcome::Written { revision: rev }, vec![c])
            }
            Command::Cas {
                key,
                expect,
                value,
                expires_at_ms,
            } => {
                let cur = self.current(&key)?;
                if cur.as_ref().map(|c| c.mod_rev) != expect {
                    let current = cur.map(|c| (c.value.as_bytes().to_vec(), c.mod_rev));
                    return Ok((Outcome::Conflict { current }, vec![]));
                }
                let c = self.put(&key, value, expires_at_ms, rev)?;
                (Outcome::Written { revision: rev }, vec![c])
            }
            Command::Delete { key, prefix } => {
                let keys = if prefix {
                    self.keys_under(&key)?
                } else {
                    vec![key]
                };
                let mut changes = Vec::new();
                for k in keys {
                    changes.extend(self.delete(&k, rev)?);
                }
                let count = changes.len() as u64;
                let revision = if count == 0 { rev - 1 } else { rev };
                (Outcome::Deleted { count, revision }, changes)
            }
            // `apply_command` unrolls batches and request ids before they get here.
            Command::Batch(_) | Command::Once { .. } => return Err(wr(super::CorruptValue(0))),
            Command::Expire { keys } => {
                let mut changes = Vec::new();
                for (k, mod_rev) in keys {
                    if self.current(&k)?.is_some_and(|c| c.mod_rev == mod_rev) {
                        changes.extend(self.delete(&k, rev)?);
                    }
                }
                changes.sort_by(|a, b| a.0.key.cmp(&b.0.key));
                let count = changes.len() as u64;
                let revision = if count == 0 { rev - 1 } else { rev };
                (Outcome::Deleted { count, revision }, changes)
            }
        })
    }
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

type Published = Vec<(Arc<Txn>, Undo)>;

/// Applies one command (a batch: each part in order), recording what it published.
///
/// Total on a command's content: an invalid command (see [`Command::check`]) changes
/// nothing and answers [`Outcome::Invalid`]. An error here is fatal to the replica and
/// comes back on every restart, so it is kept for storage failures.
fn apply_command(
    a: &mut View<'_>,
    cmd: Command,
    revision: &mut u64,
    txns: &mut Published,
) -> Result<Outcome, StorageError> {
    if let Command::Batch(cmds) = cmd {
        let mut outs = Vec::with_capacity(cmds.len());
        for c in cmds {
            outs.push(match c {
                Command::Batch(_) => invalid(&c, "a batch inside a batch".into()),
                c => apply_command(a, c, revision, txns)?,
            });
        }
        return Ok(Outcome::Batch(outs));
    }
    if let Err(e) = cmd.check_single() {
        return Ok(invalid(&cmd, e.to_string()));
    }
    if let Command::Once { id, cmd } = cmd {
        return Ok(match a.sessions.seen(&id) {
            Seen::Repeat(out) => out,
            Seen::Forgotten => Outcome::Invalid(format!(
                "request {} of client {:x} was answered and forgotten: not applied again",
                id.seq, id.client
            )),
            Seen::Full => Outcome::Invalid(format!(
                "client {:x} has {} requests in flight: request {} not applied",
                id.client,
                super::session::MAX_OUTCOMES,
                id.seq
            )),
            Seen::First => {
                let out = apply_command(a, *cmd, revision, txns)?;
                a.sessions.record(&id, out.clone(), a.index);
                out
            }
        });
    }
    let (outcome, changes) = a.apply(cmd, *revision + 1)?;
    if !changes.is_empty() {
        *revision += 1;
        let (changes, before): (Vec<_>, Vec<_>) = changes.into_iter().unzip();
        let keys = changes.iter().map(|c| c.key.clone());
        let undo = Undo {
            revision: *revision,
            before: keys.zip(before).collect(),
        };
        txns.push((
            Arc::new(Txn {
                revision: Revision(*revision),
                changes,
            }),
            undo,
        ));
    }
    Ok(outcome)
}

/// The outcome of an invalid command that reached the log, logged once per replica.
fn invalid(cmd: &Command, why: String) -> Outcome {
    tracing::error!(?cmd, %why, "skipping an invalid command in the log");
    Outcome::Invalid(why)
}

/// How often the writer commits durably.
const DURABLE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Applies `entries`: outcomes and events from the applied state (redb's plus pending
/// writes), the writes handed to the writer thread.
///
/// Why a writer thread: inserting into redb and committing took about 80% of an apply,
/// and openraft answers a batch's callers only after its apply, while the next batch
/// waits for their new proposals. Acknowledged writes are durable in the log either
/// way; redb is the log's applied image, replayed from its last durable commit after a
/// crash, as before. Readers see pending writes by waiting for the writer ([`Pending::settle`]).
fn apply_batch(shared: &Shared, entries: Vec<Entry>) -> Result<Vec<Outcome>, StorageError> {
    // Held across publish: watch snapshots pin state under the same lock.
    let mut guard = shared.lock();
    let inner = &mut *guard;
    let mut pending = shared.pending.lock();
    if let Some(why) = &pending.failed {
        return Err(wr(WriterFailed(why.clone())));
    }
    // Opened under the pending lock: the writer drops pending records only after
    // committing them, and under that lock, so each key is in one or the other.
    let rtx = shared.db.begin_read().map_err(rd)?;
    let mut revision = inner.revision;
    let mut outcomes = Vec::with_capacity(entries.len());
    let mut txns: Published = Vec::new();
    let mut membership = None;
    let mut applied = None;
    let mut view = View {
        kv: rtx.open_table(KV).map_err(rd)?,
        pending: &mut pending,
        writes: Vec::new(),
        lease_written: false,
        leases: &mut inner.leases,
        now: shared.clock.now(),
        wall_ms: shared.clock.wall_ms(),
        sessions: &mut inner.sessions,
        index: 0,
    };
    for e in entries {
        applied = Some(e.log_id);
        view.index = e.log_id.index;
        match e.payload {
            EntryPayload::Blank => outcomes.push(Outcome::Unchanged),
            EntryPayload::Membership(m) => {
                membership = Some(StoredMembership::new(Some(e.log_id), m));
                outcomes.push(Outcome::Unchanged);
            }
            EntryPayload::Normal(cmd) => {
                outcomes.push(apply_command(&mut view, cmd, &mut revision, &mut txns)?);
            }
        }
    }
    let work = Work {
        writes: view.writes,
        applied,
        revision,
        membership: membership.clone(),
        sessions: view.sessions.take_dirty(),
    };
    let leases_set = view.lease_written;
    let sent = inner.writer.as_ref().is_some_and(|w| w.send(work).is_ok());
    if !sent {
        return Err(wr(WriterFailed("the writer has stopped".into())));
    }
    pending.queued += 1;
    drop(pending);
    inner.revision = revision;
    for (txn, undo) in txns {
        inner.history.push_back(undo);
        if inner.history.len() > shared.history_len {
            inner.history.pop_front();
        }
        inner.hub.publish(txn);
    }
    drop(guard);
    if leases_set {
        shared.ttl_changed.notify_one();
    }
    if let Some(m) = membership {
        shared.membership.send_replace(m);
    }
    Ok(outcomes)
}

/// The writer thread: stores applies in order, several per redb transaction when it
/// falls behind; one transaction a second is durable, which bounds a crash's replay.
fn writer(db: Arc<Database>, pending: Arc<Pending>, queue: std::sync::mpsc::Receiver<Work>) {
    let mut durable_at = std::time::Instant::now();
    while let Ok(first) = queue.recv() {
        let mut works = vec![first];
        works.extend(queue.try_iter());
        let durable = durable_at.elapsed() >= DURABLE_EVERY;
        if durable {
            durable_at = std::time::Instant::now();
        }
        let n = works.len();
        let revision = works.last().map_or(0, |w| w.revision);
        let result = store(&db, works, durable);
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
            return;
        }
    }
    // The queue closed: the store is closing. A durable commit makes everything stored
    // so far durable and says so (see `take_clean_close`), unless the replica is still
    // behind what it served before a crash: then the next open must catch up again.
    if pending.complete.load(std::sync::atomic::Ordering::Acquire)
        && let Err(e) = mark_clean(&db)
    {
        tracing::warn!(error = %e, "could not record a clean close");
    }
}

/// Records that the applied state is durable as of `applied`, at a clean close.
fn mark_clean(db: &Database) -> Result<(), StorageError> {
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
fn store(db: &Database, works: Vec<Work>, durable: bool) -> Result<(), StorageError> {
    let mut tx = db.begin_write().map_err(wr)?;
    if !durable {
        tx.set_durability(Durability::None).map_err(wr)?;
    }
    {
        let mut kv = tx.open_table(KV).map_err(wr)?;
        let mut exp = tx.open_table(EXPIRY).map_err(wr)?;
        let mut meta = tx.open_table(SM_META).map_err(wr)?;
        let mut clients = tx.open_table(CLIENTS).map_err(wr)?;
        let (mut last, mut revision) = (None, None);
        for w in works {
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
                .map(|v| Stored::header(v.value()).map(|(_, _, at)| at));
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
            if w.applied.is_some() {
                last = w.applied;
            }
            revision = Some(w.revision);
        }
        if let Some(r) = revision {
            put_meta(&mut meta, "revision", &r)?;
        }
        if let Some(applied) = last {
            put_meta(&mut meta, "applied", &applied)?;
        }
    }
    tx.commit().map_err(wr)
}

/// Whether applying `entries` is quick enough to run on the async worker. A thread hop
/// to the blocking pool and back costs ~60 µs here; with redb's writes on the writer
/// thread, a batch of 256 puts applies in about that.
fn small(entries: &[Entry]) -> bool {
    let commands: usize = entries
        .iter()
        .map(|e| match &e.payload {
            EntryPayload::Normal(Command::Batch(b)) => b.len(),
            _ => 1,
        })
        .sum();
    commands <= 256
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            shared.settle().map_err(rd)?;
            let tx = shared.db.begin_read().map_err(rd)?;
            let meta = tx.open_table(SM_META).map_err(rd)?;
            let applied: Option<LogId> = get_meta(&meta, "applied")?;
            let membership: Option<StoredMembership> = get_meta(&meta, "membership")?;
            Ok((applied, membership.unwrap_or_default()))
        })
        .await
        .map_err(rd)?
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Outcome>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let shared = self.shared.clone();
        // A permit per apply, returned once the writer has stored it.
        shared.pending.backlog.acquire().await.map_err(wr)?.forget();
        if small(&entries) {
            return apply_batch(&shared, entries);
        }
        tokio::task::spawn_blocking(move || apply_batch(&shared, entries))
            .await
            .map_err(wr)?
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            shared: self.shared.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let shared = self.shared.clone();
        let meta = meta.clone();
        tokio::task::spawn_blocking(move || install(&shared, &meta, snapshot.into_inner()))
            .await
            .map_err(wr)?
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let db = self.shared.db.clone();
        tokio::task::spawn_blocking(move || {
            let tx = db.begin_read().map_err(rd)?;
            let t = tx.open_table(SNAPSHOT).map_err(rd)?;
            let meta: Option<SnapshotMeta<NodeId, openraft::BasicNode>> = get_meta(&t, "meta")?;
            let data = t.get("data").map_err(rd)?.map(|v| v.value().to_vec());
            Ok(match (meta, data) {
                (Some(meta), Some(data)) => Some(Snapshot {
                    meta,
                    snapshot: Box::new(Cursor::new(data)),
                }),
                _ => None,
            })
        })
        .await
        .map_err(rd)?
    }
}

/// Replaces the whole state with a snapshot's; watchers resync.
fn install(
    shared: &Shared,
    meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
    data: Vec<u8>,
) -> Result<(), StorageError> {
    let payload = Payload::decode(&data).map_err(wr)?;
    let mut inner = shared.lock();
    // Applies run one at a time, so once the writer has caught up nothing is pending.
    shared.settle().map_err(wr)?;
    let tx = shared.db.begin_write().map_err(wr)?;
    {
        let mut kv = tx.open_table(KV).map_err(wr)?;
        kv.retain(|_, _| false).map_err(wr)?;
        let mut exp = tx.open_table(EXPIRY).map_err(wr)?;
        exp.retain(|_, _| false).map_err(wr)?;
        for (k, rec) in &payload.kv {
            kv.insert(k.as_str(), rec.as_slice()).map_err(wr)?;
            let (_, _, at) = Stored::header(rec).map_err(wr)?;
            if at != 0 {
                exp.insert((at, k.as_str()), ()).map_err(wr)?;
            }
        }
        let mut clients = tx.open_table(CLIENTS).map_err(wr)?;
        clients.retain(|_, _| false).map_err(wr)?;
        for (client, session) in &payload.sessions {
            clients.insert(client, session.as_slice()).map_err(wr)?;
        }
        let mut m = tx.open_table(SM_META).map_err(wr)?;
        if let Some(applied) = meta.last_log_id {
            put_meta(&mut m, "applied", &applied)?;
        }
        put_meta(&mut m, "membership", &meta.last_membership)?;
        put_meta(&mut m, "revision", &payload.revision)?;
        // What open needs to tell a crash between this and the log purge that follows
        // from a damaged log (see `storage::open`).
        put_meta(&mut m, "installed", &meta.last_log_id)?;
        let mut s = tx.open_table(SNAPSHOT).map_err(wr)?;
        put_meta(&mut s, "meta", meta)?;
        s.insert("data", data.as_slice()).map_err(wr)?;
    }
    tx.commit().map_err(wr)?;
    let rtx = shared.db.begin_read().map_err(rd)?;
    inner.leases = load_leases(&rtx, &shared.clock)?;
    inner.sessions = load_sessions(&rtx)?;
    inner.revision = payload.revision;
    inner.history.clear();
    inner.hub.resync_all();
    drop(inner);
    shared.ttl_changed.notify_one();
    shared.membership.send_replace(meta.last_membership.clone());
    shared
        .installed
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// Builds snapshots from the state machine (log compaction).
#[derive(Debug)]
pub(crate) struct SnapshotBuilder {
    shared: Arc<Shared>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            let db = &shared.db;
            shared.settle().map_err(rd)?;
            // Make every apply so far durable, so the snapshot never runs ahead of the
            // state a restart recovers (the log before it may be purged).
            let mut tx = db.begin_write().map_err(wr)?;
            tx.set_durability(Durability::Immediate).map_err(wr)?;
            tx.commit().map_err(wr)?;
            let rtx = db.begin_read().map_err(rd)?;
            let m = rtx.open_table(SM_META).map_err(rd)?;
            let applied: Option<LogId> = get_meta(&m, "applied")?;
            let membership: StoredMembership = get_meta(&m, "membership")?.unwrap_or_default();
            let revision: u64 = get_meta(&m, "revision")?.unwrap_or(0);
            let kv = rtx.open_table(KV).map_err(rd)?;
            let mut pairs = Vec::with_capacity(kv.len().map_err(rd)? as usize);
            for item in kv.iter().map_err(rd)? {
                let (k, v) = item.map_err(rd)?;
                pairs.push((k.value().to_owned(), v.value().to_vec()));
            }
            let data = Payload {
                revision,
                kv: pairs,
                sessions: session_records(&rtx)?,
            }
            .encode()
            .map_err(wr)?;
            let meta = SnapshotMeta {
                last_log_id: applied,
                last_membership: membership,
                snapshot_id: format!("{}-{revision}", applied.map_or(0, |l| l.index)),
            };
            let tx = db.begin_write().map_err(wr)?;
            {
                let mut s = tx.open_table(SNAPSHOT).map_err(wr)?;
                put_meta(&mut s, "meta", &meta)?;
                s.insert("data", data.as_slice()).map_err(wr)?;
            }
            tx.commit().map_err(wr)?;
            Ok(Snapshot {
                meta,
                snapshot: Box::new(Cursor::new(data)),
            })
        })
        .await
        .map_err(wr)?
    }
}

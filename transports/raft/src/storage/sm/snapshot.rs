//! The openraft adapter: applied state, apply, and raft snapshots (build, install).

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{OptionalSend, RaftSnapshotBuilder};
use redb::{Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata};
use serde::{Deserialize, Serialize};

use crate::snapshot_data::SnapshotData;
use crate::storage::tables::{CLIENTS, EXPIRY, HISTORY, KV, LEASE_OBJS, SM_META, SNAPSHOT, Stored};
use crate::types::{Entry, LogId, NodeId, Outcome, StorageError, StoredMembership, TypeConfig};

use super::apply::{apply_batch, small};
use super::*;

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
pub(super) struct Payload {
    revision: u64,
    /// Key and encoded [`Stored`] record, sorted by key.
    #[serde(with = "crate::bytes::pairs")]
    kv: Vec<(String, Vec<u8>)>,
    /// Client id and encoded session (see [`super::session`]).
    #[serde(with = "crate::bytes::pairs")]
    sessions: Vec<(u64, Vec<u8>)>,
    /// Lease object id and encoded object (see [`crate::storage::lease::LeaseObj`]).
    #[serde(with = "crate::bytes::pairs")]
    leases: Vec<(u64, Vec<u8>)>,
    /// Whether records count versions.
    versions: bool,
}

/// A snapshot's state as stores before lease objects wrote it.
#[derive(Deserialize)]
pub(super) struct PayloadV2 {
    revision: u64,
    #[serde(with = "crate::bytes::pairs")]
    kv: Vec<(String, Vec<u8>)>,
    #[serde(with = "crate::bytes::pairs")]
    sessions: Vec<(u64, Vec<u8>)>,
}

/// A snapshot's state as stores before client sessions wrote it.
#[derive(Deserialize)]
pub(super) struct PayloadV1 {
    revision: u64,
    #[serde(with = "crate::bytes::pairs")]
    kv: Vec<(String, Vec<u8>)>,
}

/// A valid snapshot payload, for the decoder fuzz test to mutate.
#[cfg(test)]
pub(crate) fn payload_seed() -> Vec<u8> {
    let rec = Stored {
        mod_rev: 9,
        create_rev: 2,
        expires_at_ms: 0,
        version: 1,
        versioned: true,
        value: datasync::Value::from("v"),
    };
    Payload {
        revision: 9,
        kv: vec![("k/é".into(), rec.encode())],
        sessions: vec![(7, vec![1, 2, 3])],
        leases: vec![(5, vec![4, 5, 6])],
        versions: true,
    }
    .encode()
    .unwrap_or_default()
}

/// Whether `data` decodes as a snapshot payload (for the decoder fuzz test).
#[cfg(test)]
pub(crate) fn payload_decodes(data: &[u8]) -> bool {
    Payload::decode(data).is_ok()
}

/// The first bytes of a snapshot with client sessions (a [`PayloadV2`]); without
/// them, a [`PayloadV1`] (whose first bytes are its revision: never this large).
pub(super) const PAYLOAD_V2: &[u8; 8] = b"DSSNAP02";
/// The first bytes of a snapshot with lease objects too.
pub(super) const PAYLOAD_V3: &[u8; 8] = b"DSSNAP03";

impl Payload {
    fn encode(&self) -> Result<Vec<u8>, bincode::Error> {
        let mut out = PAYLOAD_V3.to_vec();
        bincode::serialize_into(&mut out, self)?;
        Ok(out)
    }

    /// Decodes any format, told apart by the tag, never by trying one and then the
    /// other (a damaged new snapshot must not pass for an old one without sessions).
    fn decode(data: &[u8]) -> Result<Payload, bincode::Error> {
        if let Some(v3) = data.strip_prefix(PAYLOAD_V3) {
            return bincode::deserialize(v3);
        }
        match data.strip_prefix(PAYLOAD_V2) {
            Some(v2) => bincode::deserialize::<PayloadV2>(v2).map(|v2| Payload {
                revision: v2.revision,
                kv: v2.kv,
                sessions: v2.sessions,
                leases: Vec::new(),
                versions: false,
            }),
            None => bincode::deserialize::<PayloadV1>(data).map(|v1| Payload {
                revision: v1.revision,
                kv: v1.kv,
                sessions: Vec::new(),
                leases: Vec::new(),
                versions: false,
            }),
        }
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let shared = self.shared.clone();
        crate::rt::blocking(move || {
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
        crate::rt::blocking(move || apply_batch(&shared, entries))
            .await
            .map_err(wr)?
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            shared: self.shared.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotData>, StorageError> {
        Ok(Box::new(SnapshotData::bytes(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<SnapshotData>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_bytes().await.map_err(rd)?;
        let shared = self.shared.clone();
        let meta = meta.clone();
        crate::rt::blocking(move || install(&shared, &meta, data))
            .await
            .map_err(wr)?
    }

    /// The state as it is now, once a snapshot was ever built or installed (before,
    /// none: the whole log is still there). Newer than the last one built, which
    /// openraft accepts (a follower sent it is only further along).
    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let shared = self.shared.clone();
        crate::rt::blocking(move || {
            let tx = shared.db.begin_read().map_err(rd)?;
            let t = tx.open_table(SNAPSHOT).map_err(rd)?;
            if t.get("meta").map_err(rd)?.is_none() {
                return Ok(None);
            }
            let (view, meta) = pin(&shared)?;
            Ok(Some(Snapshot {
                meta,
                snapshot: Box::new(lazy(view)),
            }))
        })
        .await
        .map_err(rd)?
    }
}

/// A consistent view of the state machine and its snapshot metadata, durable before
/// it is returned: the view and every apply before it survive a crash, so openraft may
/// purge the log up to it. The metadata is stored as the last snapshot's.
fn pin(
    shared: &Arc<Shared>,
) -> Result<(View, SnapshotMeta<NodeId, openraft::BasicNode>), StorageError> {
    shared.settle().map_err(rd)?;
    let view = shared.db.begin_read().map_err(rd)?;
    let m = view.open_table(SM_META).map_err(rd)?;
    let applied: Option<LogId> = get_meta(&m, "applied")?;
    let membership: StoredMembership = get_meta(&m, "membership")?.unwrap_or_default();
    let revision: u64 = get_meta(&m, "revision")?.unwrap_or(0);
    let meta = SnapshotMeta {
        last_log_id: applied,
        last_membership: membership,
        snapshot_id: format!("{}-{revision}", applied.map_or(0, |l| l.index)),
    };
    // A durable commit after the view began covers every commit the view sees (the
    // writer thread's commits are not durable on their own).
    let mut tx = shared.db.begin_write().map_err(wr)?;
    tx.set_durability(Durability::Immediate).map_err(wr)?;
    {
        let mut s = tx.open_table(SNAPSHOT).map_err(wr)?;
        put_meta(&mut s, "meta", &meta)?;
        // Stores before this kept a copy of the state here.
        s.remove("data").map_err(wr)?;
    }
    tx.commit().map_err(wr)?;
    let view = View {
        tx: view,
        shared: shared.clone(),
    };
    Ok((view, meta))
}

/// A pinned view, with the state machine it reads: a read transaction holds the data
/// file open (and locked) past the database's drop, so the view counts as a user of it
/// and [`RaftStore::shutdown`](crate::RaftStore::shutdown) waits for it; an encoding
/// stops once the state machine is closed, so that wait is short.
struct View {
    tx: redb::ReadTransaction,
    shared: Arc<Shared>,
}

/// The snapshot of a view, encoded when first used.
fn lazy(view: View) -> SnapshotData {
    SnapshotData::lazy(move |dropped| {
        let stop = || dropped.load(Ordering::Relaxed) || view.shared.closed.load(Ordering::Acquire);
        encode_view(&view.tx, &stop).map_err(|e| e.to_string())
    })
}

/// The payload of the state a view sees; ends early once `stop` says so (nobody wants
/// the bytes any more, or the store is closing: the view holds the data files open).
fn encode_view(
    view: &redb::ReadTransaction,
    stop: &dyn Fn() -> bool,
) -> Result<Vec<u8>, StorageError> {
    let m = view.open_table(SM_META).map_err(rd)?;
    Payload {
        revision: get_meta(&m, "revision")?.unwrap_or(0),
        kv: kv_records(view, stop)?,
        sessions: session_records(view)?,
        leases: lease_obj_records(view)?,
        versions: get_meta(&m, "versions")?.unwrap_or(false),
    }
    .encode()
    .map_err(rd)
}

/// Replaces the whole state with a snapshot's; watchers resync.
pub(super) fn install(
    shared: &Shared,
    meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
    data: Vec<u8>,
) -> Result<(), StorageError> {
    let payload = Payload::decode(&data).map_err(wr)?;
    let inner = shared.lock();
    // Applies run one at a time, so once the writer has caught up nothing is pending.
    shared.settle().map_err(wr)?;
    let tx = shared.db.begin_write().map_err(wr)?;
    {
        replace_state(&tx, &payload, true)?;
        let mut m = tx.open_table(SM_META).map_err(wr)?;
        if let Some(applied) = meta.last_log_id {
            put_meta(&mut m, "applied", &applied)?;
        }
        put_meta(&mut m, "membership", &meta.last_membership)?;
        put_meta(&mut m, "revision", &payload.revision)?;
        // What open needs to tell a crash between this and the log purge that follows
        // from a damaged log (see `storage::open`).
        put_meta(&mut m, "installed", &meta.last_log_id)?;
        // The state just written is the snapshot: no copy of it is kept.
        let mut s = tx.open_table(SNAPSHOT).map_err(wr)?;
        put_meta(&mut s, "meta", meta)?;
        s.remove("data").map_err(wr)?;
    }
    tx.commit().map_err(wr)?;
    reloaded(shared, inner, payload.revision)?;
    shared.membership.send_replace(meta.last_membership.clone());
    shared
        .installed
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if let Some(l) = meta.last_log_id {
        shared
            .applied_index
            .fetch_max(l.index, std::sync::atomic::Ordering::Relaxed);
    }
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
        crate::rt::blocking(move || {
            let (view, meta) = pin(&shared)?;
            Ok(Snapshot {
                meta,
                snapshot: Box::new(lazy(view)),
            })
        })
        .await
        .map_err(wr)?
    }
}

/// The applied state at one revision as a snapshot payload (for a backup): its
/// revision, its key count and the payload. Read under the apply lock once the writer
/// has stored everything applied, so no apply falls in between.
///
/// Why without client sessions: they let this group apply a retried write once, and
/// no client of this group retries into a store restored from the backup; their log
/// positions, meaningless in a new log, would also make its session eviction drop its
/// own newest clients first.
pub(crate) fn backup_payload(shared: &Shared) -> Result<(u64, u64, Vec<u8>), StorageError> {
    let rtx = {
        let _applies = shared.lock();
        shared.settle().map_err(rd)?;
        shared.db.begin_read().map_err(rd)?
    };
    let m = rtx.open_table(SM_META).map_err(rd)?;
    let revision: u64 = get_meta(&m, "revision")?.unwrap_or(0);
    let pairs = kv_records(&rtx, &|| false)?;
    let keys = pairs.len() as u64;
    let data = Payload {
        revision,
        kv: pairs,
        sessions: Vec::new(),
        leases: lease_obj_records(&rtx)?,
        versions: get_meta(&m, "versions")?.unwrap_or(false),
    }
    .encode()
    .map_err(rd)?;
    Ok((revision, keys, data))
}

/// A payload's revision and key count, checking that it decodes and that every record
/// is whole.
pub(crate) fn payload_summary(data: &[u8]) -> Result<(u64, u64), String> {
    let p = Payload::decode(data).map_err(|e| e.to_string())?;
    for (k, rec) in &p.kv {
        datasync::Key::from_stored(k).map_err(|e| format!("key {k:?}: {e}"))?;
        Stored::decode(rec).map_err(|e| format!("record of {k:?}: {e}"))?;
    }
    Ok((p.revision, p.kv.len() as u64))
}

/// Replaces the applied state with a backup's (a restore into a new store): keys,
/// leases and revision; the applied log position and membership stay this store's,
/// and it has no client sessions (a backup's are ignored: see [`backup_payload`]).
/// Durable when it returns; watchers resync.
pub(crate) fn restore_payload(shared: &Shared, data: &[u8]) -> Result<(), StorageError> {
    let payload = Payload::decode(data).map_err(wr)?;
    let inner = shared.lock();
    shared.settle().map_err(wr)?;
    let mut tx = shared.db.begin_write().map_err(wr)?;
    tx.set_durability(Durability::Immediate).map_err(wr)?;
    {
        replace_state(&tx, &payload, false)?;
        let mut m = tx.open_table(SM_META).map_err(wr)?;
        put_meta(&mut m, "revision", &payload.revision)?;
    }
    tx.commit().map_err(wr)?;
    reloaded(shared, inner, payload.revision)
}

/// Every key with its encoded record, in key order; an error once `stop` says so.
fn kv_records(
    rtx: &redb::ReadTransaction,
    stop: &dyn Fn() -> bool,
) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
    let kv = rtx.open_table(KV).map_err(rd)?;
    let mut pairs = Vec::with_capacity(kv.len().map_err(rd)? as usize);
    for (n, item) in kv.iter().map_err(rd)?.enumerate() {
        if n % 4096 == 0 && stop() {
            return Err(rd(io::Error::other(
                "snapshot encoding stopped: dropped, or the store closed",
            )));
        }
        let (k, v) = item.map_err(rd)?;
        pairs.push((k.value().to_owned(), v.value().to_vec()));
    }
    Ok(pairs)
}

/// Replaces the keys, their expiry index and (with `sessions`, else none) the client
/// sessions with `payload`'s, in `tx`.
fn replace_state(
    tx: &redb::WriteTransaction,
    payload: &Payload,
    sessions: bool,
) -> Result<(), StorageError> {
    let mut kv = tx.open_table(KV).map_err(wr)?;
    kv.retain(|_, _| false).map_err(wr)?;
    let mut exp = tx.open_table(EXPIRY).map_err(wr)?;
    exp.retain(|_, _| false).map_err(wr)?;
    for (k, rec) in &payload.kv {
        kv.insert(k.as_str(), rec.as_slice()).map_err(wr)?;
        let at = Stored::header(rec).map_err(wr)?.expires_at_ms;
        if at != 0 {
            exp.insert((at, k.as_str()), ()).map_err(wr)?;
        }
    }
    let mut clients = tx.open_table(CLIENTS).map_err(wr)?;
    clients.retain(|_, _| false).map_err(wr)?;
    if sessions {
        for (client, session) in &payload.sessions {
            clients.insert(client, session.as_slice()).map_err(wr)?;
        }
    }
    let mut meta = tx.open_table(SM_META).map_err(wr)?;
    put_meta(&mut meta, "versions", &payload.versions)?;
    let mut objs = tx.open_table(LEASE_OBJS).map_err(wr)?;
    objs.retain(|_, _| false).map_err(wr)?;
    // The history led to the state replaced; none leads to the new one.
    let mut history = tx.open_table(HISTORY).map_err(wr)?;
    history.retain(|_, _| false).map_err(wr)?;
    for (id, obj) in &payload.leases {
        bincode::deserialize::<crate::storage::lease::LeaseObj>(obj).map_err(wr)?;
        objs.insert(id, obj.as_slice()).map_err(wr)?;
    }
    Ok(())
}

/// After the whole state was replaced (committed): leases and sessions reloaded, the
/// revision set, history dropped, every watcher resynced.
fn reloaded(
    shared: &Shared,
    mut inner: MutexGuard<'_, Inner>,
    revision: u64,
) -> Result<(), StorageError> {
    let rtx = shared.db.begin_read().map_err(rd)?;
    inner.leases = load_leases(&rtx, &shared.clock)?;
    inner.sessions = load_sessions(&rtx)?;
    inner.objs = load_lease_objs(&rtx, &shared.clock)?;
    let meta = rtx.open_table(SM_META).map_err(rd)?;
    inner.versions = get_meta(&meta, "versions")?.unwrap_or(false);
    inner.revision = revision;
    shared
        .revision_now
        .store(revision, std::sync::atomic::Ordering::Release);
    inner.history.clear();
    inner.hub.resync_all();
    inner.records.all_behind();
    drop(inner);
    shared.ttl_changed.notify_one();
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::SeekFrom;
    use std::pin::Pin;

    use openraft::{CommittedLeaderId, EntryPayload};
    use tokio::io::{AsyncReadExt, AsyncSeek, AsyncSeekExt};

    use super::*;
    use crate::types::Command;

    fn entry(index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Command::Put {
                key: format!("k/{index:05}"),
                value: vec![index as u8; 200],
                expires_at_ms: None,
            }),
        }
    }

    /// A served snapshot reads as openraft's chunked sender reads it (seek to the end
    /// for its size, then to each chunk's offset) to the same bytes as a whole read,
    /// a seek asked for before the bytes were encoded included, and installs as the
    /// state it was taken of.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_served_snapshot_reads_in_chunks_as_a_whole() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (db, _wal) = crate::storage::open(dir.path(), 64 << 10).expect("opens");
        let shared = Shared::new(db, 100, crate::Clock::new()).expect("state");
        let mut sm = StateMachine::new(shared.clone());
        sm.apply((1..=3_000).map(entry).collect::<Vec<_>>())
            .await
            .expect("applies");
        assert!(sm.get_current_snapshot().await.expect("reads").is_none());
        let built = sm.get_snapshot_builder().await.build_snapshot().await;
        let at = built.expect("builds").meta.last_log_id;
        assert_eq!(at.map(|l| l.index), Some(3_000));

        let whole = sm
            .get_current_snapshot()
            .await
            .expect("reads")
            .expect("one");
        assert_eq!(whole.meta.last_log_id, at);
        let whole = whole.snapshot.into_bytes().await.expect("encodes");
        assert!(whole.len() > 3_000 * 200);

        let mut snap = sm
            .get_current_snapshot()
            .await
            .expect("reads")
            .expect("one");
        // Before any read: the seek waits for the encoding.
        Pin::new(&mut *snap.snapshot)
            .start_seek(SeekFrom::End(0))
            .expect("seeks");
        let len = std::future::poll_fn(|cx| Pin::new(&mut *snap.snapshot).poll_complete(cx))
            .await
            .expect("seeks");
        assert_eq!(len, whole.len() as u64);
        let mut chunks = Vec::new();
        let mut off = 0;
        while off < len {
            snap.snapshot
                .seek(SeekFrom::Start(off))
                .await
                .expect("seeks");
            let mut buf = vec![0; 100_000];
            let n = snap.snapshot.read(&mut buf).await.expect("reads");
            assert!(n > 0, "a read at {off} of {len}");
            chunks.extend_from_slice(&buf[..n]);
            off += n as u64;
        }
        assert_eq!(chunks, whole);

        // Installed into another store, it is the state it was taken of.
        let other = tempfile::tempdir().expect("temp dir");
        let (db2, _wal2) = crate::storage::open(other.path(), 64 << 10).expect("opens");
        let shared2 = Shared::new(db2, 100, crate::Clock::new()).expect("state");
        let mut sm2 = StateMachine::new(shared2.clone());
        let mut received = SnapshotData::bytes(Vec::new());
        tokio::io::AsyncWriteExt::write_all(&mut received, &chunks)
            .await
            .expect("writes");
        sm2.install_snapshot(&snap.meta, Box::new(received))
            .await
            .expect("installs");
        let again = sm2
            .get_current_snapshot()
            .await
            .expect("reads")
            .expect("one");
        assert_eq!(again.snapshot.into_bytes().await.expect("encodes"), whole);

        // A store that closes stops an encoding (its view holds the files open, and
        // shutdown waits for it).
        let late = sm
            .get_current_snapshot()
            .await
            .expect("reads")
            .expect("one");
        shared.close();
        let refused = late.snapshot.into_bytes().await;
        assert!(
            refused.is_err(),
            "encoded after close: {} bytes",
            refused.map_or(0, |b| b.len())
        );
        shared2.close();
    }
}

//! The raft log and vote, in redb, with group commit.
//!
//! openraft hands the log store one `append` per client write and, with storage-v2,
//! lets `append` return before the entries are durable: the [`LogFlushed`] callback
//! reports durability. So every mutation is queued, in order, to one writer thread,
//! which drains whatever has queued up into **one** redb transaction and one fsync, then
//! completes every callback of the batch. Under concurrent load one fsync covers many
//! writes; a lone writer pays one fsync per write, never more. Callbacks run only after
//! the commit has returned, i.e. once the entries are on disk.
//!
//! Until its batch is committed, an appended entry lives in `pending`, and readers see
//! it there; entries a queued truncate removed are hidden from readers at once.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex, mpsc};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    AnyError, ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader, StorageIOError, Vote,
};
use redb::{Database, Durability, ReadableDatabase, ReadableTable};
use tokio::sync::oneshot;

use super::{LOG, RAFT_META};
use crate::types::{Entry, LogId, NodeId, StorageError, TypeConfig};

fn io(verb: ErrorVerb, e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::new(ErrorSubject::Logs, verb, AnyError::new(&e)).into()
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError {
    io(ErrorVerb::Read, e)
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError {
    io(ErrorVerb::Write, e)
}

#[derive(Debug, thiserror::Error)]
#[error("log writer: {0}")]
struct WriterFailed(String);

/// Queued, not yet committed state, shared by the store, its readers and the writer.
#[derive(Debug, Default)]
struct Pending {
    entries: BTreeMap<u64, Entry>,
    /// Entries at and above this index in the database are truncated (queued).
    hide_from: Option<(u64, u64)>,
    truncations: u64,
}

enum Op {
    Append(Vec<Entry>, LogFlushed<TypeConfig>),
    Truncate {
        from: u64,
        seq: u64,
    },
    Purge(LogId),
    Meta {
        key: &'static str,
        bytes: Vec<u8>,
        durable: bool,
        done: Option<oneshot::Sender<Result<(), String>>>,
    },
}

/// The log store. Cheap to clone (the log reader is a clone).
#[derive(Clone)]
pub(crate) struct LogStore {
    db: Arc<Database>,
    pending: Arc<Mutex<Pending>>,
    ops: mpsc::Sender<Op>,
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore").finish_non_exhaustive()
    }
}

impl LogStore {
    pub(crate) fn new(db: Arc<Database>) -> Self {
        let pending = Arc::new(Mutex::new(Pending::default()));
        let (ops, rx) = mpsc::channel();
        let (wdb, wpending) = (db.clone(), pending.clone());
        std::thread::Builder::new()
            .name("datasync-raft-log".into())
            .spawn(move || writer(&wdb, &wpending, &rx))
            .expect("spawn the log writer thread");
        LogStore { db, pending, ops }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send(&self, op: Op) -> Result<(), StorageError> {
        self.ops
            .send(op)
            .map_err(|_| write_err(WriterFailed("the writer thread has stopped".into())))
    }

    /// Queues a metadata write and, if `durable`, waits until it is on disk.
    async fn put_meta<T: serde::Serialize>(
        &self,
        key: &'static str,
        v: &T,
        durable: bool,
    ) -> Result<(), StorageError> {
        let bytes = bincode::serialize(v).map_err(write_err)?;
        if !durable {
            return self.send(Op::Meta {
                key,
                bytes,
                durable,
                done: None,
            });
        }
        let (tx, rx) = oneshot::channel();
        self.send(Op::Meta {
            key,
            bytes,
            durable,
            done: Some(tx),
        })?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(write_err(WriterFailed(e))),
            Err(_) => Err(write_err(WriterFailed(
                "the writer thread has stopped".into(),
            ))),
        }
    }

    async fn meta<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        key: &'static str,
    ) -> Result<Option<T>, StorageError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let tx = db.begin_read().map_err(read_err)?;
            let t = tx.open_table(RAFT_META).map_err(read_err)?;
            match t.get(key).map_err(read_err)? {
                None => Ok(None),
                Some(v) => bincode::deserialize(v.value()).map(Some).map_err(read_err),
            }
        })
        .await
        .map_err(read_err)?
    }
}

/// The writer thread: one transaction and one fsync per drained batch.
fn writer(db: &Database, pending: &Mutex<Pending>, rx: &mpsc::Receiver<Op>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < 4096 {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let durable = batch
            .iter()
            .any(|op| !matches!(op, Op::Meta { durable: false, .. }));
        let result = commit(db, &batch, durable);
        let err = result.as_ref().err().map(ToString::to_string);
        if let Some(e) = &err {
            tracing::error!(error = %e, "log batch failed");
        }
        let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
        for op in batch {
            match op {
                Op::Append(entries, callback) => {
                    if err.is_none() {
                        for e in &entries {
                            if p.entries
                                .get(&e.log_id.index)
                                .is_some_and(|q| q.log_id == e.log_id)
                            {
                                p.entries.remove(&e.log_id.index);
                            }
                        }
                    }
                    callback.log_io_completed(match &err {
                        None => Ok(()),
                        Some(e) => Err(std::io::Error::other(e.clone())),
                    });
                }
                Op::Truncate { seq, .. } => {
                    if err.is_none() && p.hide_from.is_some_and(|(_, s)| s == seq) {
                        p.hide_from = None;
                    }
                }
                Op::Meta {
                    done: Some(done), ..
                } => {
                    let _ = done.send(err.clone().map_or(Ok(()), Err));
                }
                Op::Meta { done: None, .. } | Op::Purge(_) => {}
            }
        }
    }
}

fn commit(db: &Database, batch: &[Op], durable: bool) -> Result<(), redb::Error> {
    let mut tx = db.begin_write()?;
    tx.set_durability(if durable {
        Durability::Immediate
    } else {
        Durability::None
    })
    .map_err(|e| redb::Error::from(redb::StorageError::Io(std::io::Error::other(e.to_string()))))?;
    {
        let mut log = tx.open_table(LOG)?;
        let mut meta = tx.open_table(RAFT_META)?;
        for op in batch {
            match op {
                Op::Append(entries, _) => {
                    for e in entries {
                        let bytes = bincode::serialize(e).map_err(|e| {
                            redb::StorageError::Io(std::io::Error::other(e.to_string()))
                        })?;
                        log.insert(e.log_id.index, bytes.as_slice())?;
                    }
                }
                Op::Truncate { from, .. } => {
                    log.retain_in(*from.., |_, _| false)?;
                }
                Op::Purge(id) => {
                    let bytes = bincode::serialize(id).map_err(|e| {
                        redb::StorageError::Io(std::io::Error::other(e.to_string()))
                    })?;
                    meta.insert("purged", bytes.as_slice())?;
                    log.retain_in(..=id.index, |_, _| false)?;
                }
                Op::Meta { key, bytes, .. } => {
                    meta.insert(*key, bytes.as_slice())?;
                }
            }
        }
    }
    tx.commit()?;
    Ok(())
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => i + 1,
            Bound::Excluded(i) => *i,
            Bound::Unbounded => u64::MAX,
        };
        if start >= end {
            return Ok(Vec::new());
        }
        // Snapshot the queued state first: an entry leaves `pending` only after it is
        // committed, so reading the database afterwards cannot miss it.
        let (queued, hide_from) = {
            let p = self.pending();
            let queued: BTreeMap<u64, Entry> = p
                .entries
                .range(start..end)
                .map(|(i, e)| (*i, e.clone()))
                .collect();
            (queued, p.hide_from.map(|(i, _)| i))
        };
        let db = self.db.clone();
        let db_end = hide_from.map_or(end, |h| h.min(end));
        let mut out: BTreeMap<u64, Entry> = tokio::task::spawn_blocking(move || {
            let mut out = BTreeMap::new();
            if start >= db_end {
                return Ok(out);
            }
            let tx = db.begin_read().map_err(read_err)?;
            let t = tx.open_table(LOG).map_err(read_err)?;
            for item in t.range(start..db_end).map_err(read_err)? {
                let (i, v) = item.map_err(read_err)?;
                out.insert(
                    i.value(),
                    bincode::deserialize(v.value()).map_err(read_err)?,
                );
            }
            Ok::<_, StorageError>(out)
        })
        .await
        .map_err(read_err)??;
        out.extend(queued);
        Ok(out.into_values().collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let purged: Option<LogId> = self.meta("purged").await?;
        let queued_last = self
            .pending()
            .entries
            .last_key_value()
            .map(|(_, e)| e.log_id);
        let db = self.db.clone();
        let stored_last = tokio::task::spawn_blocking(move || {
            let tx = db.begin_read().map_err(read_err)?;
            let t = tx.open_table(LOG).map_err(read_err)?;
            match t.last().map_err(read_err)? {
                Some((_, v)) => Ok::<_, StorageError>(Some(
                    bincode::deserialize::<Entry>(v.value())
                        .map_err(read_err)?
                        .log_id,
                )),
                None => Ok(None),
            }
        })
        .await
        .map_err(read_err)??;
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: queued_last.or(stored_last).or(purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.put_meta("vote", vote, true).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.meta("vote").await
    }

    // `save_committed`/`read_committed` keep openraft's defaults (not stored): storing
    // the commit index costs a redb commit per write, and after a restart the leader
    // re-learns it by committing an entry of its new term.

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        {
            let mut p = self.pending();
            for e in &entries {
                p.entries.insert(e.log_id.index, e.clone());
            }
        }
        self.send(Op::Append(entries, callback))
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let seq = {
            let mut p = self.pending();
            p.entries.retain(|i, _| *i < log_id.index);
            p.truncations += 1;
            let from = p
                .hide_from
                .map_or(log_id.index, |(h, _)| h.min(log_id.index));
            p.hide_from = Some((from, p.truncations));
            p.truncations
        };
        self.send(Op::Truncate {
            from: log_id.index,
            seq,
        })
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.pending().entries.retain(|i, _| *i > log_id.index);
        self.send(Op::Purge(log_id))
    }
}

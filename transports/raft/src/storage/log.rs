//! openraft's log storage: entries in the segment files of [`super::wal`], the vote and
//! the purge point in redb. Blocking work runs on `spawn_blocking`.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    AnyError, ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader, StorageIOError, Vote,
};
use redb::{Database, ReadableDatabase};

use super::RAFT_META;
use super::wal::Wal;
use crate::types::{Entry, LogId, NodeId, StorageError, TypeConfig};

/// The log store. Cheap to clone (the log reader is a clone).
#[derive(Debug, Clone)]
pub(crate) struct LogStore {
    db: Arc<Database>,
    wal: Wal,
}

fn io(
    subject: ErrorSubject<NodeId>,
    verb: ErrorVerb,
    e: impl std::error::Error + 'static,
) -> StorageError {
    StorageIOError::new(subject, verb, AnyError::new(&e)).into()
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError {
    io(ErrorSubject::Logs, ErrorVerb::Read, e)
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError {
    io(ErrorSubject::Logs, ErrorVerb::Write, e)
}

impl LogStore {
    pub(crate) fn new(db: Arc<Database>, wal: Wal) -> Self {
        LogStore { db, wal }
    }

    /// Runs blocking redb work off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| io(ErrorSubject::Store, ErrorVerb::Write, e))?
    }

    async fn wal<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Wal) -> std::io::Result<T> + Send + 'static,
    ) -> Result<T, StorageError> {
        let wal = self.wal.clone();
        tokio::task::spawn_blocking(move || f(&wal))
            .await
            .map_err(|e| io(ErrorSubject::Store, ErrorVerb::Write, e))?
            .map_err(write_err)
    }

    fn meta<T: serde::de::DeserializeOwned>(
        db: &Database,
        key: &str,
    ) -> Result<Option<T>, StorageError> {
        let tx = db.begin_read().map_err(read_err)?;
        let t = tx.open_table(RAFT_META).map_err(read_err)?;
        match t.get(key).map_err(read_err)? {
            None => Ok(None),
            Some(v) => bincode::deserialize(v.value()).map(Some).map_err(read_err),
        }
    }

    fn put_meta<T: serde::Serialize>(db: &Database, key: &str, v: &T) -> Result<(), StorageError> {
        let bytes = bincode::serialize(v).map_err(write_err)?;
        let tx = db.begin_write().map_err(write_err)?;
        {
            let mut t = tx.open_table(RAFT_META).map_err(write_err)?;
            t.insert(key, bytes.as_slice()).map_err(write_err)?;
        }
        tx.commit().map_err(write_err)
    }
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
            Bound::Included(i) => Some(i + 1),
            Bound::Excluded(i) => Some(*i),
            Bound::Unbounded => None,
        };
        // Entries just appended are in memory: no thread hop for them.
        if let Some(entries) = self.wal.read_cached(start, end) {
            return Ok(entries);
        }
        self.wal(move |wal| wal.read(start, end)).await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let mem = self.wal.mem();
        Ok(LogState {
            last_purged_log_id: mem.purged,
            last_log_id: mem.last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        let vote = *vote;
        self.blocking(move |db| Self::put_meta(db, "vote", &vote))
            .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.blocking(|db| Self::meta(db, "vote")).await
    }

    // `save_committed`/`read_committed` keep openraft's defaults (not stored): storing
    // the commit index costs a redb commit per write, and after a restart the leader
    // re-learns it by committing an entry of its new term.

    /// One durable frame per call, written before returning (see [`Wal::append`]); the
    /// callback runs once the entries are on disk. (openraft 0.9 waits for each append
    /// to be flushed before the next, so group commit happens above it: see
    /// `RaftStore::propose`.)
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
        match self.wal.append(entries) {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::new(e.kind(), e.to_string())));
                Err(write_err(e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.wal(move |wal| wal.truncate(log_id.index)).await
    }

    /// The purge point is stored durably first (which also makes every state-machine
    /// commit so far durable, so the entries dropped are never needed for a replay),
    /// then whole segments at or below it are deleted.
    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.blocking(move |db| {
            let bytes = bincode::serialize(&log_id).map_err(write_err)?;
            let tx = db.begin_write().map_err(write_err)?;
            {
                let mut m = tx.open_table(RAFT_META).map_err(write_err)?;
                m.insert("purged", bytes.as_slice()).map_err(write_err)?;
            }
            tx.commit().map_err(write_err)
        })
        .await?;
        self.wal(move |wal| wal.purge(log_id)).await
    }
}

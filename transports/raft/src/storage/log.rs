//! openraft's log storage: entries in the segment files of [`super::wal`], the vote and
//! the purge point in redb. Blocking work runs off the async workers (`rt::blocking`).

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    AnyError, ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader, StorageIOError, Vote,
};
use redb::{Database, ReadableDatabase};

use super::tables::{RAFT_META, SM_META};
use super::wal::Wal;
use crate::types::{Entry, LogId, NodeId, StorageError, TypeConfig};

/// The log store. Cheap to clone (the log reader is a clone).
#[derive(Debug, Clone)]
pub(crate) struct LogStore {
    db: Arc<Database>,
    wal: Wal,
    /// This node's id in a cluster (see `read_vote`); `None` for a single node, whose
    /// commit index is its log's end once it replays.
    id: Option<NodeId>,
    /// The time of each log write (`etcd_disk_wal_fsync_duration_seconds`).
    fsync: prometheus_client::metrics::histogram::Histogram,
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

/// The state machine's committed applied log id.
pub(crate) fn applied(db: &Database) -> Result<Option<LogId>, StorageError> {
    let tx = db.begin_read().map_err(read_err)?;
    let t = tx.open_table(SM_META).map_err(read_err)?;
    match t.get("applied").map_err(read_err)? {
        Some(v) => Ok(Some(bincode::deserialize(v.value()).map_err(read_err)?)),
        None => Ok(None),
    }
}

impl LogStore {
    /// Waits until the state machine's committed applied index is at least `index`.
    async fn wait_applied(&self, index: u64) -> Result<(), StorageError> {
        let started = tokio::time::Instant::now();
        let mut warned = started;
        loop {
            let applied = self.blocking(applied).await?;
            if applied.is_some_and(|a| a.index >= index) {
                return Ok(());
            }
            if warned.elapsed() >= std::time::Duration::from_secs(10) {
                warned = tokio::time::Instant::now();
                tracing::warn!(
                    purge_to = index,
                    applied = ?applied.map(|a| a.index),
                    waited = ?started.elapsed(),
                    "a log purge waits for the state machine to reach it (a snapshot install?)"
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    }
}

impl LogStore {
    pub(crate) fn new(db: Arc<Database>, wal: Wal, id: Option<NodeId>) -> Self {
        let fsync = crate::metrics::Metrics::default().wal_fsync;
        LogStore { db, wal, id, fsync }
    }

    /// Log writes are timed into `metrics`.
    pub(crate) fn metered(mut self, metrics: &crate::metrics::Metrics) -> Self {
        self.fsync = metrics.wal_fsync.clone();
        self
    }

    /// Runs blocking redb work off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        let db = self.db.clone();
        crate::rt::blocking(move || f(&db))
            .await
            .map_err(|e| io(ErrorSubject::Store, ErrorVerb::Write, e))?
    }

    async fn wal<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Wal) -> std::io::Result<T> + Send + 'static,
    ) -> Result<T, StorageError> {
        super::disk::pause(self.wal.dir()).await;
        let wal = self.wal.clone();
        crate::rt::blocking(move || f(&wal))
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

    /// A vote this node won comes back as one it only cast: a leader that restarts
    /// stands for election again.
    ///
    /// Why: openraft 0.9 resumes leading at once, in its old term, when it reads back a
    /// committed vote for itself, with a commit index no further than its state
    /// machine's durable applied index (the commit index is not stored). That can be
    /// behind what it acknowledged before the crash (applies are durable about once a
    /// second), and its read index for linearizable reads with it: it served a stale
    /// read in the simulation (a leader whose disk failed, restarted within an election
    /// timeout). Elected anew, it commits an entry of its new term before serving, which
    /// brings its commit index past everything acknowledged. Still voting for itself in
    /// that term, it cannot vote twice in it.
    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        let id = self.id;
        let vote: Option<Vote<NodeId>> = self.blocking(|db| Self::meta(db, "vote")).await?;
        Ok(vote.map(|v| match v.leader_id() {
            l if v.is_committed() && id.is_some() && l.voted_for() == id => {
                Vote::new(l.term, l.node_id)
            }
            _ => v,
        }))
    }

    // `save_committed`/`read_committed` keep openraft's defaults (not stored): storing
    // the commit index costs a redb commit per write, and after a restart the leader
    // re-learns it by committing an entry of its new term (see `read_vote`).

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
        super::disk::pause(self.wal.dir()).await;
        let start = std::time::Instant::now();
        match self.wal.append(entries) {
            Ok(()) => {
                self.fsync.observe(crate::metrics::since(start));
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
    ///
    /// Why it first waits for the state machine to reach the purge point: openraft
    /// 0.9 asks for the purge right after handing a snapshot's install to the state
    /// machine's worker. Were the purge point durable before the install, a crash in
    /// between would leave a state machine behind a log that no longer has the entries
    /// to catch up from. Waiting orders the two: the install commits first, and this
    /// durable commit then covers it. Everywhere else the state machine is past the
    /// purge point already (a snapshot is built from applied state), so nothing waits.
    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.wait_applied(log_id.index).await?;
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

#[cfg(test)]
impl LogStore {
    pub(crate) fn wal_append(&self, entries: Vec<Entry>) -> std::io::Result<()> {
        self.wal.append(entries)
    }

    pub(crate) fn mem(&self) -> std::sync::MutexGuard<'_, super::wal::Mem> {
        self.wal.mem()
    }

    pub(crate) fn wal_read(&self, from: u64) -> std::io::Result<Vec<Entry>> {
        self.wal.read(from, None)
    }
}

#[cfg(test)]
mod tests {
    use openraft::CommittedLeaderId;

    use super::*;

    fn set_applied(db: &Database, index: u64) {
        let tx = db.begin_write().expect("write");
        {
            let mut t = tx.open_table(SM_META).expect("table");
            let id = LogId::new(CommittedLeaderId::new(1, 1), index);
            let bytes = bincode::serialize(&id).expect("encodes");
            t.insert("applied", bytes.as_slice()).expect("insert");
        }
        tx.commit().expect("commit");
    }

    /// A cluster member's own won vote reads back as one it only cast (so a restarted
    /// leader stands for election again instead of leading in its old term with a
    /// commit index behind what it acknowledged: a stale read in simulation seed
    /// 1796821148046384032 on commit 7e951e1); another leader's vote, and a single
    /// node's own, read back as stored.
    #[tokio::test(flavor = "current_thread")]
    async fn a_restarted_leader_stands_for_election_again() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (db, wal) = super::super::open(dir.path(), 64 << 10).expect("opens");
        let mut member = LogStore::new(db.clone(), wal.clone(), Some(3));
        let mut single = LogStore::new(db.clone(), wal, None);
        member
            .save_vote(&Vote::new_committed(2, 3))
            .await
            .expect("saves");
        assert_eq!(
            member.read_vote().await.expect("reads"),
            Some(Vote::new(2, 3))
        );
        assert_eq!(
            single.read_vote().await.expect("reads"),
            Some(Vote::new_committed(2, 3))
        );
        member
            .save_vote(&Vote::new_committed(4, 1))
            .await
            .expect("saves");
        assert_eq!(
            member.read_vote().await.expect("reads"),
            Some(Vote::new_committed(4, 1))
        );
        member.save_vote(&Vote::new(5, 3)).await.expect("saves");
        assert_eq!(
            member.read_vote().await.expect("reads"),
            Some(Vote::new(5, 3))
        );
    }

    /// A purge to a point the state machine has not reached (a snapshot install still
    /// on its way) waits for it, so the purge point never becomes durable first.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_purge_waits_for_the_state_machine_to_reach_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (db, wal) = super::super::open(dir.path(), 64 << 10).expect("opens");
        set_applied(&db, 5);
        let mut store = LogStore::new(db.clone(), wal, None);
        let upto = LogId::new(CommittedLeaderId::new(1, 1), 10);
        let purge = tokio::spawn(async move { store.purge(upto).await });
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(!purge.is_finished(), "the purge went ahead of the install");
        set_applied(&db, 10);
        tokio::time::timeout(std::time::Duration::from_secs(5), purge)
            .await
            .expect("the purge went on once the state machine got there")
            .expect("joins")
            .expect("purged");
    }
}

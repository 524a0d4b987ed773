//! The on-disk layout: the raft log in segment files under `log/` ([`wal`]); the vote,
//! the purge point and the state machine in one redb database. There is no separate
//! snapshot: the state machine's tables are it (see `sm::snapshot`), and the `snapshot`
//! table holds only a snapshot's metadata (only whether there is one is read).
//!
//! Durability: an acknowledged write is durable in the log. State-machine applies
//! commit with `Durability::None` (no second fsync per write), so after a crash the
//! state machine is back at its last durable commit and openraft re-applies the log
//! from there. Last-applied is written in the same transaction as the data it covers,
//! by the state machine's writer thread, behind the apply path. Durable redb commits
//! happen once a second on that thread (bounding the replay), at snapshots (after the
//! writer has caught up and after the snapshot's view began, so a snapshot never runs
//! ahead of what a restart recovers), votes and purges; the purge point is stored
//! durably before any segment is deleted, so the entries a replay needs are never gone.
//!
//! redb checksums its pages; at open the whole file is verified
//! ([`redb::Database::check_integrity`]), and the log's frames are checksummed and
//! checked for continuity, so a corrupted file stops the node with an error naming it
//! instead of serving wrong data.

// openraft's storage traits dictate `StorageError` (224 bytes); the helpers here return it
// unboxed because every trait method would have to unbox it again.
#![allow(clippy::result_large_err)]

mod backend;
mod crash;
#[cfg(test)]
mod crash_tests;
pub(crate) mod disk;
pub(crate) mod lease;
pub(crate) mod log;
pub(crate) mod session;
pub(crate) mod sm;
pub(crate) mod tables;
pub(crate) mod wal;

use tables::{CLIENTS, EXPIRY, HISTORY, KV, LEASE_OBJS, RAFT_META, SM_META, SNAPSHOT};
pub(crate) use wal::SEGMENT;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableDatabase};

use crate::types::LogId;

/// redb's page cache. Reads past it come from the OS page cache, which the process
/// does not hold. Measured with 100k keys: peak RSS 108 MiB with redb's default, 89 MiB
/// with 16 MiB, 70 MiB with 4 MiB; a 100k-key list went from ~31 to ~91 ms (etcd:
/// ~480 ms), puts unchanged.
const CACHE: usize = 4 << 20;

/// The database file inside a data directory.
pub(crate) fn db_path(dir: &Path) -> PathBuf {
    dir.join("datasync.redb")
}

/// Opening the data directory failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The directory could not be created or read.
    #[error("cannot use data directory {path}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The database file is corrupted or truncated; the node refuses to start.
    #[error("data file {path} is corrupted: {reason}")]
    Corrupted {
        /// The file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(&'static str),
    /// A task reading the data files panicked.
    #[error("opening the data files did not finish")]
    Task(#[source] tokio::task::JoinError),
    /// The state machine's records (membership, leases, sessions) could not be read.
    #[error("cannot read the state machine")]
    State(#[source] Box<crate::types::StorageError>),
    /// The mark of a clean close could not be read or removed.
    #[error("cannot read or clear the clean-close mark")]
    CleanMark(#[source] redb::Error),
    /// The cluster's timing is one raft refuses (see [`crate::ClusterConfig::timing`]).
    #[error("invalid raft timing")]
    Timing(#[source] Box<openraft::ConfigError>),
    /// Raft stopped while the store opened (a storage failure, or a panic in raft).
    #[error("raft stopped while the store opened")]
    Fatal(#[source] Box<openraft::error::Fatal<crate::types::NodeId>>),
    /// A new group could not be bootstrapped.
    #[error("cannot bootstrap a new group")]
    Bootstrap(
        #[source]
        Box<
            openraft::error::RaftError<
                crate::types::NodeId,
                openraft::error::InitializeError<crate::types::NodeId, openraft::BasicNode>,
            >,
        >,
    ),
    /// This node joined, but had not applied its join within the join timeout.
    #[error("joined at log index {index} but did not catch up in time")]
    CatchUp {
        /// The log index of the join.
        index: u64,
        /// The cause.
        #[source]
        source: openraft::metrics::WaitError,
    },
    /// Re-applying the log after a crash did not finish in time.
    #[error("re-applying the log did not finish within {0:?}")]
    Replay(std::time::Duration),
    /// No leader was elected in time.
    #[error("no leader elected within 10 s")]
    NoLeader,
    /// The cluster address could not be bound.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Joining the cluster failed.
    #[error("cannot join the cluster")]
    Join(#[source] crate::ClusterError),
    /// Another process holds the store (its database is locked): reach it through that
    /// process with [`RemoteStore::connect_local`](crate::RemoteStore::connect_local).
    #[error("the store in {} is held by another process", dir.display())]
    InUse {
        /// The data directory.
        dir: PathBuf,
    },
    /// The database could not be opened (I/O error, …).
    #[error("cannot open data file {path}")]
    Database {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: redb::DatabaseError,
    },
}

/// Opens (or creates) the database and the log in `dir`, verifying every checksum.
pub(crate) fn open(dir: &Path, segment: u64) -> Result<(Arc<Database>, wal::Wal), OpenError> {
    std::fs::create_dir_all(dir).map_err(|source| OpenError::Dir {
        path: dir.to_owned(),
        source,
    })?;
    let path = db_path(dir);
    let corrupted = |reason: String| OpenError::Corrupted {
        path: path.clone(),
        reason,
    };
    // redb would quietly start afresh over a missing or emptied file: the marker says
    // this directory once held a store, so its absence of data is an error, not a start.
    let marker = dir.join("STORE");
    let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    if marker.exists() && len == 0 {
        return Err(corrupted(
            "the data file is missing or empty, but this directory held a store".into(),
        ));
    }
    let backend = backend::Backend::open(&path).map_err(|source| OpenError::Dir {
        path: dir.to_owned(),
        source,
    })?;
    let mut db = match redb::Builder::new()
        .set_cache_size(CACHE)
        .create_with_backend(backend)
    {
        Ok(db) => db,
        Err(
            e @ (redb::DatabaseError::Storage(redb::StorageError::Corrupted(_))
            | redb::DatabaseError::Storage(redb::StorageError::Io(_))),
        ) => {
            return Err(corrupted(e.to_string()));
        }
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
            return Err(OpenError::InUse {
                dir: dir.to_owned(),
            });
        }
        Err(source) => return Err(OpenError::Database { path, source }),
    };
    match db.check_integrity() {
        Ok(true) => {}
        Ok(false) => return Err(corrupted("integrity check repaired damage".into())),
        Err(e) => return Err(corrupted(e.to_string())),
    }
    // Create the tables, so readers never meet a missing table.
    let init = || -> Result<(), redb::Error> {
        let tx = db.begin_write()?;
        tx.open_table(RAFT_META)?;
        tx.open_table(KV)?;
        tx.open_table(SM_META)?;
        tx.open_table(EXPIRY)?;
        tx.open_table(SNAPSHOT)?;
        tx.open_table(CLIENTS)?;
        tx.open_table(LEASE_OBJS)?;
        tx.open_table(HISTORY)?;
        tx.commit()?;
        Ok(())
    };
    init().map_err(|e| corrupted(e.to_string()))?;
    if !marker.exists() {
        std::fs::write(&marker, b"datasync raft store\n").map_err(|source| OpenError::Dir {
            path: dir.to_owned(),
            source,
        })?;
    }
    // Every stored value must decode; a file with valid pages but wrong contents stops here.
    sm::verify(&db).map_err(|e| corrupted(e.to_string()))?;
    fn meta<T: serde::de::DeserializeOwned>(
        db: &Database,
        table: redb::TableDefinition<'_, &str, &[u8]>,
        key: &str,
    ) -> Result<Option<T>, String> {
        let tx = db.begin_read().map_err(|e| e.to_string())?;
        let t = tx.open_table(table).map_err(|e| e.to_string())?;
        let v = t.get(key).map_err(|e| e.to_string())?;
        v.map(|v| bincode::deserialize(v.value()).map_err(|e| e.to_string()))
            .transpose()
    }
    let purged: Option<LogId> = meta(&db, RAFT_META, "purged").map_err(corrupted)?;
    let applied: Option<LogId> = meta(&db, SM_META, "applied").map_err(corrupted)?;
    // The last log id of a snapshot installed from a leader (not one built here), as
    // the install stores it: an `Option` (decoding it as a bare id misread it, so a
    // crash between an install and its purge left a store that refused to open).
    let installed: Option<LogId> = meta::<Option<LogId>>(&db, SM_META, "installed")
        .map_err(corrupted)?
        .flatten();
    let db = Arc::new(db);
    let log_dir = dir.join("log");
    let log = wal::Wal::open(&log_dir, purged, segment).map_err(|d| OpenError::Corrupted {
        path: d.path,
        reason: d.reason,
    })?;
    let last = log.mem().last;
    // A log that ends before the applied state is damage (acknowledged entries may be
    // lost with it), unless that state is a snapshot installed from a leader just
    // before a crash that came before its log purge: openraft purges the log up to it
    // at start (see `log::LogStore::purge` for the order). A snapshot built here never
    // runs ahead of its own log.
    let behind = |a: &LogId| last.is_none_or(|l| a.index > l.index);
    if let Some(applied) = applied.filter(|a| behind(a) && installed.as_ref() != Some(a)) {
        let ends = last.map_or("the log is empty".into(), |l| {
            format!("the log ends at index {}", l.index)
        });
        return Err(OpenError::Corrupted {
            path: log_dir,
            reason: format!(
                "{ends} but the state machine applied {}: log segments are missing or cut short",
                applied.index
            ),
        });
    }
    Ok((db, log))
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload, SnapshotMeta};

    use super::*;
    use crate::types::{Command, Entry};

    fn log_id(i: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(1, 1), i)
    }

    /// A store whose log holds entries 0..10 and whose state machine says it applied
    /// index 20, from a snapshot installed at `installed` (`None`: none installed; a
    /// snapshot built here at 20 all the same).
    fn crashed_after_install(installed: Option<u64>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        let (db, wal) = open(dir.path(), 64 << 10).expect("opens");
        for i in 0..10 {
            wal.append(vec![Entry {
                log_id: log_id(i),
                payload: EntryPayload::Normal(Command::Delete {
                    key: "k".into(),
                    prefix: false,
                }),
            }])
            .expect("appends");
        }
        let tx = db.begin_write().expect("write");
        {
            let mut m = tx.open_table(SM_META).expect("table");
            let applied = bincode::serialize(&log_id(20)).expect("encodes");
            m.insert("applied", applied.as_slice()).expect("insert");
            if let Some(i) = installed {
                // As `sm::snapshot::install` stores it.
                let bytes = bincode::serialize(&Some(log_id(i))).expect("encodes");
                m.insert("installed", bytes.as_slice()).expect("insert");
            }
            let meta = SnapshotMeta::<u64, openraft::BasicNode> {
                last_log_id: Some(log_id(20)),
                last_membership: Default::default(),
                snapshot_id: "s".into(),
            };
            let mut t = tx.open_table(SNAPSHOT).expect("table");
            let bytes = bincode::serialize(&meta).expect("encodes");
            t.insert("meta", bytes.as_slice()).expect("insert");
        }
        tx.commit().expect("commit");
        dir
    }

    /// A crash between a snapshot's install and the log purge that follows it leaves a
    /// log ending before the applied state: open accepts it (openraft purges the log up
    /// to the snapshot at start). A log ending before an applied state that is not an
    /// installed snapshot (a snapshot built here, or one installed earlier) is still
    /// refused as damage.
    #[test]
    fn a_log_behind_an_installed_snapshot_opens() {
        let dir = crashed_after_install(Some(20));
        assert!(open(dir.path(), 64 << 10).is_ok());
        for snapshot in [None, Some(15)] {
            let dir = crashed_after_install(snapshot);
            let err = open(dir.path(), 64 << 10).expect_err("refused");
            assert!(
                err.to_string().contains("corrupt") || format!("{err:?}").contains("missing"),
                "{err:?}"
            );
        }
    }
}

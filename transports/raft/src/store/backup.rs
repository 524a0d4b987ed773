//! [`RaftStore::backup`] and [`RaftStore::restore`] (the file format is in
//! [`crate::backup`]).

use std::time::Duration;

use datasync::{ReadOptions, StoreError};

use super::RaftStore;
use crate::RaftConfig;
use crate::backup::{BackupError, BackupInfo};
use crate::storage::sm;

/// How long a restored store may take to lead, and to build its snapshot.
const WITHIN: Duration = Duration::from_secs(30);

fn unfinished(e: crate::rt::Unfinished) -> StoreError {
    StoreError::Backend(Box::new(e))
}

fn storage(e: crate::types::StorageError) -> StoreError {
    StoreError::Backend(Box::new(e))
}

impl RaftStore {
    /// A backup of the applied state at one revision: the file's bytes (see
    /// [`crate::backup`]). After a linearizable read barrier, so it holds at least
    /// every write committed when the call began; writes go on meanwhile.
    ///
    /// # Cancel safety
    /// Cancel safe (nothing is written).
    pub async fn backup(&self) -> Result<Vec<u8>, StoreError> {
        self.read_barrier(&ReadOptions::new()).await?;
        let shared = self.inner.sm.clone();
        let (revision, keys, payload) =
            crate::rt::blocking(move || sm::backup_payload(&shared).map_err(storage))
                .await
                .map_err(unfinished)??;
        Ok(crate::backup::encode(revision, keys, &payload))
    }

    /// Makes a new store in `config.dir` holding a backup's state, then closes it: a
    /// single node, or (with [`RaftConfig::cluster`] and no `join`) the first member of
    /// a new group, which others then join. It has the backup's keys, leases and
    /// revision (so the same [`data_hash`](Self::data_hash)), no client sessions, and
    /// its own membership. The directory must be new or empty.
    ///
    /// The restored state is put in a snapshot and the log behind it purged, so that a
    /// member joining later gets it from the snapshot. All of that happens in a
    /// directory beside `config.dir`, renamed into place once done: a restore that
    /// fails or is interrupted leaves no store there (an interrupted one leaves
    /// `.NAME.restoring-PID` beside it).
    pub async fn restore(backup: &[u8], config: RaftConfig) -> Result<BackupInfo, BackupError> {
        let (info, payload) = crate::backup::decode(backup)?;
        if config.cluster.as_ref().is_some_and(|c| !c.join.is_empty()) {
            return Err(BackupError::Join);
        }
        let mut config = config;
        if let Some(c) = config.cluster.as_mut()
            && !(c.advertise.is_none() && c.listen.ip().is_unspecified())
        {
            // Unreachable while it restores: a node joining now would replicate a log
            // that does not hold the restored state, and a client's write would be
            // replaced by it. Its membership names the address it will serve on.
            c.advertise.get_or_insert_with(|| c.listen.to_string());
            c.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        }
        let dir = config.dir.clone();
        if std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_some()) {
            return Err(BackupError::NotEmpty(dir));
        }
        let name = dir.file_name().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} names no directory to make", dir.display()),
            )
        })?;
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => std::path::PathBuf::from("."),
        };
        let work = parent.join(format!(
            ".{}.restoring-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        if work.exists() {
            std::fs::remove_dir_all(&work)?;
        }
        config.dir = work.clone();
        let made = async {
            let store = RaftStore::open(config.local_endpoint(false)).await?;
            let restored = store.load(payload.to_vec()).await;
            store.shutdown().await;
            drop(store);
            restored?;
            if dir.exists() {
                std::fs::remove_dir(&dir)?;
            }
            std::fs::rename(&work, &dir)?;
            std::fs::File::open(&parent)?.sync_all()?;
            Ok::<_, BackupError>(())
        }
        .await;
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(&work);
            return Err(e);
        }
        Ok(info)
    }

    async fn load(&self, payload: Vec<u8>) -> Result<(), StoreError> {
        let raft = &self.inner.raft;
        let me = self.inner.config.node_id;
        let mut m = raft.metrics();
        until(&mut m, |m| m.current_leader == Some(me)).await?;
        let shared = self.inner.sm.clone();
        crate::rt::blocking(move || sm::restore_payload(&shared, &payload).map_err(storage))
            .await
            .map_err(unfinished)??;
        let applied = raft.metrics().borrow().last_applied;
        raft.trigger()
            .snapshot()
            .await
            .map_err(|_| StoreError::Stopped)?;
        let snapshot = until(&mut m, |m| m.snapshot.is_some() && m.snapshot >= applied).await?;
        if let Some(at) = snapshot {
            raft.trigger()
                .purge_log(at.index)
                .await
                .map_err(|_| StoreError::Stopped)?;
            until(&mut m, |m| m.purged.is_some_and(|p| p.index >= at.index)).await?;
        }
        Ok(())
    }
}

type Metrics = openraft::RaftMetrics<crate::types::NodeId, openraft::BasicNode>;

/// Waits up to [`WITHIN`] until raft's metrics satisfy `ok`; returns the snapshot
/// they then name.
async fn until(
    m: &mut tokio::sync::watch::Receiver<Metrics>,
    ok: impl FnMut(&Metrics) -> bool,
) -> Result<Option<crate::types::LogId>, StoreError> {
    let seen = tokio::time::timeout(WITHIN, m.wait_for(ok))
        .await
        .map_err(|_| StoreError::Timeout(WITHIN))?
        .map_err(|_| StoreError::Stopped)?;
    Ok(seen.snapshot)
}

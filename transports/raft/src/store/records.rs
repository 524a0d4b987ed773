//! Reads of whole records and transactions (etcd's model; see [`crate::records`]).

use datasync::{ReadOptions, Revision, StoreError};

use crate::storage::sm::RecordWatch;

use super::RaftStore;
use crate::records::{CompareTarget, KeyRange, Record, Txn, TxnOp, TxnOutcome};
use crate::types::{Command, Outcome};

impl RaftStore {
    /// The records in `range` with their create and mod revisions and versions, at the
    /// current revision or at `opts`' revision, in key order, and the revision read.
    ///
    /// # Cancel safety
    /// A read: dropping it changes nothing.
    pub async fn range(
        &self,
        range: &KeyRange,
        opts: ReadOptions,
    ) -> Result<(Revision, Vec<Record>), StoreError> {
        self.read_barrier(&opts).await?;
        let sm = self.inner.sm.clone();
        let range = range.clone();
        crate::rt::blocking(move || sm.range(&range, opts.revision))
            .await
            .map_err(|e| StoreError::Backend(Box::new(e)))?
    }

    /// Watches the records in `range`: every revision that changes one, with the
    /// records after and before. From now, or from revision `from` on when the history
    /// ([`RaftConfig::history`](crate::RaftConfig::history) revisions, in memory) still
    /// holds it, else `Compacted`. A watch that falls behind its queue replays from the
    /// history; one the history cannot carry across (too far behind, or this member
    /// installed a snapshot) ends with `Compacted`.
    pub async fn watch_records(
        &self,
        range: KeyRange,
        from: Option<Revision>,
    ) -> Result<RecordWatch, StoreError> {
        if self.inner.stop.is_cancelled() {
            return Err(StoreError::Stopped);
        }
        if let Some(node) = &self.inner.node {
            node.check_member()?;
        }
        self.caught_up().await?;
        self.inner.sm.watch_records(range, from)
    }

    /// How many record watches the store feeds.
    pub fn record_watches(&self) -> usize {
        self.inner.sm.lock().records.active()
    }

    /// Applies `txn` at one revision: its compares on the state it is applied to, then
    /// the writes of the branch they chose. Exactly once, as every client write.
    ///
    /// A branch's values and the compares' values together are within the store's
    /// value limit (one log entry carries them all).
    ///
    /// # Cancel safety
    /// Dropping the future does not withdraw a transaction already proposed.
    pub async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        let limits = datasync::Writer::limits(self);
        let compared: usize = txn
            .compares
            .iter()
            .map(|c| match &c.target {
                CompareTarget::Value(v) => v.len(),
                _ => 0,
            })
            .sum();
        for branch in [&txn.success, &txn.failure] {
            let mut total = compared;
            for op in branch {
                if let TxnOp::Put { value, .. } = op {
                    total = total.saturating_add(value.len());
                }
            }
            if total > limits.max_value_size {
                return Err(StoreError::ValueTooLarge {
                    size: total,
                    max: limits.max_value_size,
                });
            }
        }
        match self.write(Command::Txn(Box::new(txn)), None).await? {
            Outcome::Txn(out) => Ok(out),
            other => Err(StoreError::Corrupted(format!("txn applied as {other:?}"))),
        }
    }
}

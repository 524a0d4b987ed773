//! Reads of whole records and transactions (etcd's model; see [`crate::records`]).

use datasync::{Prefix, ReadOptions, Revision, StoreError};

use crate::storage::sm::RecordWatch;
use crate::types::LeaseOutcome;

use super::RaftStore;
use crate::records::{
    Compare, CompareOp, CompareTarget, KeyRange, RangeEnd, Record, Txn, TxnOp, TxnOutcome,
};
use crate::types::{Command, Outcome, RequestId};

impl RaftStore {
    /// A `datasync` transaction ([`datasync::Writer::txn`]), with a remote client's
    /// request id: checked with [`datasync::Txn::validate`] here, on the member, then
    /// applied in the log's form.
    pub(crate) async fn txn_as(
        &self,
        txn: datasync::Txn,
        id: Option<RequestId>,
    ) -> Result<datasync::TxnOutcome, StoreError> {
        txn.validate(&datasync::Writer::limits(self))?;
        let out = self.record_txn_as(log_txn(txn), id).await?;
        Ok(datasync::TxnOutcome {
            succeeded: out.succeeded,
            revision: Revision(out.revision),
        })
    }

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

    /// The oldest revision this member can still read at: revisions before it are
    /// compacted (by [`compact`](Self::compact), by the history's length, or because
    /// the history starts where this member installed a snapshot). A watch can start
    /// from it after a compaction; else from the revision after it.
    pub fn compacted_revision(&self) -> Revision {
        Revision(self.inner.sm.oldest_readable())
    }

    /// The oldest revision a watch can start from here (the history holds each
    /// revision's change from it on).
    pub(crate) fn oldest_watchable(&self) -> u64 {
        self.inner.sm.oldest_watchable()
    }

    /// Compacts the history up to `revision` on every member (etcd's compaction): reads
    /// at and watches from revisions before it then fail with `Compacted`. Refused with
    /// `Compacted` when this member's history starts after `revision` already, and with
    /// `FutureRevision` past the current revision. Returns once this member has
    /// applied it.
    ///
    /// # Cancel safety
    /// Dropped before it returns, the compaction may or may not happen.
    pub async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        // This member's view as of now, not as of its last apply.
        self.read_barrier(&ReadOptions::new()).await?;
        let current = self.revision();
        if revision > current {
            return Err(StoreError::FutureRevision {
                requested: revision,
                current,
            });
        }
        // Where a watch could still start: compacting below it would leave a floor
        // that reads allow but watches do not.
        let oldest = Revision(self.inner.sm.oldest_watchable().min(current.0));
        if revision < oldest {
            return Err(StoreError::Compacted {
                requested: revision,
                compacted: oldest,
            });
        }
        self.propose(Command::Compact {
            revision: revision.0,
        })
        .await
        .map(|_| ())
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

    /// Grants lease object `id` (1 ..= [`MAX_LEASE_ID`](crate::records::MAX_LEASE_ID))
    /// of `ttl` (rounded up to milliseconds, at most
    /// [`MAX_LEASE_TTL`](crate::records::MAX_LEASE_TTL)): it ends,
    /// deleting the keys put on it, unless kept alive within `ttl`. `false` if `id`
    /// exists already (nothing changed).
    ///
    /// Like TTLs, a lease is counted on each member's monotonic clock from its apply of
    /// the grant or the last keep-alive, and only the leader ends it; a member that
    /// restarts gives it its whole TTL again (etcd's rule after a leader change).
    ///
    /// # Cancel safety
    /// Dropping the future does not withdraw a grant already proposed.
    pub async fn lease_grant(&self, id: u64, ttl: std::time::Duration) -> Result<bool, StoreError> {
        if ttl.is_zero() || ttl > crate::records::MAX_LEASE_TTL {
            return Err(StoreError::InvalidTtl(ttl));
        }
        let ttl_ms = u64::try_from(ttl.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
        match self.write(Command::LeaseGrant { id, ttl_ms }, None).await? {
            Outcome::Lease(LeaseOutcome::Alive { .. }) => Ok(true),
            Outcome::Lease(LeaseOutcome::Exists) => Ok(false),
            other => Err(StoreError::Corrupted(format!(
                "lease grant applied as {other:?}"
            ))),
        }
    }

    /// Gives lease `id` its whole TTL again; its TTL, or `None` if it does not exist.
    /// Unlike etcd's, a keep-alive is a replicated write (one log entry), so every
    /// member counts from it.
    ///
    /// # Cancel safety
    /// Dropping the future does not withdraw a keep-alive already proposed.
    pub async fn lease_keep_alive(
        &self,
        id: u64,
    ) -> Result<Option<std::time::Duration>, StoreError> {
        match self.write(Command::LeaseKeepAlive { id }, None).await? {
            Outcome::Lease(LeaseOutcome::Alive { ttl_ms }) => {
                Ok(Some(std::time::Duration::from_millis(ttl_ms)))
            }
            Outcome::Lease(LeaseOutcome::NotFound(_)) => Ok(None),
            other => Err(StoreError::Corrupted(format!(
                "keep-alive applied as {other:?}"
            ))),
        }
    }

    /// Ends lease `id` now, deleting its keys at one revision: how many and the
    /// revision, or `None` if it does not exist.
    ///
    /// # Cancel safety
    /// Dropping the future does not withdraw a revoke already proposed.
    pub async fn lease_revoke(&self, id: u64) -> Result<Option<(u64, Revision)>, StoreError> {
        match self.write(Command::LeaseRevoke { id }, None).await? {
            Outcome::Lease(LeaseOutcome::Revoked { count, revision }) => {
                Ok(Some((count, Revision(revision))))
            }
            Outcome::Lease(LeaseOutcome::NotFound(_)) => Ok(None),
            other => Err(StoreError::Corrupted(format!(
                "revoke applied as {other:?}"
            ))),
        }
    }

    /// Lease `id` as this member counts it: its TTL, the time it has left and its keys;
    /// `None` if it does not exist (here: a follower may lag the leader).
    pub fn lease_time_to_live(
        &self,
        id: u64,
    ) -> Option<(std::time::Duration, std::time::Duration, Vec<datasync::Key>)> {
        let (ttl_ms, left, keys) = self.inner.sm.lease_info(id)?;
        Some((std::time::Duration::from_millis(ttl_ms), left, keys))
    }

    /// Every lease object's id, as this member has them.
    pub fn leases(&self) -> Vec<u64> {
        self.inner.sm.lease_ids()
    }

    /// How many record watches the store feeds.
    pub fn record_watches(&self) -> usize {
        self.inner.sm.lock().records.active()
    }

    /// Applies `txn` at one revision: its compares on the state it is applied to, then
    /// the writes of the branch they chose. Exactly once, as every client write.
    ///
    /// Its keys and values together (both branches' and the compares') are within the
    /// store's value limit and one key (one log entry carries them all, and must reach
    /// a follower as a value does).
    ///
    /// # Cancel safety
    /// Dropping the future does not withdraw a transaction already proposed.
    pub async fn record_txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        self.record_txn_as(txn, None).await
    }

    /// [`record_txn`](Self::record_txn) with a remote client's request id.
    pub(crate) async fn record_txn_as(
        &self,
        txn: Txn,
        id: Option<RequestId>,
    ) -> Result<TxnOutcome, StoreError> {
        let limits = datasync::Writer::limits(self);
        let range = |r: &KeyRange| {
            r.start.len()
                + match &r.end {
                    RangeEnd::Before(e) => e.len(),
                    RangeEnd::Single | RangeEnd::Unbounded => 0,
                }
        };
        let compared = txn.compares.iter().map(|c| {
            range(&c.range)
                + match &c.target {
                    CompareTarget::Value(v) => v.len(),
                    _ => 0,
                }
        });
        let written = txn.ops().map(|op| match op {
            TxnOp::Put { key, value, .. } => key.len() + value.len(),
            TxnOp::Delete { range: r, .. } => range(r),
        });
        let total = compared.chain(written).fold(0usize, usize::saturating_add);
        let max = limits.max_value_size.saturating_add(datasync::MAX_KEY_LEN);
        if total > max {
            return Err(StoreError::ValueTooLarge { size: total, max });
        }
        match self.write(Command::Txn(Box::new(txn)), id).await? {
            Outcome::Txn(out) => Ok(out),
            Outcome::Lease(LeaseOutcome::NotFound(_)) => Err(StoreError::Unsupported(
                "requested lease not found (a put named a lease that does not exist)",
            )),
            other => Err(StoreError::Corrupted(format!("txn applied as {other:?}"))),
        }
    }
}

/// The `datasync` API's transaction (checked with [`datasync::Txn::validate`]
/// first): `Absent` is version 0; `Revision(r)` is mod revision r, but `Revision(0)`
/// a version below 0, which holds for no key (an absent key's mod revision is 0), so
/// that each condition is one compare, as etcd's limit of 128 counts them.
fn log_txn(t: datasync::Txn) -> Txn {
    let compares = t
        .when
        .iter()
        .map(|(key, expect)| {
            let (op, target) = match expect {
                datasync::Expect::Absent => (CompareOp::Equal, CompareTarget::Version(0)),
                datasync::Expect::Revision(Revision(0)) => {
                    (CompareOp::Less, CompareTarget::Version(0))
                }
                datasync::Expect::Revision(r) => {
                    (CompareOp::Equal, CompareTarget::ModRevision(r.0))
                }
            };
            Compare {
                range: KeyRange::key(key),
                op,
                target,
            }
        })
        .collect();
    let ops = |branch: Vec<datasync::TxnOp>| -> Vec<TxnOp> {
        branch
            .into_iter()
            .map(|op| match op {
                datasync::TxnOp::Put { key, value, opts } => TxnOp::Put {
                    key: key.as_str().to_owned(),
                    value: value.as_bytes().to_vec(),
                    expires_at_ms: super::expiry(opts.ttl),
                    prev_kv: false,
                },
                datasync::TxnOp::Delete { key, opts } => TxnOp::Delete {
                    range: if opts.prefix {
                        KeyRange::prefix(&Prefix::from(key))
                    } else {
                        KeyRange::key(&key)
                    },
                    prev_kv: false,
                },
            })
            .collect()
    };
    Txn {
        compares,
        success: ops(t.then),
        failure: ops(t.otherwise),
    }
}

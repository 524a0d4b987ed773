//! Writing and reading: the [`Writer`] trait and its options.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

mod txn;

pub use txn::{MAX_TXN_OPS, Txn, TxnOp, TxnOutcome};

use crate::value::{Codec, EncodeError};
use crate::{Key, KeyValue, Prefix, Revision, StoreError, Value};

/// Longest TTL a put accepts: ten years (365-day years). Longer TTLs are refused with
/// [`StoreError::InvalidTtl`] rather than clamped, so a caller never gets a lease other
/// than the one it asked for.
///
/// Why a limit at all: each backend keeps deadlines in its own units (an `Instant`, etcd's
/// lease seconds, a NATS TTL header, the raft store's milliseconds), and unbounded
/// durations overflow some of them. Ten years fits all of them with room to spare.
pub const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

/// Options of a put.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PutOptions {
    /// Delete the key this long after the put (a Delete change with the previous value is
    /// emitted). A put without TTL removes any earlier TTL of the key. Backends with coarser
    /// TTLs round up, never down to zero; a zero TTL, or one longer than [`MAX_TTL`], is
    /// refused.
    pub ttl: Option<Duration>,
}

impl PutOptions {
    /// No TTL.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the TTL.
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Checks the options.
    pub fn validate(&self) -> Result<(), StoreError> {
        match self.ttl {
            Some(t) if t.is_zero() || t > MAX_TTL => Err(StoreError::InvalidTtl(t)),
            _ => Ok(()),
        }
    }
}

/// Options of a delete.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeleteOptions {
    /// Delete every key that starts with the given key, in one transaction where the
    /// store has transactions.
    pub prefix: bool,
}

impl DeleteOptions {
    /// Delete one key.
    pub fn new() -> Self {
        Self::default()
    }

    /// Delete a whole prefix.
    #[must_use]
    pub fn prefix(mut self) -> Self {
        self.prefix = true;
        self
    }
}

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Consistency {
    /// Reflects every write acknowledged before the read started.
    #[default]
    Linearizable,
    /// Whatever the nearest replica has (may lag).
    Local,
}

/// Options of a get or list.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReadOptions {
    /// Read the state at this revision instead of the latest.
    pub revision: Option<Revision>,
    /// Freshness of the read.
    pub consistency: Consistency,
}

impl ReadOptions {
    /// Latest, linearizable.
    pub fn new() -> Self {
        Self::default()
    }

    /// Read at `revision`.
    #[must_use]
    pub fn at(mut self, revision: Revision) -> Self {
        self.revision = Some(revision);
        self
    }

    /// Sets the consistency.
    #[must_use]
    pub fn consistency(mut self, c: Consistency) -> Self {
        self.consistency = c;
        self
    }
}

/// The condition of a compare-and-swap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The key must not exist (create-if-absent).
    Absent,
    /// The key must exist and have been last modified at this revision.
    Revision(Revision),
}

impl Expect {
    /// Whether it holds for a key whose current state is `current` (`None`: absent).
    pub fn holds(self, current: Option<&KeyValue>) -> bool {
        match (self, current) {
            (Expect::Absent, None) => true,
            (Expect::Revision(r), Some(kv)) => kv.revision == r,
            _ => false,
        }
    }
}

/// What a compare-and-swap did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum CasOutcome {
    /// The condition held; the value was written at this revision.
    Swapped(Revision),
    /// The condition failed; the key's current state.
    Conflict(Option<KeyValue>),
}

/// What a delete did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deleted {
    /// How many keys were deleted.
    pub count: u64,
    /// The revision of the (last) delete, or the store's revision if nothing was deleted.
    pub revision: Revision,
}

/// A prefix's values at one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// The revision read at.
    pub revision: Revision,
    /// Values sorted by key.
    pub values: Vec<KeyValue>,
}

/// Size limits of a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Largest value accepted, in bytes.
    pub max_value_size: usize,
}

impl Limits {
    /// Limits with this largest value size.
    pub fn new(max_value_size: usize) -> Self {
        Limits { max_value_size }
    }

    /// Checks a value against the limits.
    pub fn check(&self, value: &Value) -> Result<(), StoreError> {
        if value.len() > self.max_value_size {
            return Err(StoreError::ValueTooLarge {
                size: value.len(),
                max: self.max_value_size,
            });
        }
        Ok(())
    }

    /// Checks what a put or compare-and-swap is given: the value against the limits,
    /// then the options ([`PutOptions::validate`]).
    pub fn check_put(&self, value: &Value, opts: &PutOptions) -> Result<(), StoreError> {
        self.check(value)?;
        opts.validate()
    }
}

/// Writes and reads a store: the request/response side, where [`crate::Watcher`] is
/// the stream side.
///
/// Why it is called `Writer` although it reads: a plugin reads what it watches from its
/// stream, and comes here to write. The reads here (get and list at a revision, the
/// current value a compare-and-swap returns) serve writes: a read-modify-write needs
/// both on one store and one revision space. The name keeps the split a reader guesses:
/// `Watcher` streams, `Writer` asks.
///
/// # To ensure correctness
/// Acknowledge a write only once it is committed (durable where the store is durable);
/// return the revision it was committed at. A prefix delete returns how many keys it
/// removed. Check values and options with [`Limits::check_put`] before doing anything.
#[async_trait::async_trait]
pub trait Writer: Send + Sync + fmt::Debug {
    /// The store's size limits.
    fn limits(&self) -> Limits;

    /// Creates or replaces `key`.
    ///
    /// # Cancel safety
    /// Not cancel safe: dropped after the request left, the write may or may not
    /// happen, as when it fails with `Unavailable` or `Timeout`; read to find out.
    async fn put(&self, key: &Key, value: Value, opts: PutOptions) -> Result<Revision, StoreError>;

    /// Deletes `key`, or every key under it with [`DeleteOptions::prefix`].
    ///
    /// # Cancel safety
    /// Not cancel safe: dropped after the request left, the write may or may not
    /// happen, as when it fails with `Unavailable` or `Timeout`; read to find out.
    async fn delete(&self, key: &Key, opts: DeleteOptions) -> Result<Deleted, StoreError>;

    /// Reads one key.
    ///
    /// # Cancel safety
    /// Cancel safe: dropping it changes nothing.
    async fn get(&self, key: &Key, opts: ReadOptions) -> Result<Option<KeyValue>, StoreError>;

    /// Reads every key under `prefix`, at one revision.
    ///
    /// # Cancel safety
    /// Cancel safe: dropping it changes nothing.
    async fn list(&self, prefix: &Prefix, opts: ReadOptions) -> Result<Listing, StoreError>;

    /// Writes `value` only if `expect` holds for `key`, atomically.
    ///
    /// # Cancel safety
    /// Not cancel safe: dropped after the request left, the write may or may not
    /// happen, as when it fails with `Unavailable` or `Timeout`; read to find out.
    async fn compare_and_swap(
        &self,
        key: &Key,
        expect: Expect,
        value: Value,
        opts: PutOptions,
    ) -> Result<CasOutcome, StoreError>;

    /// Applies `txn` atomically: its conditions and the writes of the branch they
    /// choose, at one revision, which watchers see as one change (contract rule 3).
    /// Checked first with [`Txn::validate`](crate::Txn::validate).
    ///
    /// A transport that cannot write several keys atomically answers
    /// [`StoreError::Unsupported`] (this default): NATS JetStream KV, and a composite
    /// whose transaction spans its parts.
    ///
    /// # Cancel safety
    /// Not cancel safe: dropped after the request left, the transaction may or may not
    /// be applied, as when it fails with `Unavailable` or `Timeout`; read to find out.
    async fn txn(&self, txn: crate::Txn) -> Result<crate::TxnOutcome, StoreError> {
        let _ = txn;
        Err(StoreError::Unsupported(
            "transactions over several keys: this store cannot write them atomically",
        ))
    }
}

#[async_trait::async_trait]
impl<W: Writer + ?Sized> Writer for Arc<W> {
    fn limits(&self) -> Limits {
        (**self).limits()
    }
    async fn put(&self, key: &Key, value: Value, opts: PutOptions) -> Result<Revision, StoreError> {
        (**self).put(key, value, opts).await
    }
    async fn delete(&self, key: &Key, opts: DeleteOptions) -> Result<Deleted, StoreError> {
        (**self).delete(key, opts).await
    }
    async fn get(&self, key: &Key, opts: ReadOptions) -> Result<Option<KeyValue>, StoreError> {
        (**self).get(key, opts).await
    }
    async fn list(&self, prefix: &Prefix, opts: ReadOptions) -> Result<Listing, StoreError> {
        (**self).list(prefix, opts).await
    }
    async fn compare_and_swap(
        &self,
        key: &Key,
        expect: Expect,
        value: Value,
        opts: PutOptions,
    ) -> Result<CasOutcome, StoreError> {
        (**self).compare_and_swap(key, expect, value, opts).await
    }
    async fn txn(&self, txn: crate::Txn) -> Result<crate::TxnOutcome, StoreError> {
        (**self).txn(txn).await
    }
}

/// A typed put failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TypedPutError {
    /// The item did not encode.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The store refused the put.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How many times [`WriterExt::update`] tries before it reports
/// [`StoreError::Contended`].
pub const UPDATE_ATTEMPTS: u32 = 64;

/// What [`WriterExt::update`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Updated {
    /// The new value was written at this revision.
    Written(Revision),
    /// The function left the key as it was; the key's state it saw.
    Unchanged(Option<KeyValue>),
}

/// Typed puts through a [`Codec`] (e.g. [`crate::Proto`], [`crate::Json`]), and
/// read-modify-write.
#[async_trait::async_trait]
pub trait WriterExt: Writer {
    /// Read-modify-write of one key, in the style of CASPaxos: reads the key
    /// (linearizable), gives `f` its current value (`None`: absent), and writes what `f`
    /// returns with a compare-and-swap on the revision it read; `f` returning `None`
    /// writes nothing. On a conflict `f` runs again on the value the conflict reports,
    /// up to [`UPDATE_ATTEMPTS`] times in all, then [`StoreError::Contended`]
    /// (retryable). So `f` must be a pure function of its input: it may run more than
    /// once, and only its last result is written.
    ///
    /// A transport without compare-and-swap answers `Unsupported`.
    ///
    /// # Cancel safety
    /// Not cancel safe: dropped after its compare-and-swap was sent, the write may or
    /// may not have happened (as for any write).
    async fn update<F>(&self, key: &Key, mut f: F, opts: PutOptions) -> Result<Updated, StoreError>
    where
        F: FnMut(Option<&Value>) -> Option<Value> + Send,
    {
        let mut current = self.get(key, ReadOptions::new()).await?;
        for _ in 0..UPDATE_ATTEMPTS {
            let Some(value) = f(current.as_ref().map(|kv| &kv.value)) else {
                return Ok(Updated::Unchanged(current));
            };
            let expect = match &current {
                None => Expect::Absent,
                Some(kv) => Expect::Revision(kv.revision),
            };
            match self
                .compare_and_swap(key, expect, value, opts.clone())
                .await?
            {
                CasOutcome::Swapped(rev) => return Ok(Updated::Written(rev)),
                CasOutcome::Conflict(now) => current = now,
            }
        }
        Err(StoreError::Contended(UPDATE_ATTEMPTS))
    }

    /// Encodes `item` with `C` and puts it.
    async fn put_as<C: Codec>(
        &self,
        key: &Key,
        item: &C::Item,
        opts: PutOptions,
    ) -> Result<Revision, TypedPutError>
    where
        C::Item: Sync,
    {
        let value = C::encode(item)?;
        Ok(self.put(key, value, opts).await?)
    }
}

impl<W: Writer + ?Sized> WriterExt for W {}

/// A store: both [`crate::Watcher`] and [`Writer`].
pub trait Store: crate::Watcher + Writer {}

impl<S: crate::Watcher + Writer + ?Sized> Store for S {}

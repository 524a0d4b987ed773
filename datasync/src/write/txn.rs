//! Multi-key transactions: [`Txn`], written with [`Writer::txn`](crate::Writer::txn).
//!
//! Why these shapes and no more: a condition is what compare-and-swap already checks
//! ([`Expect`]: absent, or last modified at a revision), which every transport that has
//! transactions can compare atomically; writes are the two a plugin already makes. The
//! outcome carries no reads: the revision it returns is exact, so a caller that wants to
//! know why a condition failed reads at it.
//!
//! Why a branch may not write one key twice, nor put a key one of its deletes covers:
//! which write wins is not obvious, and etcd refuses the same ("duplicate key given in
//! txn request"); refusing it everywhere keeps every transport's answer the same.

use super::{DeleteOptions, Expect, Limits, PutOptions};
use crate::{Key, Prefix, Revision, StoreError, Value};

/// The most conditions, and the most writes in a branch, of one transaction (etcd's
/// default `--max-txn-ops`).
pub const MAX_TXN_OPS: usize = 128;

/// A write of a transaction.
///
/// Exhaustive on purpose: a write added here must be implemented by every transport
/// that applies transactions, and matching on it is how they are told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOp {
    /// Create or replace a key (with a TTL if the options say so).
    Put {
        /// The key.
        key: Key,
        /// The value.
        value: Value,
        /// Its options.
        opts: PutOptions,
    },
    /// Delete a key, or every key under it with [`DeleteOptions::prefix`].
    Delete {
        /// The key, or the prefix.
        key: Key,
        /// Its options.
        opts: DeleteOptions,
    },
}

impl TxnOp {
    /// The key it writes (or the prefix it deletes).
    pub fn key(&self) -> &Key {
        match self {
            TxnOp::Put { key, .. } | TxnOp::Delete { key, .. } => key,
        }
    }

    /// Whether it may write `key`.
    fn covers(&self, key: &Key) -> bool {
        match self {
            TxnOp::Put { key: k, .. } => k == key,
            TxnOp::Delete { key: k, opts } if opts.prefix => {
                Prefix::from(k.clone()).matches(key.as_str())
            }
            TxnOp::Delete { key: k, .. } => k == key,
        }
    }
}

/// A transaction: if every condition holds, the writes of `then` are applied, else
/// those of `otherwise`; either way all at one revision, seen by watchers as one
/// [`Change`](crate::Change) (contract rule 3).
///
/// ```
/// # use datasync::{Expect, Key, PutOptions, DeleteOptions, Txn};
/// # fn f(a: Key, b: Key, seen: datasync::Revision) -> Txn {
/// // Move `a`'s value to `b`, if `a` is as it was read and `b` does not exist yet.
/// Txn::new()
///     .when(&a, Expect::Revision(seen))
///     .when(&b, Expect::Absent)
///     .put(&b, "value", PutOptions::new())
///     .delete(&a, DeleteOptions::new())
/// # }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[must_use]
pub struct Txn {
    /// The conditions, all of which must hold.
    pub when: Vec<(Key, Expect)>,
    /// Applied when they hold.
    pub then: Vec<TxnOp>,
    /// Applied when one does not.
    pub otherwise: Vec<TxnOp>,
}

impl Txn {
    /// No conditions, no writes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a condition on `key`.
    pub fn when(mut self, key: &Key, expect: Expect) -> Self {
        self.when.push((key.clone(), expect));
        self
    }

    /// Puts `key` when the conditions hold.
    pub fn put(mut self, key: &Key, value: impl Into<Value>, opts: PutOptions) -> Self {
        self.then.push(TxnOp::Put {
            key: key.clone(),
            value: value.into(),
            opts,
        });
        self
    }

    /// Deletes `key` (or a prefix) when the conditions hold.
    pub fn delete(mut self, key: &Key, opts: DeleteOptions) -> Self {
        self.then.push(TxnOp::Delete {
            key: key.clone(),
            opts,
        });
        self
    }

    /// Puts `key` when a condition does not hold.
    pub fn or_put(mut self, key: &Key, value: impl Into<Value>, opts: PutOptions) -> Self {
        self.otherwise.push(TxnOp::Put {
            key: key.clone(),
            value: value.into(),
            opts,
        });
        self
    }

    /// Deletes `key` (or a prefix) when a condition does not hold.
    pub fn or_delete(mut self, key: &Key, opts: DeleteOptions) -> Self {
        self.otherwise.push(TxnOp::Delete {
            key: key.clone(),
            opts,
        });
        self
    }

    /// Every key it names: the conditions', then both branches' (a delete's prefix as
    /// its key).
    pub fn keys(&self) -> impl Iterator<Item = &Key> {
        self.when
            .iter()
            .map(|(k, _)| k)
            .chain(self.then.iter().chain(&self.otherwise).map(TxnOp::key))
    }

    /// Checks what every transport checks before it does anything: at most
    /// [`MAX_TXN_OPS`] conditions and writes per branch, each put's value and options
    /// ([`Limits::check_put`]), and no branch that writes a key twice or puts a key one
    /// of its deletes covers ([`StoreError::InvalidTxn`]), and its keys and values
    /// together within the value limit and one key ([`StoreError::ValueTooLarge`]: one
    /// raft log entry, one etcd request carries them all).
    pub fn validate(&self, limits: &Limits) -> Result<(), StoreError> {
        if self.when.len() > MAX_TXN_OPS
            || self.then.len() > MAX_TXN_OPS
            || self.otherwise.len() > MAX_TXN_OPS
        {
            return Err(StoreError::InvalidTxn(format!(
                "{} conditions and {} and {} writes: at most {MAX_TXN_OPS} of each",
                self.when.len(),
                self.then.len(),
                self.otherwise.len()
            )));
        }
        let size = self
            .keys()
            .map(|k| k.as_str().len())
            .chain(self.then.iter().chain(&self.otherwise).map(|op| match op {
                TxnOp::Put { value, .. } => value.len(),
                TxnOp::Delete { .. } => 0,
            }))
            .fold(0usize, usize::saturating_add);
        let max = limits.max_value_size.saturating_add(crate::MAX_KEY_LEN);
        if size > max {
            return Err(StoreError::ValueTooLarge { size, max });
        }
        for branch in [&self.then, &self.otherwise] {
            for (i, op) in branch.iter().enumerate() {
                let TxnOp::Put { key, value, opts } = op else {
                    continue;
                };
                limits.check_put(value, opts)?;
                if let Some(other) = branch
                    .iter()
                    .enumerate()
                    .find(|(j, o)| *j != i && o.covers(key))
                {
                    return Err(StoreError::InvalidTxn(format!(
                        "key {key:?} is put and also {} in one branch",
                        match other.1 {
                            TxnOp::Put { .. } => "put",
                            TxnOp::Delete { .. } => "deleted",
                        }
                    )));
                }
            }
        }
        Ok(())
    }
}

/// What a transaction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct TxnOutcome {
    /// Whether every condition held (`then` was applied, else `otherwise`).
    pub succeeded: bool,
    /// The revision its writes were committed at; when the branch applied changed
    /// nothing (no writes, or deletes of absent keys), the store's revision the
    /// conditions were decided at: read at it to see why they failed.
    pub revision: Revision,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(s: &str) -> Key {
        Key::new(s).unwrap()
    }

    #[test]
    fn a_branch_that_writes_a_key_twice_is_refused() {
        let limits = Limits::new(1024);
        let ok = Txn::new()
            .put(&k("a"), "1", PutOptions::new())
            .delete(&k("b"), DeleteOptions::new().prefix())
            .or_put(&k("a"), "2", PutOptions::new())
            .delete(&k("ab"), DeleteOptions::new());
        assert!(ok.validate(&limits).is_ok(), "distinct keys per branch");
        let refused = [
            Txn::new()
                .put(&k("a"), "1", PutOptions::new())
                .put(&k("a"), "2", PutOptions::new()),
            Txn::new()
                .put(&k("a/x"), "1", PutOptions::new())
                .delete(&k("a/"), DeleteOptions::new().prefix()),
            Txn::new().or_delete(&k("a"), DeleteOptions::new()).or_put(
                &k("a"),
                "1",
                PutOptions::new(),
            ),
        ];
        for t in refused {
            assert!(
                matches!(t.validate(&limits), Err(StoreError::InvalidTxn(_))),
                "{t:?}"
            );
        }
        // Two deletes may overlap: nothing is ambiguous about deleting twice.
        let deletes = Txn::new()
            .delete(&k("a/"), DeleteOptions::new().prefix())
            .delete(&k("a/x"), DeleteOptions::new());
        assert!(deletes.validate(&limits).is_ok());
    }

    #[test]
    fn sizes_and_options_are_checked() {
        let limits = Limits::new(4);
        let big = Txn::new().or_put(&k("a"), "12345", PutOptions::new());
        assert!(matches!(
            big.validate(&limits),
            Err(StoreError::ValueTooLarge { size: 5, max: 4 })
        ));
        let zero = Txn::new().put(
            &k("a"),
            "1",
            PutOptions::new().ttl(std::time::Duration::ZERO),
        );
        assert!(matches!(
            zero.validate(&limits),
            Err(StoreError::InvalidTtl(_))
        ));
        // Each value within the limit, all of them (and their keys) together not.
        let limits = Limits::new(100_000);
        let v = || "x".repeat(40_000);
        let together = Txn::new()
            .put(&k("a"), v(), PutOptions::new())
            .put(&k("b"), v(), PutOptions::new())
            .or_put(&k("c"), v(), PutOptions::new());
        assert!(matches!(
            together.validate(&limits),
            Err(StoreError::ValueTooLarge {
                size: 120_003,
                max: 104_096
            })
        ));
        let mut many = Txn::new();
        for i in 0..=MAX_TXN_OPS {
            many = many.when(&k(&format!("k{i}")), Expect::Absent);
        }
        assert!(matches!(
            many.validate(&limits),
            Err(StoreError::InvalidTxn(_))
        ));
    }
}

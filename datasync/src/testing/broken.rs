//! Deliberately broken transports, each repeating a known cn-infra mistake, and the
//! proof that the suite fails each one on the rule it breaks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;

use super::{Harness, run_all};
use crate::local::Local;
use crate::{
    CasOutcome, Change, DeleteOptions, Deleted, Done, DoneError, Event, Expect, Key, KeyChange,
    KeyValue, Limits, Listing, Op, Prefix, PutOptions, ReadOptions, Revision, StoreError, Txn,
    TxnOp, TxnOutcome, Value, Watch, WatchOptions, Watcher, Writer,
};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Bug {
    /// Starts the change stream at the resync revision R instead of R+1.
    StartsAtR,
    /// Keeps one previous-value cache for all registrations.
    SharedPrev,
    /// Treats a dropped `Done` as success.
    SilentDone,
    /// Loses every 7th change instead of resyncing.
    Lossy,
    /// Lists a prefix as a byte range whose end drops non-ASCII bytes (the raft store's
    /// old `Prefix::range_end`), so `list("p/é")` returns `p/ê` too.
    AsciiRange,
    /// Turns a TTL longer than a day into an immediate expiry (a deadline that
    /// overflowed), and accepts any TTL.
    HugeTtl,
    /// Resumes one revision late (an off-by-one between "the revision held" and "the
    /// first revision wanted").
    ResumesLate,
    /// Applies a transaction's writes one by one, each at its own revision (a
    /// "transaction" built on single-key writes).
    TxnInPieces,
}

/// The old, too-wide range end: the prefix up to its last ASCII byte below 0x7f, plus one.
fn ascii_range_end(prefix: &str) -> Option<String> {
    let mut bytes = prefix.as_bytes().to_vec();
    while let Some(last) = bytes.pop() {
        if last < 0x7f {
            bytes.push(last + 1);
            return String::from_utf8(bytes).ok();
        }
    }
    None
}

#[derive(Debug, Clone)]
struct Broken {
    inner: Local,
    bug: Bug,
    shared_prev: Arc<Mutex<HashMap<Key, Value>>>,
}

#[async_trait::async_trait]
impl Writer for Broken {
    fn limits(&self) -> Limits {
        self.inner.limits()
    }
    async fn put(&self, key: &Key, value: Value, opts: PutOptions) -> Result<Revision, StoreError> {
        match opts.ttl {
            Some(t) if self.bug == Bug::HugeTtl && t > std::time::Duration::from_secs(86_400) => {
                let opts = PutOptions::new().ttl(std::time::Duration::from_millis(1));
                self.inner.put(key, value, opts).await
            }
            _ => self.inner.put(key, value, opts).await,
        }
    }
    async fn delete(&self, key: &Key, opts: DeleteOptions) -> Result<Deleted, StoreError> {
        self.inner.delete(key, opts).await
    }
    async fn get(&self, key: &Key, opts: ReadOptions) -> Result<Option<KeyValue>, StoreError> {
        self.inner.get(key, opts).await
    }
    async fn list(&self, prefix: &Prefix, opts: ReadOptions) -> Result<Listing, StoreError> {
        if self.bug != Bug::AsciiRange {
            return self.inner.list(prefix, opts).await;
        }
        let mut all = self.inner.list(&Prefix::all(), opts).await?;
        let end = ascii_range_end(prefix.as_str());
        all.values.retain(|kv| {
            let k = kv.key.as_str();
            k >= prefix.as_str() && end.as_deref().is_none_or(|e| k < e)
        });
        Ok(all)
    }
    async fn compare_and_swap(
        &self,
        key: &Key,
        expect: Expect,
        value: Value,
        opts: PutOptions,
    ) -> Result<CasOutcome, StoreError> {
        self.inner.compare_and_swap(key, expect, value, opts).await
    }
    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        if self.bug != Bug::TxnInPieces {
            return self.inner.txn(txn).await;
        }
        txn.validate(&self.limits())?;
        let mut succeeded = true;
        for (k, expect) in &txn.when {
            let current = self.inner.get(k, ReadOptions::new()).await?;
            succeeded &= expect.holds(current.as_ref());
        }
        let branch = if succeeded { txn.then } else { txn.otherwise };
        let mut revision = self
            .inner
            .list(&Prefix::all(), ReadOptions::new())
            .await?
            .revision;
        for op in branch {
            revision = match op {
                TxnOp::Put { key, value, opts } => self.inner.put(&key, value, opts).await?,
                TxnOp::Delete { key, opts } => self.inner.delete(&key, opts).await?.revision,
            };
        }
        Ok(TxnOutcome {
            succeeded,
            revision,
        })
    }
}

impl Broken {
    /// The changes of revision `r` under `prefixes`, rebuilt from reads at r-1 and r.
    async fn replay(&self, prefixes: &[Prefix], r: Revision) -> Vec<KeyChange> {
        let mut out = Vec::new();
        if r == Revision::ZERO {
            return out;
        }
        for p in prefixes {
            let before = self
                .inner
                .list(p, ReadOptions::new().at(Revision(r.0 - 1)))
                .await;
            let after = self.inner.list(p, ReadOptions::new().at(r)).await;
            let (Ok(before), Ok(after)) = (before, after) else {
                continue;
            };
            let old: HashMap<_, _> = before
                .values
                .into_iter()
                .map(|kv| (kv.key, kv.value))
                .collect();
            for kv in after.values.into_iter().filter(|kv| kv.revision == r) {
                out.push(KeyChange {
                    prev: old.get(&kv.key).cloned(),
                    key: kv.key,
                    op: Op::Put,
                    value: Some(kv.value),
                });
            }
        }
        out
    }
}

#[async_trait::async_trait]
impl Watcher for Broken {
    async fn watch(
        &self,
        name: &str,
        prefixes: &[Prefix],
        opts: WatchOptions,
    ) -> Result<Watch, StoreError> {
        let mut opts = opts;
        if self.bug == Bug::ResumesLate {
            opts.resume = opts.resume.map(Revision::next);
        }
        let mut inner = self.inner.watch(name, prefixes, opts).await?;
        let reg = inner.registration().clone();
        match self.bug {
            Bug::StartsAtR => {
                let first = inner.next().await;
                let mut replayed = Vec::new();
                if let Some(Ok(Event::Resync(rs))) = &first {
                    let changes = self.replay(prefixes, rs.revision).await;
                    if !changes.is_empty() {
                        let done = reg.done(rs.revision);
                        replayed.push(Ok(Event::Change(Change::new(
                            rs.source.clone(),
                            rs.revision,
                            changes,
                            done,
                        ))));
                    }
                }
                let head = futures_util::stream::iter(first.into_iter().chain(replayed));
                Ok(Watch::new(reg, head.chain(inner)))
            }
            Bug::SharedPrev => {
                let cache = self.shared_prev.clone();
                Ok(Watch::new(
                    reg,
                    inner.map(move |item| {
                        let mut cache = cache.lock().unwrap();
                        item.map(|ev| match ev {
                            Event::Resync(rs) => {
                                for kv in rs.values() {
                                    cache.insert(kv.key.clone(), kv.value.clone());
                                }
                                Event::Resync(rs)
                            }
                            Event::Change(mut c) => {
                                for kc in &mut c.changes {
                                    kc.prev = cache.get(&kc.key).cloned();
                                    match &kc.value {
                                        Some(v) => cache.insert(kc.key.clone(), v.clone()),
                                        None => cache.remove(&kc.key),
                                    };
                                }
                                Event::Change(c)
                            }
                        })
                    }),
                ))
            }
            Bug::SilentDone => Ok(Watch::new(
                reg,
                inner.map(|item| {
                    item.map(|ev| {
                        let (mine, waiter) = Done::channel();
                        let swap = |d: &mut Done| std::mem::replace(d, mine);
                        let (ev, real) = match ev {
                            Event::Resync(mut r) => {
                                let real = swap(&mut r.done);
                                (Event::Resync(r), real)
                            }
                            Event::Change(mut c) => {
                                let real = swap(&mut c.done);
                                (Event::Change(c), real)
                            }
                        };
                        tokio::spawn(async move {
                            match waiter.await {
                                Err(DoneError::Dropped) => real.ok(),
                                other => real.complete(other),
                            }
                        });
                        ev
                    })
                }),
            )),
            Bug::AsciiRange | Bug::HugeTtl | Bug::ResumesLate | Bug::TxnInPieces => Ok(inner),
            Bug::Lossy => {
                let mut n = 0u32;
                Ok(Watch::new(
                    reg,
                    inner.filter_map(move |item| {
                        let keep = match &item {
                            Ok(Event::Change(_)) => {
                                n += 1;
                                n % 7 != 0
                            }
                            _ => true,
                        };
                        let out = if keep {
                            Some(item)
                        } else {
                            if let Ok(ev) = item {
                                ev.into_done().ok();
                            }
                            None
                        };
                        std::future::ready(out)
                    }),
                ))
            }
        }
    }
}

struct BrokenHarness(Bug);

#[async_trait::async_trait]
impl Harness for BrokenHarness {
    type Store = Broken;
    async fn store(&self) -> Broken {
        Broken {
            inner: Local::new(),
            bug: self.0,
            shared_prev: Default::default(),
        }
    }
    async fn active_watches(&self, store: &Broken) -> usize {
        store.inner.active_watches()
    }
}

/// Runs the whole suite against `bug` and returns the names of the failing tests.
async fn failing(bug: Bug) -> Vec<&'static str> {
    run_all(&BrokenHarness(bug))
        .await
        .into_iter()
        .filter(|(_, outcome)| outcome.is_err())
        .map(|(name, _)| name)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_catches_a_watch_started_at_r() {
    let failed = failing(Bug::StartsAtR).await;
    assert!(
        failed.contains(&"rule2_handoff_starts_after_the_resync_revision"),
        "{failed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_catches_shared_previous_values() {
    let failed = failing(Bug::SharedPrev).await;
    assert!(
        failed.contains(&"rule4_prev_values_per_registration"),
        "{failed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_catches_a_silently_dropped_done() {
    let failed = failing(Bug::SilentDone).await;
    assert_eq!(failed, ["rule6_done_answers_and_drops_are_reported"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_catches_a_stream_with_holes() {
    let failed = failing(Bug::Lossy).await;
    assert!(
        failed.contains(&"rule1_resync_first_then_ordered_changes"),
        "{failed:?}"
    );
    assert!(
        failed.contains(&"rule7_slow_consumer_is_isolated_and_resynced"),
        "{failed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_catches_a_prefix_range_that_drops_non_ascii_bytes() {
    let failed = failing(Bug::AsciiRange).await;
    assert_eq!(failed, ["keys_unicode_prefixes_match_a_model"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_catches_huge_ttls_that_expire_at_once() {
    let failed = failing(Bug::HugeTtl).await;
    assert_eq!(failed, ["rule8_huge_ttls_are_refused_or_kept"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_catches_a_resume_one_revision_late() {
    let failed = failing(Bug::ResumesLate).await;
    assert_eq!(failed, ["rule11_resume_after_a_revision"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_catches_a_transaction_in_pieces() {
    let failed = failing(Bug::TxnInPieces).await;
    assert_eq!(failed, ["rule12_transactions"]);
}

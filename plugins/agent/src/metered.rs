//! The store's requests as the agent's plugins make them: how long each takes and how
//! it ends, by operation, the same for every kind of store (`datasync_store_request_*`).
//! Measured around the `Writer` the plugins get, so it is what a plugin waits for:
//! client library, network, server and retries inside the transport.

use std::sync::Arc;
use std::time::Instant;

use datasync::{
    CasOutcome, DeleteOptions, Deleted, Expect, Key, KeyValue, Limits, Listing, Prefix, PutOptions,
    ReadOptions, Revision, StoreError, Txn, TxnOutcome, Value, Writer,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Op {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    op: &'static str,
    result: &'static str,
}

/// The request families, shared by the writer and the registry.
#[derive(Debug, Clone)]
pub(crate) struct RequestMetrics {
    duration: Family<Op, Histogram>,
    total: Family<Outcome, Counter>,
}

impl RequestMetrics {
    pub(crate) fn new() -> Self {
        RequestMetrics {
            // 100 µs to about 13 s.
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0001, 2.0, 18))
            }),
            total: Family::default(),
        }
    }

    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "datasync_store_request_duration_seconds",
            "Time of the plugins' store requests, by operation, whatever their outcome.",
            self.duration.clone(),
        );
        registry.register(
            "datasync_store_requests",
            "The plugins' store requests, by operation and result (ok, cancelled or the \
             error's kind).",
            self.total.clone(),
        );
    }

    /// Starts measuring a request of `op`: recorded when the guard is done with, or as
    /// `cancelled` if the caller drops the request first.
    fn start(&self, op: &'static str) -> Guard<'_> {
        Guard {
            metrics: self,
            op,
            started: Instant::now(),
            result: None,
        }
    }
}

/// One request being measured.
struct Guard<'a> {
    metrics: &'a RequestMetrics,
    op: &'static str,
    started: Instant,
    result: Option<&'static str>,
}

impl Guard<'_> {
    fn done<T>(mut self, r: Result<T, StoreError>) -> Result<T, StoreError> {
        self.result = Some(match &r {
            Ok(_) => "ok",
            Err(e) => kind(e),
        });
        r
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        let (m, op) = (self.metrics, self.op);
        m.duration
            .get_or_create(&Op { op })
            .observe(self.started.elapsed().as_secs_f64());
        let result = self.result.unwrap_or("cancelled");
        m.total.get_or_create(&Outcome { op, result }).inc();
    }
}

/// A short, stable name of an error's kind, for a label.
fn kind(e: &StoreError) -> &'static str {
    match e {
        StoreError::Unavailable(_) => "unavailable",
        StoreError::Timeout(_) => "timeout",
        StoreError::Unauthenticated(_) => "unauthenticated",
        StoreError::PermissionDenied(_) => "permission_denied",
        StoreError::Stopped => "stopped",
        StoreError::Contended(_) => "contended",
        StoreError::Compacted { .. } => "compacted",
        StoreError::FutureRevision { .. } => "future_revision",
        StoreError::Backend(_) => "backend",
        StoreError::InvalidKey(_) => "invalid_key",
        StoreError::ValueTooLarge { .. } => "value_too_large",
        StoreError::InvalidTtl(_) => "invalid_ttl",
        StoreError::InvalidTxn(_) => "invalid_txn",
        StoreError::Unsupported(_) => "unsupported",
        StoreError::Corrupted(_) => "corrupted",
        StoreError::Composite(_) => "composite",
        _ => "other",
    }
}

/// A writer that measures each request of the one it wraps.
#[derive(Debug)]
pub(crate) struct Metered {
    inner: Arc<dyn Writer>,
    metrics: RequestMetrics,
}

impl Metered {
    pub(crate) fn wrap(inner: Arc<dyn Writer>, metrics: RequestMetrics) -> Arc<dyn Writer> {
        Arc::new(Metered { inner, metrics })
    }
}

#[async_trait::async_trait]
impl Writer for Metered {
    fn limits(&self) -> Limits {
        self.inner.limits()
    }

    async fn put(&self, key: &Key, value: Value, opts: PutOptions) -> Result<Revision, StoreError> {
        let g = self.metrics.start("put");
        g.done(self.inner.put(key, value, opts).await)
    }

    async fn delete(&self, key: &Key, opts: DeleteOptions) -> Result<Deleted, StoreError> {
        let g = self.metrics.start("delete");
        g.done(self.inner.delete(key, opts).await)
    }

    async fn get(&self, key: &Key, opts: ReadOptions) -> Result<Option<KeyValue>, StoreError> {
        let g = self.metrics.start("get");
        g.done(self.inner.get(key, opts).await)
    }

    async fn list(&self, prefix: &Prefix, opts: ReadOptions) -> Result<Listing, StoreError> {
        let g = self.metrics.start("list");
        g.done(self.inner.list(prefix, opts).await)
    }

    async fn compare_and_swap(
        &self,
        key: &Key,
        expect: Expect,
        value: Value,
        opts: PutOptions,
    ) -> Result<CasOutcome, StoreError> {
        let g = self.metrics.start("compare_and_swap");
        g.done(self.inner.compare_and_swap(key, expect, value, opts).await)
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        let g = self.metrics.start("txn");
        g.done(self.inner.txn(txn).await)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
mod tests {
    use super::*;

    /// A store whose requests never end.
    #[derive(Debug)]
    struct Stuck;

    #[async_trait::async_trait]
    impl Writer for Stuck {
        fn limits(&self) -> Limits {
            Limits::new(1024)
        }
        async fn put(&self, _: &Key, _: Value, _: PutOptions) -> Result<Revision, StoreError> {
            std::future::pending().await
        }
        async fn delete(&self, _: &Key, _: DeleteOptions) -> Result<Deleted, StoreError> {
            std::future::pending().await
        }
        async fn get(&self, _: &Key, _: ReadOptions) -> Result<Option<KeyValue>, StoreError> {
            Err(StoreError::Stopped)
        }
        async fn list(&self, _: &Prefix, _: ReadOptions) -> Result<Listing, StoreError> {
            std::future::pending().await
        }
        async fn compare_and_swap(
            &self,
            _: &Key,
            _: Expect,
            _: Value,
            _: PutOptions,
        ) -> Result<CasOutcome, StoreError> {
            std::future::pending().await
        }
    }

    #[tokio::test]
    async fn a_dropped_request_counts_as_cancelled_and_an_error_by_its_kind() {
        let m = RequestMetrics::new();
        let w = Metered::wrap(Arc::new(Stuck), m.clone());
        let k = Key::new("k").unwrap();
        let put = w.put(&k, "v".into(), PutOptions::new());
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(10), put)
                .await
                .is_err()
        );
        assert!(w.get(&k, ReadOptions::new()).await.is_err());
        let mut registry = Registry::default();
        m.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "datasync_store_requests_total{op=\"put\",result=\"cancelled\"} 1\n",
            "datasync_store_requests_total{op=\"get\",result=\"stopped\"} 1\n",
            "datasync_store_request_duration_seconds_count{op=\"put\"} 1\n",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
    }
}

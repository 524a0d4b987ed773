//! The store's requests as the agent's plugins make them: how long each takes and how
//! it ends, by operation, the same for every kind of store (`datasync_store_request_*`).
//! Measured around the `Writer` the plugins get, so it is what a plugin waits for:
//! client library, network, server and retries inside the transport.

use std::sync::Arc;
use std::time::Instant;

use datasync::{
    CasOutcome, DeleteOptions, Deleted, Expect, Key, KeyValue, Limits, Listing, Prefix, PutOptions,
    ReadOptions, Revision, StoreError, Value, Writer,
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
            "The plugins' store requests, by operation and result (ok or the error's kind).",
            self.total.clone(),
        );
    }

    fn record<T>(&self, op: &'static str, started: Instant, r: &Result<T, StoreError>) {
        self.duration
            .get_or_create(&Op { op })
            .observe(started.elapsed().as_secs_f64());
        let result = match r {
            Ok(_) => "ok",
            Err(e) => kind(e),
        };
        self.total.get_or_create(&Outcome { op, result }).inc();
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
        let t = Instant::now();
        let r = self.inner.put(key, value, opts).await;
        self.metrics.record("put", t, &r);
        r
    }

    async fn delete(&self, key: &Key, opts: DeleteOptions) -> Result<Deleted, StoreError> {
        let t = Instant::now();
        let r = self.inner.delete(key, opts).await;
        self.metrics.record("delete", t, &r);
        r
    }

    async fn get(&self, key: &Key, opts: ReadOptions) -> Result<Option<KeyValue>, StoreError> {
        let t = Instant::now();
        let r = self.inner.get(key, opts).await;
        self.metrics.record("get", t, &r);
        r
    }

    async fn list(&self, prefix: &Prefix, opts: ReadOptions) -> Result<Listing, StoreError> {
        let t = Instant::now();
        let r = self.inner.list(prefix, opts).await;
        self.metrics.record("list", t, &r);
        r
    }

    async fn compare_and_swap(
        &self,
        key: &Key,
        expect: Expect,
        value: Value,
        opts: PutOptions,
    ) -> Result<CasOutcome, StoreError> {
        let t = Instant::now();
        let r = self.inner.compare_and_swap(key, expect, value, opts).await;
        self.metrics.record("compare_and_swap", t, &r);
        r
    }
}

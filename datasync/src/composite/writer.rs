use std::sync::Arc;

use futures_util::future::join_all;

use crate::error::CompositeError;
use crate::{
    CasOutcome, DeleteOptions, Deleted, Expect, Key, KeyValue, Limits, Listing, Prefix, PutOptions,
    ReadOptions, Revision, Source, StoreError, Value, Writer,
};

/// Writes to every part concurrently; reads from the first part (the primary).
///
/// A write succeeds when it succeeded on every part; otherwise the error lists each
/// part's outcome ([`StoreError::Composite`]). Compare-and-swap and transactions cannot
/// be atomic across stores and are refused ([`StoreError::Unsupported`]).
#[derive(Debug, Clone, Default)]
pub struct CompositeWriter {
    parts: Vec<(Source, Arc<dyn Writer>)>,
}

impl CompositeWriter {
    /// An empty composite.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a part; the first added is the primary.
    #[must_use]
    pub fn with(mut self, name: &str, part: Arc<dyn Writer>) -> Self {
        self.parts.push((Source::from(name), part));
        self
    }

    fn primary(&self) -> Result<&Arc<dyn Writer>, StoreError> {
        self.parts
            .first()
            .map(|(_, w)| w)
            .ok_or(StoreError::Unsupported("composite writer has no parts"))
    }

    /// Runs `op` on every part; the primary's output if all succeeded.
    async fn fan_out<'a, T, F, Fut>(&'a self, op: F) -> Result<T, StoreError>
    where
        F: Fn(&'a Arc<dyn Writer>) -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        self.primary()?;
        let outcomes = join_all(self.parts.iter().map(|(_, w)| op(w))).await;
        if outcomes.iter().all(Result::is_ok) {
            return outcomes
                .into_iter()
                .next()
                .ok_or(StoreError::Unsupported("composite writer has no parts"))?;
        }
        let results = self
            .parts
            .iter()
            .zip(outcomes)
            .map(|((name, _), r)| (name.clone(), r.map(|_| ())))
            .collect();
        Err(StoreError::Composite(Box::new(CompositeError { results })))
    }
}

#[async_trait::async_trait]
impl Writer for CompositeWriter {
    fn limits(&self) -> Limits {
        let max = self
            .parts
            .iter()
            .map(|(_, w)| w.limits().max_value_size)
            .min();
        Limits::new(max.unwrap_or(0))
    }

    async fn put(&self, key: &Key, value: Value, opts: PutOptions) -> Result<Revision, StoreError> {
        self.fan_out(|w| w.put(key, value.clone(), opts.clone()))
            .await
    }

    async fn delete(&self, key: &Key, opts: DeleteOptions) -> Result<Deleted, StoreError> {
        self.fan_out(|w| w.delete(key, opts.clone())).await
    }

    async fn get(&self, key: &Key, opts: ReadOptions) -> Result<Option<KeyValue>, StoreError> {
        self.primary()?.get(key, opts).await
    }

    async fn list(&self, prefix: &Prefix, opts: ReadOptions) -> Result<Listing, StoreError> {
        self.primary()?.list(prefix, opts).await
    }

    async fn compare_and_swap(
        &self,
        _key: &Key,
        _expect: Expect,
        _value: Value,
        _opts: PutOptions,
    ) -> Result<CasOutcome, StoreError> {
        Err(StoreError::Unsupported(
            "compare-and-swap across several stores cannot be atomic",
        ))
    }

    async fn txn(&self, _txn: crate::Txn) -> Result<crate::TxnOutcome, StoreError> {
        Err(StoreError::Unsupported(
            "a transaction across several stores cannot be atomic",
        ))
    }
}

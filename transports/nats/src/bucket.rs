//! An open bucket: the connection, the bucket's stream, and how calls fail. Below the
//! store, its consumers and its watches, which all hold one.

use std::future::Future;

use async_nats::jetstream::{self, stream};
use datasync::{Source, StoreError};

use crate::NatsConfig;
use crate::error::{Kind, classify};

#[derive(Debug)]
pub(crate) struct Bucket {
    pub(crate) client: async_nats::Client,
    pub(crate) js: jetstream::Context,
    pub(crate) stream: stream::Stream,
    /// `$KV.<bucket>.`
    pub(crate) subject_prefix: String,
    pub(crate) config: NatsConfig,
    pub(crate) max_value_size: usize,
    /// The bucket takes per-message TTLs (it was created with limit markers).
    pub(crate) ttl: bool,
    pub(crate) source: Source,
}

impl Bucket {
    /// `e` as a [`StoreError`] (see [`classify`]).
    pub(crate) fn classify<K>(&self, e: async_nats::error::Error<K>) -> StoreError
    where
        K: Kind + Clone + std::fmt::Debug + std::fmt::Display + PartialEq + Send + Sync + 'static,
    {
        classify(&self.client, self.config.request_timeout, e)
    }

    /// Runs `f` with the request timeout.
    pub(crate) async fn timed<T>(&self, f: impl Future<Output = T>) -> Result<T, StoreError> {
        let t = self.config.request_timeout;
        tokio::time::timeout(t, f)
            .await
            .map_err(|_| StoreError::Timeout(t))
    }
}

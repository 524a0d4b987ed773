//! [`Session`]: keys that live as long as this process keeps them alive.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use datasync::{Key, Revision, StoreError, Value};
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;

use crate::EtcdStore;
use crate::error::{header_rev, store_error, timed};

/// A lease that this process keeps alive (a keep-alive every TTL/3). Keys put through
/// the session live while it does; when it is closed or dropped, or the process dies,
/// they are deleted (Delete events with previous values) within the TTL.
///
/// If etcd loses the lease (it was unreachable for longer than the TTL), the session
/// takes a new lease and puts its keys again, so they come back on their own.
#[derive(Debug)]
pub struct Session {
    inner: Arc<Inner>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Inner {
    store: EtcdStore,
    ttl: i64,
    /// The lease id and the keys written under it, under one lock so a re-grant and a
    /// put never interleave.
    state: Mutex<(i64, BTreeMap<Key, Value>)>,
}

impl EtcdStore {
    /// Starts a session with a lease of `ttl` (whole seconds, rounded up).
    pub async fn session(&self, ttl: Duration) -> Result<Session, StoreError> {
        if ttl.is_zero() {
            return Err(StoreError::InvalidTtl(ttl));
        }
        let ttl = (ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0)) as i64;
        let inner = Arc::new(Inner {
            store: self.clone(),
            ttl,
            state: Mutex::new((0, BTreeMap::new())),
        });
        inner.state.lock().await.0 = inner.grant().await?;
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(keep_alive(inner.clone(), stopped));
        Ok(Session {
            inner,
            stop,
            task: Some(task),
        })
    }
}

impl Session {
    /// The current lease id.
    pub async fn lease_id(&self) -> i64 {
        self.inner.state.lock().await.0
    }

    /// Puts `key` under the session's lease.
    pub async fn put(&self, key: &Key, value: Value) -> Result<Revision, StoreError> {
        datasync::Writer::limits(&self.inner.store).check(&value)?;
        let mut state = self.inner.state.lock().await;
        let rev = self.inner.put(state.0, key, &value).await?;
        state.1.insert(key.clone(), value);
        Ok(rev)
    }

    /// Ends the session: revokes the lease, deleting its keys now.
    pub async fn close(mut self) -> Result<(), StoreError> {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let id = self.inner.state.lock().await.0;
        let mut lease = self.inner.store.lease_client();
        timed(self.inner.store.timeout(), lease.revoke(id))
            .await?
            .map_err(store_error)?;
        Ok(())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Stop the keep-alives; the keys go when the lease runs out.
        let _ = self.stop.send(true);
    }
}

impl Inner {
    async fn grant(&self) -> Result<i64, StoreError> {
        let mut lease = self.store.lease_client();
        let resp = timed(self.store.timeout(), lease.grant(self.ttl, None))
            .await?
            .map_err(store_error)?;
        Ok(resp.id())
    }

    async fn put(&self, lease: i64, key: &Key, value: &Value) -> Result<Revision, StoreError> {
        let opts = etcd_client::PutOptions::new().with_lease(lease);
        let resp = timed(
            self.store.timeout(),
            self.store.kv().put(
                self.store.inner.ns.key(key),
                value.as_bytes().to_vec(),
                Some(opts),
            ),
        )
        .await?
        .map_err(store_error)?;
        header_rev(resp.header())
    }

    /// A new lease with every key of the session put again under it.
    async fn renew(&self) -> Result<(), StoreError> {
        let mut state = self.state.lock().await;
        let id = self.grant().await?;
        for (k, v) in &state.1 {
            self.put(id, k, v).await?;
        }
        tracing::warn!(
            old = state.0,
            new = id,
            keys = state.1.len(),
            "etcd lost the session lease; renewed"
        );
        state.0 = id;
        Ok(())
    }
}

/// Keeps the lease alive every TTL/3 until stopped.
async fn keep_alive(inner: Arc<Inner>, mut stopped: watch::Receiver<bool>) {
    let period = Duration::from_millis((inner.ttl as u64 * 1000 / 3).max(100));
    let mut backoff = datasync::transport::resync::Pauses::default();
    loop {
        let id = inner.state.lock().await.0;
        let mut lease = inner.store.lease_client();
        let lost = match lease.keep_alive(id).await {
            Ok((mut keeper, mut stream)) => loop {
                tokio::select! {
                    _ = stopped.changed() => return,
                    _ = tokio::time::sleep(period) => {}
                }
                if keeper.keep_alive().await.is_err() {
                    break false;
                }
                match stream.message().await {
                    Ok(Some(resp)) if resp.ttl() > 0 => backoff.reset(),
                    Ok(Some(_)) => break true,
                    Ok(None) | Err(_) => break false,
                }
            },
            Err(etcd_client::Error::LeaseKeepAliveError(_)) => true,
            Err(_) => false,
        };
        if lost {
            if let Err(e) = inner.renew().await {
                tracing::warn!(error = %e, "cannot renew the session lease; retrying");
            } else {
                continue;
            }
        }
        tokio::select! {
            _ = stopped.changed() => return,
            _ = tokio::time::sleep(backoff.next_pause()) => {}
        }
    }
}

//! Leases for TTL puts, shared across puts.
//!
//! etcd TTLs are whole seconds with a server minimum (2 s by default), and a lease
//! expires at a fixed time, not relative to each put. A put with TTL `t` therefore uses a
//! lease that expires no sooner than `t` from now and at most `slack` later: we grant
//! leases of `ceil(t) + slack` seconds (`slack` = 10 % of `t`, at least 1 s), and reuse one
//! while it still has `t` to live. Keys may thus live up to `slack` plus rounding longer
//! than asked, never shorter, and a steady stream of TTL puts needs about one lease per
//! `slack` per distinct TTL instead of one per put. Expired leases are dropped from the
//! pool; etcd forgets them by itself.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use datasync::StoreError;
use etcd_client::LeaseClient;
use tokio::time::Instant;

use crate::error::{store_error, timed};

#[derive(Debug, Default)]
pub(crate) struct LeasePool {
    /// Leases by requested TTL in whole seconds.
    by_ttl: tokio::sync::Mutex<HashMap<u64, Vec<Granted>>>,
    granted: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
struct Granted {
    id: i64,
    /// A lower bound of when etcd expires the lease.
    expires: Instant,
}

impl LeasePool {
    /// A lease that lives at least `ttl` from now.
    pub(crate) async fn lease_for(
        &self,
        mut client: LeaseClient,
        ttl: Duration,
        timeout: Duration,
    ) -> Result<i64, StoreError> {
        let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let slack = (secs / 10).max(1);
        // One grant at a time per pool: concurrent puts wait for it and share it.
        let mut by_ttl = self.by_ttl.lock().await;
        let now = Instant::now();
        let leases = by_ttl.entry(secs).or_default();
        leases.retain(|g| g.expires > now);
        if let Some(g) = leases.iter().find(|g| g.expires >= now + ttl) {
            return Ok(g.id);
        }
        let sent = Instant::now();
        let resp = timed(timeout, client.grant((secs + slack) as i64, None))
            .await?
            .map_err(store_error)?;
        if !resp.error().is_empty() {
            return Err(StoreError::Backend(
                format!("etcd refused a lease: {}", resp.error()).into(),
            ));
        }
        self.granted.fetch_add(1, Ordering::Relaxed);
        leases.push(Granted {
            id: resp.id(),
            expires: sent + Duration::from_secs(resp.ttl().max(0) as u64),
        });
        Ok(resp.id())
    }

    /// Drops a lease etcd no longer knows.
    pub(crate) async fn forget(&self, id: i64) {
        for leases in self.by_ttl.lock().await.values_mut() {
            leases.retain(|g| g.id != id);
        }
    }

    pub(crate) fn granted(&self) -> u64 {
        self.granted.load(Ordering::Relaxed)
    }
}

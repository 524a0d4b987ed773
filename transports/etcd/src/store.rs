//! [`EtcdStore`]: connection, reads and writes.

use std::sync::Arc;
use std::time::Duration;

use datasync::{
    CasOutcome, Consistency, DeleteOptions, Deleted, Expect, Key, KeyValue, Limits, Listing,
    Prefix, PrefixSet, PrefixValues, PutOptions, ReadOptions, Revision, Source, StoreError, Value,
    Writer,
};
use etcd_client::{
    Client, Compare, CompareOp, GetOptions, GetResponse, KvClient, LeaseClient, Txn, TxnOp,
    TxnOpResponse, WatchClient,
};

use crate::EtcdConfig;
use crate::error::{header_rev, is_compacted, is_future, revision, store_error, timed};
use crate::keys::Namespace;
use crate::lease::LeasePool;

/// Largest gRPC message we accept from etcd (a page of large values).
const MAX_MESSAGE: usize = 256 << 20;

/// A datasync store backed by etcd. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct EtcdStore {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) client: Client,
    pub(crate) kv: KvClient,
    pub(crate) watch: WatchClient,
    pub(crate) lease: LeaseClient,
    pub(crate) config: EtcdConfig,
    pub(crate) ns: Namespace,
    pub(crate) leases: LeasePool,
    pub(crate) source: Source,
    /// Watch streams opened on etcd (each registration opens one, and one more after
    /// every loss of its stream).
    pub(crate) watch_streams: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.inner.config.endpoints)
            .field("namespace", &self.inner.config.namespace)
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects and checks that etcd answers. An unreachable etcd fails with a retryable
    /// [`StoreError::Unavailable`], after retrying with backoff for
    /// [`EtcdConfig::wait_for_server`].
    pub async fn connect(config: EtcdConfig) -> Result<EtcdStore, StoreError> {
        if config.endpoints.is_empty() {
            return Err(StoreError::Backend("no etcd endpoints configured".into()));
        }
        let deadline = tokio::time::Instant::now() + config.wait_for_server;
        let mut backoff = datasync::transport::resync::Pauses::default();
        loop {
            match Self::try_connect(&config).await {
                Ok(store) => return Ok(store),
                Err(e) if e.is_retryable() && tokio::time::Instant::now() < deadline => {
                    tracing::warn!(endpoints = ?config.endpoints, error = %e, "etcd unreachable; retrying");
                    tokio::time::sleep_until(
                        deadline.min(tokio::time::Instant::now() + backoff.next_pause()),
                    )
                    .await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn try_connect(config: &EtcdConfig) -> Result<EtcdStore, StoreError> {
        let client = tokio::time::timeout(
            config.connect_timeout,
            Client::connect(&config.endpoints, Some(config.connect_options())),
        )
        .await
        .map_err(|_| StoreError::Unavailable("connecting to etcd timed out".into()))?
        .map_err(store_error)?;
        let store = EtcdStore {
            inner: Arc::new(Inner {
                kv: client
                    .kv_client()
                    .max_decoding_message_size(MAX_MESSAGE)
                    .max_encoding_message_size(MAX_MESSAGE),
                watch: client.watch_client().max_decoding_message_size(MAX_MESSAGE),
                lease: client.lease_client(),
                client,
                ns: Namespace::new(&config.namespace),
                leases: LeasePool::default(),
                config: config.clone(),
                source: Source::from(""),
                watch_streams: Default::default(),
            }),
        };
        // Channels connect lazily: make one real request. A user whose role covers only
        // some keys is refused this count of them all, which still proves the
        // connection and the credentials.
        match store.current_revision().await {
            Ok(_) => Ok(store),
            Err(StoreError::PermissionDenied(e)) => {
                tracing::warn!(
                    error = %e,
                    "etcd: this user may not read the whole namespace; connected, but a \
                     watch or read outside its role will be refused"
                );
                Ok(store)
            }
            Err(e) => Err(e),
        }
    }

    /// The configuration this store was connected with.
    pub fn config(&self) -> &EtcdConfig {
        &self.inner.config
    }

    /// The underlying `etcd-client` client (e.g. for maintenance calls).
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// etcd's current revision.
    pub async fn current_revision(&self) -> Result<Revision, StoreError> {
        let (start, end) = self.inner.ns.range(&Prefix::all());
        let opts = GetOptions::new()
            .with_range(end)
            .with_count_only()
            .with_limit(1);
        let resp = self.get_raw(start, opts).await?;
        Ok(header_revision(&resp)?.0)
    }

    /// How many watch streams this store has opened on etcd: one per registration,
    /// and one more each time a stream was lost and opened again.
    pub fn watch_streams_opened(&self) -> u64 {
        self.inner
            .watch_streams
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many distinct leases this store has granted for TTL puts (they are shared
    /// across puts with similar TTLs).
    pub fn leases_granted(&self) -> u64 {
        self.inner.leases.granted()
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.inner.config.request_timeout
    }

    pub(crate) fn kv(&self) -> KvClient {
        self.inner.kv.clone()
    }

    pub(crate) fn watch_client(&self) -> WatchClient {
        self.inner.watch.clone()
    }

    pub(crate) fn lease_client(&self) -> LeaseClient {
        self.inner.lease.clone()
    }

    async fn get_raw(&self, key: Vec<u8>, opts: GetOptions) -> Result<GetResponse, StoreError> {
        timed(self.timeout(), self.kv().get(key, Some(opts)))
            .await?
            .map_err(store_error)
    }

    /// `r` as etcd's signed revision; above `i64::MAX` it can only be in the future (it
    /// must not wrap to a negative revision, which etcd reads as "current").
    async fn etcd_revision(&self, r: Revision) -> Result<i64, StoreError> {
        match i64::try_from(r.0) {
            Ok(r) => Ok(r),
            Err(_) => Err(StoreError::FutureRevision {
                requested: r,
                current: self.current_revision().await?,
            }),
        }
    }

    /// A read error, with the revisions a caller needs to act on it.
    async fn read_error(&self, e: etcd_client::Error, requested: Option<Revision>) -> StoreError {
        match requested {
            Some(requested) if is_future(&e) => match self.current_revision().await {
                Ok(current) => StoreError::FutureRevision { requested, current },
                Err(e) => e,
            },
            Some(requested) if is_compacted(&e) => StoreError::Compacted {
                requested,
                compacted: self.compacted_revision(requested).await,
            },
            _ => store_error(e),
        }
    }

    /// The newest compacted revision, as a watch at `requested` reports it (etcd has no
    /// other way to ask); `requested` if that fails.
    async fn compacted_revision(&self, requested: Revision) -> Revision {
        let probe = async {
            let opts = etcd_client::WatchOptions::new().with_start_revision(requested.0 as i64);
            let mut ws = self
                .watch_client()
                .watch(vec![0u8], Some(opts))
                .await
                .ok()?;
            while let Some(resp) = ws.message().await.ok()? {
                if resp.compact_revision() > 0 {
                    return Some(Revision(resp.compact_revision() as u64 - 1));
                }
                if !resp.created() {
                    return None;
                }
            }
            None
        };
        tokio::time::timeout(self.timeout(), probe)
            .await
            .ok()
            .flatten()
            .unwrap_or(requested)
    }

    /// Every key under `prefix` at one revision (`at`, or the current one), read in pages
    /// that are all pinned to that revision.
    pub(crate) async fn read_prefix(
        &self,
        prefix: &Prefix,
        at: Option<Revision>,
        consistency: Consistency,
    ) -> Result<(Revision, Vec<KeyValue>, u64), StoreError> {
        let (mut from, end) = self.inner.ns.range(prefix);
        let mut revision = at;
        let mut cluster = 0;
        let mut page = self.inner.config.page_size;
        let mut out = Vec::new();
        loop {
            let mut opts = GetOptions::new()
                .with_range(end.clone())
                .with_limit(page as i64);
            if let Some(r) = revision {
                opts = opts.with_revision(self.etcd_revision(r).await?);
            }
            if consistency == Consistency::Local {
                opts = opts.with_serializable();
            }
            let mut resp =
                match timed(self.timeout(), self.kv().get(from.clone(), Some(opts))).await? {
                    Ok(resp) => resp,
                    Err(e) if is_too_large(&e) && page > 1 => {
                        page /= 2;
                        continue;
                    }
                    Err(e) => return Err(self.read_error(e, revision).await),
                };
            let (rev, id) = header_revision(&resp)?;
            revision.get_or_insert(rev);
            if cluster == 0 {
                cluster = id;
            }
            let more = resp.more();
            let kvs = resp.take_kvs();
            if more {
                if let Some(last) = kvs.last() {
                    from = last.key().to_vec();
                    from.push(0);
                }
            }
            out.reserve(kvs.len());
            for kv in kvs {
                let mod_revision = kv.mod_revision();
                let (key, value) = kv.into_key_value();
                if let Some(key) = self.decode_key(&key) {
                    out.push(KeyValue {
                        key,
                        value: Value::from(value),
                        revision: crate::error::revision(mod_revision)?,
                    });
                }
            }
            if !more {
                break;
            }
        }
        let revision = revision.unwrap_or_default();
        Ok((revision, out, cluster))
    }

    /// The state under every prefix of `set` at one revision, and the cluster id.
    pub(crate) async fn snapshot(
        &self,
        set: &PrefixSet,
    ) -> Result<(Revision, Vec<PrefixValues>, u64), StoreError> {
        loop {
            let mut at = None;
            let mut cluster = 0;
            let mut groups = Vec::with_capacity(set.prefixes().len());
            let mut compacted = false;
            for p in set.prefixes() {
                match self.read_prefix(p, at, Consistency::Linearizable).await {
                    Ok((rev, values, id)) => {
                        at = Some(rev);
                        cluster = id;
                        groups.push(PrefixValues {
                            prefix: p.clone(),
                            values,
                        });
                    }
                    // Compacted between two prefixes: start again at a newer revision.
                    Err(StoreError::Compacted { .. }) => {
                        compacted = true;
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            if compacted {
                continue;
            }
            let rev = match at {
                Some(rev) => rev,
                None => self.current_revision().await?,
            };
            return Ok((rev, groups, cluster));
        }
    }

    /// Every value under `set` at revision `at`, for a resync of prefixes added to a
    /// live watch (`Compacted` once etcd no longer keeps `at`), with the cluster id
    /// that answered.
    pub(crate) async fn snapshot_at(
        &self,
        set: &PrefixSet,
        at: Revision,
    ) -> Result<(Vec<PrefixValues>, u64), StoreError> {
        let mut groups = Vec::with_capacity(set.prefixes().len());
        let mut cluster = 0;
        for p in set.prefixes() {
            let (_, values, id) = self
                .read_prefix(p, Some(at), Consistency::Linearizable)
                .await?;
            cluster = id;
            groups.push(PrefixValues {
                prefix: p.clone(),
                values,
            });
        }
        Ok((groups, cluster))
    }

    /// A stored etcd key-value as ours; `None` for a key datasync cannot represent
    /// (see [`decode_key`](Self::decode_key)) or a negative revision (logged).
    pub(crate) fn key_value(&self, kv: &etcd_client::KeyValue) -> Option<KeyValue> {
        let key = self.decode_key(kv.key())?;
        let revision = revision(kv.mod_revision())
            .inspect_err(|e| tracing::warn!(key = %key, error = %e, "skipping a value"))
            .ok()?;
        Some(KeyValue {
            key,
            value: Value::from(kv.value().to_vec()),
            revision,
        })
    }

    /// The datasync key of an etcd key; keys outside the namespace, and keys another
    /// client wrote that datasync cannot represent, are skipped (the latter logged).
    pub(crate) fn decode_key(&self, raw: &[u8]) -> Option<Key> {
        match self.inner.ns.decode(raw)? {
            Ok(key) => Some(key),
            Err(e) => {
                tracing::warn!(key = %String::from_utf8_lossy(raw), error = %e, "skipping an etcd key datasync cannot represent");
                None
            }
        }
    }

    /// The lease for a put with `opts`, 0 for none.
    async fn lease_for(&self, opts: &PutOptions) -> Result<i64, StoreError> {
        match opts.ttl {
            None => Ok(0),
            Some(ttl) => {
                self.inner
                    .leases
                    .lease_for(self.lease_client(), ttl, self.timeout())
                    .await
            }
        }
    }
}

/// A response header's revision and cluster id.
fn header_revision(resp: &GetResponse) -> Result<(Revision, u64), StoreError> {
    Ok((
        header_rev(resp.header())?,
        resp.header().map_or(0, |h| h.cluster_id()),
    ))
}

/// `expect` on etcd key `k`. `Absent` is create revision 0; `Revision(r)` is mod
/// revision r, where no key is at revision 0 (etcd's mod revision of an absent key)
/// nor above i64::MAX: -1 makes those compares fail, as they must.
fn compare(k: Vec<u8>, expect: Expect) -> Compare {
    match expect {
        Expect::Absent => Compare::create_revision(k, CompareOp::Equal, 0),
        Expect::Revision(r) => {
            let r = i64::try_from(r.0).ok().filter(|r| *r > 0).unwrap_or(-1);
            Compare::mod_revision(k, CompareOp::Equal, r)
        }
    }
}

fn is_too_large(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("too large"))
}

fn is_lease_gone(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("lease not found"))
}

#[async_trait::async_trait]
impl Writer for EtcdStore {
    fn limits(&self) -> Limits {
        Limits::new(self.inner.config.max_value_size)
    }

    async fn put(&self, key: &Key, value: Value, opts: PutOptions) -> Result<Revision, StoreError> {
        self.limits().check_put(&value, &opts)?;
        let k = self.inner.ns.key(key);
        // A lease can vanish under us (revoked by an operator): take a new one, once.
        for attempt in 0..2 {
            let lease = self.lease_for(&opts).await?;
            let po = etcd_client::PutOptions::new().with_lease(lease);
            match timed(
                self.timeout(),
                self.kv()
                    .put(k.clone(), value.as_bytes().to_vec(), Some(po)),
            )
            .await?
            {
                Ok(resp) => {
                    return header_rev(resp.header());
                }
                Err(e) if attempt == 0 && lease != 0 && is_lease_gone(&e) => {
                    self.inner.leases.forget(lease).await;
                }
                Err(e) => return Err(store_error(e)),
            }
        }
        Err(StoreError::Unavailable(
            "etcd lost two leases in a row".into(),
        ))
    }

    async fn delete(&self, key: &Key, opts: DeleteOptions) -> Result<Deleted, StoreError> {
        let mut o = etcd_client::DeleteOptions::new();
        let k = if opts.prefix {
            let (start, end) = self.inner.ns.range(&Prefix::from(key.clone()));
            o = o.with_range(end);
            start
        } else {
            self.inner.ns.key(key)
        };
        let resp = timed(self.timeout(), self.kv().delete(k, Some(o)))
            .await?
            .map_err(store_error)?;
        Ok(Deleted {
            count: revision(resp.deleted())?.0,
            revision: header_rev(resp.header())?,
        })
    }

    async fn get(&self, key: &Key, opts: ReadOptions) -> Result<Option<KeyValue>, StoreError> {
        let mut o = GetOptions::new();
        if let Some(r) = opts.revision {
            o = o.with_revision(self.etcd_revision(r).await?);
        }
        if opts.consistency == Consistency::Local {
            o = o.with_serializable();
        }
        match timed(
            self.timeout(),
            self.kv().get(self.inner.ns.key(key), Some(o)),
        )
        .await?
        {
            Ok(resp) => Ok(resp.kvs().first().and_then(|kv| self.key_value(kv))),
            Err(e) => Err(self.read_error(e, opts.revision).await),
        }
    }

    async fn list(&self, prefix: &Prefix, opts: ReadOptions) -> Result<Listing, StoreError> {
        let (revision, values, _) = self
            .read_prefix(prefix, opts.revision, opts.consistency)
            .await?;
        Ok(Listing { revision, values })
    }

    async fn compare_and_swap(
        &self,
        key: &Key,
        expect: Expect,
        value: Value,
        opts: PutOptions,
    ) -> Result<CasOutcome, StoreError> {
        self.limits().check_put(&value, &opts)?;
        let k = self.inner.ns.key(key);
        let lease = self.lease_for(&opts).await?;
        let cmp = compare(k.clone(), expect);
        let txn = Txn::new()
            .when([cmp])
            .and_then([TxnOp::put(
                k.clone(),
                value.as_bytes().to_vec(),
                Some(etcd_client::PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(k, None)]);
        let resp = timed(self.timeout(), self.kv().txn(txn))
            .await?
            .map_err(store_error)?;
        if resp.succeeded() {
            return Ok(CasOutcome::Swapped(header_rev(resp.header())?));
        }
        let current = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g.kvs().first().and_then(|kv| self.key_value(kv))),
            _ => None,
        });
        Ok(CasOutcome::Conflict(current.flatten()))
    }

    async fn txn(&self, txn: datasync::Txn) -> Result<datasync::TxnOutcome, StoreError> {
        txn.validate(&self.limits())?;
        let ns = &self.inner.ns;
        let when: Vec<Compare> = txn
            .when
            .iter()
            .map(|(key, expect)| compare(ns.key(key), *expect))
            .collect();
        // A lease can vanish under us (revoked by an operator): take new ones, once.
        for attempt in 0..2 {
            let mut leases = Vec::new();
            let mut branches = [Vec::new(), Vec::new()];
            for (ops, branch) in [&txn.then, &txn.otherwise].into_iter().zip(&mut branches) {
                for op in ops {
                    branch.push(match op {
                        datasync::TxnOp::Put { key, value, opts } => {
                            let lease = self.lease_for(opts).await?;
                            leases.push(lease);
                            TxnOp::put(
                                ns.key(key),
                                value.as_bytes().to_vec(),
                                Some(etcd_client::PutOptions::new().with_lease(lease)),
                            )
                        }
                        datasync::TxnOp::Delete { key, opts } if opts.prefix => {
                            let (start, end) = ns.range(&Prefix::from(key.clone()));
                            TxnOp::delete(
                                start,
                                Some(etcd_client::DeleteOptions::new().with_range(end)),
                            )
                        }
                        datasync::TxnOp::Delete { key, .. } => TxnOp::delete(ns.key(key), None),
                    });
                }
            }
            let [then, otherwise] = branches;
            let request = Txn::new()
                .when(when.clone())
                .and_then(then)
                .or_else(otherwise);
            match timed(self.timeout(), self.kv().txn(request)).await? {
                Ok(resp) => {
                    return Ok(datasync::TxnOutcome {
                        succeeded: resp.succeeded(),
                        revision: header_rev(resp.header())?,
                    });
                }
                Err(e) if attempt == 0 && is_lease_gone(&e) => {
                    for lease in leases.into_iter().filter(|l| *l != 0) {
                        self.inner.leases.forget(lease).await;
                    }
                }
                Err(e) => return Err(store_error(e)),
            }
        }
        Err(StoreError::Unavailable(
            "etcd lost two leases in a row".into(),
        ))
    }
}

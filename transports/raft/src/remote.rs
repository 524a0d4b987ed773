//! Remote clients: a process without a replica (the CLI, another agent) uses a cluster
//! as a datasync store, over the members' own authenticated protocol.
//!
//! A [`RemoteStore`] sends each operation to one member, which runs it on its own store
//! as if it were local: writes are forwarded to the leader, linearizable reads go
//! through the leader's read index. So a remote client has a member's guarantees. If a
//! member cannot be reached before the request is sent, the next endpoint is tried. If
//! a call fails after it was sent, its outcome is unknown, and the error says so
//! (`Unavailable` or `Timeout`). It is not retried, because a retried write could apply
//! twice.
//!
//! Watches: each registration has a connection of its own to one member. That member
//! runs a watch on its replica and streams it; closing the registration closes the
//! connection, and that releases the member's watch. Before the member subscribes, it
//! catches up to the leader's commit index (a read index), so a resync is never older
//! than anything the client has already seen through another member. A broken
//! connection cannot prove continuity, so the watch moves to another member with a
//! resync (`Reconnect`). A consumer that falls `queue_capacity` events behind has its
//! stream closed, and it is resynced (`Overflow`) once it has made room. A requested
//! resync opens a fresh stream, so that one resync serves every request made until it.
//! The loop that does all this is `datasync::transport::resync::drive`; `RemoteWatch` is its
//! `Upstream`.

use datasync::transport::Producer;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use datasync::transport::relay::{self, Item};
use datasync::transport::resync::{self, Lost, Next, Snapshot, Start, Upstream};
use datasync::{
    CasOutcome, Consistency, DeleteOptions, Deleted, Expect, Key, KeyChange, KeyValue, Limits,
    Listing, Op, Prefix, PrefixSet, PrefixValues, PutOptions, ReadOptions, ResyncReason, Revision,
    Source, StoreError, Txn, TxnOp, TxnOutcome, Value, Watch, WatchOptions, Watcher, Writer,
};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::error::ClusterError;
use crate::members::{Members, Role};
use crate::network::Secret;
use crate::network::client::{Client, Pool};
use crate::network::wire::{
    ClientOp, ClientReply, Read, Reply, Request, WireChange, WireError, WireItem, WireKv, WireTxnOp,
};
use crate::once::Requests;
use crate::routing;
use crate::types::expected_rev;

/// How a [`RemoteStore`] reaches a cluster.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RemoteConfig {
    /// Members to talk to (any of them; tried in turn).
    pub endpoints: Vec<String>,
    /// The cluster secret.
    pub secret: Secret,
    /// How long one call may take, finding a member that answers included (default
    /// 15 s: a member's own forwarding may take its forward timeout).
    pub timeout: Duration,
    /// How connections are made: TCP, or a simulated network (tests only).
    pub(crate) net: Arc<dyn crate::network::net::Net>,
}

impl RemoteConfig {
    /// Talks to `endpoints` (members' cluster addresses) with `secret`.
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>, secret: Secret) -> Self {
        RemoteConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            secret,
            timeout: Duration::from_secs(15),
            net: crate::network::net::tcp(),
        }
    }

    /// Sets the per-call timeout.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Makes connections through `net` instead of TCP (a simulated network).
    #[cfg(feature = "testing")]
    #[must_use]
    pub fn net(mut self, net: Arc<dyn crate::testing::Net>) -> Self {
        self.net = net;
        self
    }
}

/// A cluster seen from a process without a replica: a datasync [`Writer`] and
/// [`Watcher`], plus membership. Cheap to clone: clones share one connection per
/// member.
///
/// # Cancel safety
/// Dropping a call's future abandons its reply; a request already sent may still run.
#[derive(Debug, Clone)]
pub struct RemoteStore {
    inner: Arc<RemoteInner>,
}

#[derive(Debug)]
struct RemoteInner {
    pool: Pool,
    config: RemoteConfig,
    limits: Limits,
    /// The endpoint that answered last: tried first.
    preferred: AtomicUsize,
    source: Source,
    /// Request ids of this client's writes.
    requests: Requests,
}

impl RemoteStore {
    /// Connects to the first endpoint that answers and learns the cluster's limits.
    pub async fn connect(config: RemoteConfig) -> Result<RemoteStore, ClusterError> {
        let within = config.timeout;
        RemoteStore::connect_within(config, within).await
    }

    /// [`connect`](Self::connect), finding a member that answers within `within`.
    pub(crate) async fn connect_within(
        mut config: RemoteConfig,
        within: Duration,
    ) -> Result<RemoteStore, ClusterError> {
        let timeout = config.timeout;
        config.timeout = within.min(timeout);
        if config.endpoints.is_empty() {
            return Err(ClusterError::NoEndpoints);
        }
        let mut inner = RemoteInner {
            pool: Pool::new(config.secret.clone(), None, config.net.clone()),
            config,
            limits: Limits::new(0),
            preferred: AtomicUsize::new(0),
            source: Source::from(""),
            requests: Requests::new(),
        };
        inner.limits = match inner
            .call(|| Request::Client(ClientOp::Limits, None))
            .await?
        {
            Reply::Client(Ok(ClientReply::Limits { max_value_size })) => {
                Limits::new(max_value_size)
            }
            other => return Err(unexpected_reply(&other)),
        };
        inner.config.timeout = timeout;
        Ok(RemoteStore {
            inner: Arc::new(inner),
        })
    }

    /// The endpoints this client talks to.
    pub fn endpoints(&self) -> &[String] {
        &self.inner.config.endpoints
    }

    /// Runs `op` on a member; a write carries a request id, the same in every retry,
    /// so the store applies it once (see `Request::Client`).
    async fn op(&self, op: ClientOp) -> Result<ClientReply, StoreError> {
        let write = matches!(
            op,
            ClientOp::Put { .. }
                | ClientOp::Delete { .. }
                | ClientOp::Cas { .. }
                | ClientOp::Txn { .. }
        );
        let ticket = match write {
            true => Some(self.inner.requests.begin().await),
            false => None,
        };
        let id = ticket.as_ref().map(|t| t.id);
        match self.inner.call(|| Request::Client(op.clone(), id)).await? {
            Reply::Client(r) => r.map_err(StoreError::from),
            other => Err(unexpected_reply(&other).into()),
        }
    }

    /// A backup of the state of the member asked, taken after a linearizable read
    /// barrier (see [`RaftStore::backup`](crate::RaftStore::backup)). The whole file
    /// comes in one frame: at most 256 MiB.
    ///
    /// # Cancel safety
    /// Cancel safe (nothing is written).
    pub async fn backup(&self) -> Result<Vec<u8>, StoreError> {
        match self.op(ClientOp::Backup).await? {
            ClientReply::Backup(file) => Ok(file),
            other => Err(StoreError::Backend(Box::new(ClusterError::UnexpectedReply)))
                .inspect_err(|_| tracing::warn!(?other, "unexpected reply to a backup")),
        }
    }

    /// The committed group configuration, as the member asked knows it.
    pub async fn members(&self) -> Result<Members, ClusterError> {
        match self.inner.call(|| Request::Members).await? {
            Reply::Members(m) => Ok(m),
            other => Err(unexpected_reply(&other)),
        }
    }

    /// Adds node `id` at `addr` as a voter or learner (or promotes a learner); returns
    /// once the change is committed. See [`RaftStore::add_member`](crate::RaftStore::add_member).
    pub async fn add_member(&self, id: u64, addr: &str, role: Role) -> Result<(), ClusterError> {
        let req = || Request::Join {
            id,
            addr: addr.to_owned(),
            voter: role == Role::Voter,
        };
        self.change(req).await
    }

    /// Removes node `id` from the group (it keeps its data); returns once committed.
    pub async fn remove_member(&self, id: u64) -> Result<(), ClusterError> {
        self.change(|| Request::Leave { id }).await
    }

    /// Reaches member `id` at `addr` from now on (see
    /// [`RaftStore::update_member`](crate::RaftStore::update_member)).
    pub async fn update_member(&self, id: u64, addr: &str) -> Result<(), ClusterError> {
        let req = || Request::Update {
            id,
            addr: addr.to_owned(),
        };
        self.change(req).await
    }

    async fn change(&self, req: impl Fn() -> Request) -> Result<(), ClusterError> {
        let (pool, c) = (&self.inner.pool, &self.inner.config);
        routing::change_membership(pool, &c.endpoints, req, c.timeout)
            .await
            .map(|_| ())
    }
}

impl RemoteInner {
    /// Sends a request to a member, the one that answered last first, then the others
    /// in turn (`cluster::route`'s retries: unreachable or stopping members are skipped,
    /// a call that failed after it was sent is not retried).
    async fn call(&self, req: impl Fn() -> Request) -> Result<Reply, ClusterError> {
        let (eps, timeout) = (&self.config.endpoints, self.config.timeout);
        let deadline = Instant::now() + timeout;
        let first = self.preferred.load(Ordering::Relaxed);
        let mut next = (0..).map(|a| (first + a) % eps.len());
        let routed = routing::route(
            timeout,
            routing::LAST_TRY,
            // Members forward client calls themselves: no redirect comes back.
            |_| next.next().map(|i| (i as u64, eps[i].clone())),
            |(i, addr)| {
                let req = req();
                async move {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let reply = self.pool.get(&addr).call(req, left).await?;
                    self.preferred.store(i as usize, Ordering::Relaxed);
                    Ok((reply, true))
                }
            },
        )
        .await;
        match routed {
            Ok((reply, _)) => Ok(reply),
            Err(ClusterError::NoLeader(t)) => Err(ClusterError::NoMember(t)),
            Err(e) => Err(e),
        }
    }
}

fn unexpected_reply(reply: &Reply) -> ClusterError {
    tracing::debug!(?reply, "unexpected reply");
    ClusterError::UnexpectedReply
}

fn read(opts: &ReadOptions) -> Read {
    Read {
        linearizable: opts.consistency == Consistency::Linearizable,
        revision: opts.revision.map(|r| r.0),
    }
}

fn kv(raw: WireKv) -> Result<KeyValue, StoreError> {
    let (key, value, revision) = raw;
    Ok(KeyValue {
        key: Key::from_stored(key).map_err(|e| StoreError::Corrupted(e.to_string()))?,
        value: Value::from(value.into_vec()),
        revision: Revision(revision),
    })
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupted(format!("unexpected answer to {what}"))
}

#[async_trait::async_trait]
impl Writer for RemoteStore {
    fn limits(&self) -> Limits {
        self.inner.limits
    }

    async fn put(&self, key: &Key, value: Value, opts: PutOptions) -> Result<Revision, StoreError> {
        self.limits().check_put(&value, &opts)?;
        let op = ClientOp::Put {
            key: key.as_str().to_owned(),
            value: value.as_bytes().to_vec(),
            ttl: opts.ttl,
        };
        match self.op(op).await? {
            ClientReply::Revision(r) => Ok(Revision(r)),
            _ => Err(corrupt("a put")),
        }
    }

    async fn delete(&self, key: &Key, opts: DeleteOptions) -> Result<Deleted, StoreError> {
        let op = ClientOp::Delete {
            key: key.as_str().to_owned(),
            prefix: opts.prefix,
        };
        match self.op(op).await? {
            ClientReply::Deleted { count, revision } => Ok(Deleted {
                count,
                revision: Revision(revision),
            }),
            _ => Err(corrupt("a delete")),
        }
    }

    async fn get(&self, key: &Key, opts: ReadOptions) -> Result<Option<KeyValue>, StoreError> {
        let op = ClientOp::Get {
            key: key.as_str().to_owned(),
            read: read(&opts),
        };
        match self.op(op).await? {
            ClientReply::Value(v) => v.map(kv).transpose(),
            _ => Err(corrupt("a get")),
        }
    }

    async fn list(&self, prefix: &Prefix, opts: ReadOptions) -> Result<Listing, StoreError> {
        let op = ClientOp::List {
            prefix: prefix.as_str().to_owned(),
            read: read(&opts),
        };
        match self.op(op).await? {
            ClientReply::Listing { revision, values } => Ok(Listing {
                revision: Revision(revision),
                values: values.into_iter().map(kv).collect::<Result<_, _>>()?,
            }),
            _ => Err(corrupt("a list")),
        }
    }

    async fn compare_and_swap(
        &self,
        key: &Key,
        expect: Expect,
        value: Value,
        opts: PutOptions,
    ) -> Result<CasOutcome, StoreError> {
        self.limits().check_put(&value, &opts)?;
        let op = ClientOp::Cas {
            key: key.as_str().to_owned(),
            expect: expected_rev(expect),
            value: value.as_bytes().to_vec(),
            ttl: opts.ttl,
        };
        match self.op(op).await? {
            ClientReply::Swapped(r) => Ok(CasOutcome::Swapped(Revision(r))),
            ClientReply::Conflict(current) => {
                Ok(CasOutcome::Conflict(current.map(kv).transpose()?))
            }
            _ => Err(corrupt("a compare-and-swap")),
        }
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        txn.validate(&self.limits())?;
        let branch = |ops: Vec<TxnOp>| -> Vec<WireTxnOp> {
            ops.into_iter()
                .map(|op| match op {
                    TxnOp::Put { key, value, opts } => WireTxnOp::Put {
                        key: key.as_str().to_owned(),
                        value: value.as_bytes().to_vec(),
                        ttl: opts.ttl,
                    },
                    TxnOp::Delete { key, opts } => WireTxnOp::Delete {
                        key: key.as_str().to_owned(),
                        prefix: opts.prefix,
                    },
                })
                .collect()
        };
        let op = ClientOp::Txn {
            when: txn
                .when
                .iter()
                .map(|(k, e)| (k.as_str().to_owned(), expected_rev(*e)))
                .collect(),
            then: branch(txn.then),
            otherwise: branch(txn.otherwise),
        };
        match self.op(op).await? {
            ClientReply::Txn {
                succeeded,
                revision,
            } => Ok(TxnOutcome {
                succeeded,
                revision: Revision(revision),
            }),
            _ => Err(corrupt("a transaction")),
        }
    }
}

#[async_trait::async_trait]
impl Watcher for RemoteStore {
    async fn watch(
        &self,
        name: &str,
        prefixes: &[Prefix],
        opts: WatchOptions,
    ) -> Result<Watch, StoreError> {
        let reg = Producer::new(name, prefixes);
        let (relay, watch) = relay::channel(&reg, self.inner.source.clone(), opts.queue_capacity);
        let mut up = RemoteWatch {
            store: self.clone(),
            request: (
                name.to_owned(),
                prefixes.iter().map(|p| p.as_str().to_owned()).collect(),
                opts.queue_capacity,
            ),
            reg,
        };
        // The first stream is open, and its resync queued, before `watch` returns.
        let start = match opts.resume {
            // The member replays from its history, or resyncs with its reason: both
            // come through the stream, as any member resync does.
            Some(r) => match up.resumed(r).await? {
                Some(stream) => Start {
                    revision: r,
                    follower: Some(stream),
                    owed: None,
                },
                // No member holds the changes after `r` any more.
                None => Start {
                    revision: r,
                    follower: None,
                    owed: Some(ResyncReason::Compacted),
                },
            },
            None => {
                let first = up.snapshot().await?;
                relay
                    .try_send(Item::Resync(
                        first.revision,
                        ResyncReason::Initial,
                        first.values,
                    ))
                    .map_err(|_| {
                        StoreError::Backend("watch queue refused the first resync".into())
                    })?;
                Start {
                    revision: first.revision,
                    follower: first.follower,
                    owed: None,
                }
            }
        };
        tokio::spawn(resync::drive(up, relay, start));
        Ok(watch)
    }
}

/// One member's watch stream; dropping it closes its connection.
struct Stream {
    _client: Client,
    rx: mpsc::Receiver<Reply>,
}

/// One registration's side of the cluster: a watch stream on one member at a time,
/// moved to another (with a resync) when it breaks.
struct RemoteWatch {
    store: RemoteStore,
    /// Name, prefixes, member-side queue capacity.
    request: (String, Vec<String>, usize),
    reg: Producer,
}

impl RemoteWatch {
    fn request(&self, resume: Option<Revision>) -> Request {
        let (name, prefixes, queue_capacity) = self.request.clone();
        Request::Watch {
            name,
            prefixes,
            queue_capacity,
            resume: resume.map(|r| r.0),
        }
    }

    /// Opens a stream resuming after `r` on the first member that can serve it: what
    /// follows is the member's replay of the changes after `r`, or its resync (with
    /// the reason it could not replay).
    /// `Ok(None)`: no member that answered still holds the changes after `r`.
    async fn resumed(&self, r: Revision) -> Result<Option<Stream>, StoreError> {
        match self.open(Some(r)).await {
            Ok(Opened::Resumed(stream)) => Ok(Some(stream)),
            Ok(Opened::Resync(..)) => Err(corrupt("a resumed watch")),
            Err(StoreError::Compacted { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Opens a stream on the first member that answers (resuming after `resume`, or
    /// from a resync) and waits for its first item; a member that cannot serve now
    /// (no leader heard, a barrier that timed out) passes the watch on to the next.
    async fn open(&self, resume: Option<Revision>) -> Result<Opened, StoreError> {
        let inner = &self.store.inner;
        let eps = &inner.config.endpoints;
        let first = inner.preferred.load(Ordering::Relaxed);
        let mut last_err = None;
        // A member that no longer holds the changes to replay (it installed a
        // snapshot): another may; if none does, the watch resyncs as compacted.
        let mut compacted = None;
        for attempt in 0..eps.len() {
            let i = (first + attempt) % eps.len();
            let client = Client::new(
                eps[i].clone(),
                inner.config.secret.clone(),
                None,
                inner.config.net.clone(),
            );
            let mut rx = match client
                .stream(self.request(resume), inner.config.timeout)
                .await
            {
                Ok(rx) => rx,
                Err(e) => {
                    last_err = Some(StoreError::from(ClusterError::Net(e)));
                    continue;
                }
            };
            let first_item = tokio::time::timeout(inner.config.timeout, rx.recv()).await;
            match first_item {
                Ok(Some(Reply::Watch(WireItem::Resumed))) if resume.is_some() => {
                    return Ok(Opened::Resumed(Stream {
                        _client: client,
                        rx,
                    }));
                }
                Ok(Some(Reply::Watch(WireItem::Resync {
                    revision, prefixes, ..
                }))) if resume.is_none() => {
                    let values = prefix_values(prefixes)?;
                    let stream = Stream {
                        _client: client,
                        rx,
                    };
                    return Ok(Opened::Resync(Revision(revision), values, stream));
                }
                Ok(Some(Reply::Watch(WireItem::Failed(WireError::Stopped)))) | Ok(None) => {
                    last_err = Some(StoreError::Unavailable(
                        format!("member {} ended the watch", eps[i]).into(),
                    ));
                }
                // A member that cannot serve now (no leader heard, a barrier that timed
                // out): another may.
                Ok(Some(Reply::Watch(WireItem::Failed(
                    e @ (WireError::Unavailable(_) | WireError::Timeout(_)),
                )))) => last_err = Some(StoreError::from(e)),
                Ok(Some(Reply::Watch(WireItem::Failed(e @ WireError::Compacted { .. }))))
                    if resume.is_some() =>
                {
                    compacted = Some(StoreError::from(e));
                }
                Ok(Some(Reply::Watch(WireItem::Failed(e)))) => return Err(StoreError::from(e)),
                Ok(Some(_)) => return Err(corrupt("a watch")),
                Err(_) => last_err = Some(StoreError::Timeout(inner.config.timeout)),
            }
        }
        Err(compacted
            .or(last_err)
            .unwrap_or(StoreError::Unavailable("no member to watch on".into())))
    }
}

/// A member's stream, open: resumed, or with its first resync.
enum Opened {
    Resumed(Stream),
    Resync(Revision, Vec<PrefixValues>, Stream),
}

#[async_trait::async_trait]
impl Upstream for RemoteWatch {
    type Follower = Stream;
    // Not after a break: a revision names no store, and the cluster may have been
    // restored from a backup and written past it meanwhile (a replay would then follow
    // another history). Another member resyncs. Only a consumer's own
    // `WatchOptions::resume` asks a member to replay.
    const RESUMES: bool = false;

    fn rescope(&mut self, prefixes: PrefixSet) {
        self.request.1 = prefixes
            .prefixes()
            .iter()
            .map(|p| p.as_str().to_owned())
            .collect();
    }

    /// Opens a stream on the first member that answers and waits for its resync.
    async fn snapshot(&mut self) -> Result<Snapshot<Stream>, StoreError> {
        match self.open(None).await? {
            Opened::Resync(revision, values, stream) => Ok(Snapshot {
                revision,
                values,
                follower: Some(stream),
            }),
            Opened::Resumed(_) => Err(corrupt("a watch")),
        }
    }

    async fn resume(&mut self, _from: Revision) -> Result<Stream, Lost> {
        Err(Lost::Resync(ResyncReason::Reconnect))
    }

    async fn next(&mut self, stream: &mut Stream, _last: Revision) -> Result<Next, Lost> {
        let item = match stream.rx.recv().await {
            Some(Reply::Watch(item)) => item,
            None => {
                tracing::debug!(registration = self.reg.name(), "remote watch stream broke");
                return Err(Lost::Resync(ResyncReason::Reconnect));
            }
            Some(_) => return Err(Lost::Resync(ResyncReason::Reconnect)),
        };
        match item {
            WireItem::Change { revision, changes } => key_changes(changes)
                .map(|c| Next::Change(Revision(revision), c))
                .map_err(Lost::Broken),
            WireItem::Resync {
                revision,
                reason,
                prefixes,
            } => prefix_values(prefixes)
                .map(|values| Next::Resync(Revision(revision), reason, values))
                .map_err(Lost::Broken),
            WireItem::Interrupted(e) => Ok(Next::Interrupted(StoreError::from(e))),
            // The member cannot serve the watch any longer (it hears from no leader):
            // another member resyncs it, with no error to the consumer.
            WireItem::Failed(WireError::Unavailable(e)) => {
                tracing::debug!(registration = self.reg.name(), error = %e, "the member ended the watch");
                Err(Lost::Resync(ResyncReason::Reconnect))
            }
            WireItem::Failed(e) => Err(Lost::Broken(StoreError::from(e))),
            WireItem::Resumed => Err(Lost::Broken(corrupt("a watch item"))),
        }
    }
}

fn prefix_values(raw: Vec<(String, Vec<WireKv>)>) -> Result<Vec<PrefixValues>, StoreError> {
    raw.into_iter()
        .map(|(prefix, values)| {
            Ok(PrefixValues {
                prefix: Prefix::new(prefix).map_err(|e| StoreError::Corrupted(e.to_string()))?,
                values: values.into_iter().map(kv).collect::<Result<_, _>>()?,
            })
        })
        .collect()
}

fn key_changes(raw: Vec<WireChange>) -> Result<Vec<KeyChange>, StoreError> {
    raw.into_iter()
        .map(|(key, delete, value, prev)| {
            Ok(KeyChange {
                key: Key::from_stored(key).map_err(|e| StoreError::Corrupted(e.to_string()))?,
                op: if delete { Op::Delete } else { Op::Put },
                value: value.map(|v| Value::from(v.into_vec())),
                prev: prev.map(|v| Value::from(v.into_vec())),
            })
        })
        .collect()
}

// Errors and reasons on the wire.

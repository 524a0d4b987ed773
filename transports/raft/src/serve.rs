//! The member's side of the client protocol: a remote client's operations and watches,
//! served on this member's store.

use std::time::Duration;

use datasync::{
    CasOutcome, Consistency, DeleteOptions, Event, Key, KeyValue, Op, Prefix, PutOptions,
    ReadOptions, Revision, Txn, TxnOp, Value, WatchError, WatchOptions, Watcher, Writer,
};

use crate::cluster::ClientService;
use crate::network::server::Replies;
use crate::network::wire::{
    ClientOp, ClientReply, Read, Reply, WireError, WireItem, WireKv, WireTxnOp,
};
use crate::store::{RaftStore, WeakStore};
use crate::types::{RequestId, expect_of};
use futures_util::StreamExt;

#[async_trait::async_trait]
impl ClientService for WeakStore {
    async fn op(&self, op: ClientOp, id: Option<RequestId>) -> Result<ClientReply, WireError> {
        match self.upgrade() {
            Some(store) => serve_op(&store, op, id).await,
            None => Err(WireError::Stopped),
        }
    }

    async fn watch(
        &self,
        name: String,
        prefixes: Vec<String>,
        queue_capacity: usize,
        resume: Option<u64>,
        out: Replies,
    ) {
        match self.upgrade() {
            Some(store) => serve_watch(store, (name, prefixes, queue_capacity, resume), out).await,
            None => {
                out.send(Reply::Watch(WireItem::Failed(WireError::Stopped)))
                    .await;
            }
        }
    }

    fn members(&self) -> Option<crate::members::Members> {
        self.upgrade().map(|s| s.members())
    }
}

/// The largest backup a member sends: a frame, less room for the reply around it.
const BACKUP_LIMIT: usize = crate::network::frame::MAX_FRAME - (1 << 20);

/// Runs a remote client's operation on this member's store.
async fn serve_op(
    store: &RaftStore,
    op: ClientOp,
    id: Option<RequestId>,
) -> Result<ClientReply, WireError> {
    // A member that left, or that hears from no leader (cut off, or removed without
    // knowing it: its replica only ages), serves no clients: they go on to another
    // endpoint, as from a member that is stopping.
    // Its limits it still tells (a client connecting to it alone learns them).
    let leaderless = !matches!(op, ClientOp::Limits) && !store.hears_leader();
    if store.has_left() || leaderless {
        return Err(WireError::Stopped);
    }
    // The log's rule: a key stored under the older one can be read and deleted by
    // name (clients build new keys with `Key::new`).
    let key = |k: String| Key::from_stored(k).map_err(WireError::from);
    let put_opts = |ttl: Option<Duration>| match ttl {
        Some(t) => PutOptions::new().ttl(t),
        None => PutOptions::new(),
    };
    let delete_opts = |prefix: bool| match prefix {
        true => DeleteOptions::new().prefix(),
        false => DeleteOptions::new(),
    };
    let read_opts = |r: Read| {
        let c = if r.linearizable {
            Consistency::Linearizable
        } else {
            Consistency::Local
        };
        let opts = ReadOptions::new().consistency(c);
        match r.revision {
            Some(rev) => opts.at(Revision(rev)),
            None => opts,
        }
    };
    let reply = match op {
        ClientOp::Put { key: k, value, ttl } => store
            .put_as(&key(k)?, Value::from(value), put_opts(ttl), id)
            .await
            .map(|r| ClientReply::Revision(r.0)),
        ClientOp::Delete { key: k, prefix } => store
            .delete_as(&key(k)?, delete_opts(prefix), id)
            .await
            .map(|d| ClientReply::Deleted {
                count: d.count,
                revision: d.revision.0,
            }),
        ClientOp::Get { key: k, read } => store
            .get(&key(k)?, read_opts(read))
            .await
            .map(|v| ClientReply::Value(v.as_ref().map(wire_kv))),
        ClientOp::List { prefix, read } => {
            let prefix = Prefix::new(prefix).map_err(WireError::from)?;
            store
                .list(&prefix, read_opts(read))
                .await
                .map(|l| ClientReply::Listing {
                    revision: l.revision.0,
                    values: l.values.iter().map(wire_kv).collect(),
                })
        }
        ClientOp::Cas {
            key: k,
            expect,
            value,
            ttl,
        } => {
            let expect = expect_of(expect);
            store
                .compare_and_swap_as(&key(k)?, expect, Value::from(value), put_opts(ttl), id)
                .await
                .map(|o| match o {
                    CasOutcome::Swapped(r) => ClientReply::Swapped(r.0),
                    CasOutcome::Conflict(c) => ClientReply::Conflict(c.as_ref().map(wire_kv)),
                })
        }
        ClientOp::Txn {
            when,
            then,
            otherwise,
        } => {
            // Refused before anything is built from a hostile count.
            let most = when.len().max(then.len()).max(otherwise.len());
            if most > datasync::MAX_TXN_OPS {
                return Err(WireError::InvalidTxn(format!(
                    "{most} conditions or writes in a branch: at most {}",
                    datasync::MAX_TXN_OPS
                )));
            }
            let branch = |ops: Vec<WireTxnOp>| -> Result<Vec<TxnOp>, WireError> {
                ops.into_iter()
                    .map(|op| {
                        Ok(match op {
                            WireTxnOp::Put { key: k, value, ttl } => TxnOp::Put {
                                key: key(k)?,
                                value: Value::from(value),
                                opts: put_opts(ttl),
                            },
                            WireTxnOp::Delete { key: k, prefix } => TxnOp::Delete {
                                key: key(k)?,
                                opts: delete_opts(prefix),
                            },
                        })
                    })
                    .collect()
            };
            let mut txn = Txn::new();
            for (k, rev) in when {
                txn = txn.when(&key(k)?, expect_of(rev));
            }
            txn.then = branch(then)?;
            txn.otherwise = branch(otherwise)?;
            store.txn_as(txn, id).await.map(|o| ClientReply::Txn {
                succeeded: o.succeeded,
                revision: o.revision.0,
            })
        }
        ClientOp::Backup => match store.backup().await {
            // The whole file goes in one frame: say so rather than fail the frame.
            Ok(file) if file.len() > BACKUP_LIMIT => Err(datasync::StoreError::Backend(Box::new(
                crate::backup::TooLarge {
                    bytes: file.len() as u64,
                    limit: BACKUP_LIMIT as u64,
                },
            ))),
            other => other.map(ClientReply::Backup),
        },
        ClientOp::Limits => Ok(ClientReply::Limits {
            max_value_size: store.limits().max_value_size,
        }),
    };
    reply.map_err(WireError::from)
}

/// Streams a watch on this member's replica to a remote client until it goes away.
async fn serve_watch(
    store: RaftStore,
    (name, prefixes, queue_capacity, resume): (String, Vec<String>, usize, Option<u64>),
    out: Replies,
) {
    // The store is let go once the watch runs: a remote watch must not keep a member
    // that is being shut down alive.
    let weak = store.downgrade();
    let leaderless = |store: &RaftStore| {
        WireError::Unavailable(format!(
            "member {} hears from no leader: its replica may be behind",
            store.node_id()
        ))
    };
    let started = async move {
        // A member that left serves no watch: the client goes on to another.
        if store.has_left() {
            return Err(WireError::Stopped);
        }
        if !store.hears_leader() {
            return Err(leaderless(&store));
        }
        let prefixes = prefixes
            .into_iter()
            .map(Prefix::new)
            .collect::<Result<Vec<_>, _>>()
            .map_err(WireError::from)?;
        // Catch up with the leader's commit first: never older than what the client saw.
        store
            .read_barrier(&ReadOptions::new())
            .await
            .map_err(WireError::from)?;
        // A member whose history no longer holds the changes after `r` (it installed
        // a snapshot) passes the watch on: another may still replay them.
        if let Some(r) = resume {
            let oldest = store.oldest_watchable();
            if r.saturating_add(1) < oldest {
                return Err(WireError::Compacted {
                    requested: r.saturating_add(1),
                    compacted: oldest - 1,
                });
            }
        }
        let mut opts = WatchOptions::default().queue_capacity(queue_capacity);
        opts.resume = resume.map(Revision);
        store
            .watch(&name, &prefixes, opts)
            .await
            .map_err(WireError::from)
    };
    let mut watch = match started.await {
        Ok(w) => w,
        Err(e) => {
            out.send(Reply::Watch(WireItem::Failed(e))).await;
            return;
        }
    };
    // A replay may say nothing for long: the client learns the watch is on.
    if resume.is_some() && !out.send(Reply::Watch(WireItem::Resumed)).await {
        return;
    }
    // A member that stops hearing from a leader ends its watches (see
    // `Node::hears_leader`): the client resyncs from another member.
    let mut check = tokio::time::interval(Duration::from_secs(1));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let ev = tokio::select! {
            _ = out.closed() => return,
            ev = watch.next() => ev,
            _ = check.tick() => {
                // The store is not held across the send (a client that stopped reading
                // must not keep a stopping member alive).
                let gone = match weak.upgrade() {
                    Some(store) if !store.hears_leader() => leaderless(&store),
                    _ => continue,
                };
                out.send(Reply::Watch(WireItem::Failed(gone))).await;
                return;
            }
        };
        let (item, done) = match ev {
            None => (WireItem::Failed(WireError::Stopped), None),
            Some(Ok(Event::Resync(r))) => {
                let prefixes = r
                    .prefixes
                    .iter()
                    .map(|p| {
                        (
                            p.prefix.as_str().to_owned(),
                            p.values.iter().map(wire_kv).collect(),
                        )
                    })
                    .collect();
                let item = WireItem::Resync {
                    revision: r.revision.0,
                    reason: r.reason,
                    prefixes,
                };
                (item, Some(r.done))
            }
            Some(Ok(Event::Change(c))) => {
                let changes = c
                    .changes
                    .iter()
                    .map(|k| {
                        let bytes = |v: &Value| serde_bytes::ByteBuf::from(v.as_bytes().to_vec());
                        let value = k.value.as_ref().map(bytes);
                        let prev = k.prev.as_ref().map(bytes);
                        (k.key.as_str().to_owned(), k.op == Op::Delete, value, prev)
                    })
                    .collect();
                let item = WireItem::Change {
                    revision: c.revision.0,
                    changes,
                };
                (item, Some(c.done))
            }
            Some(Ok(_)) => continue,
            Some(Err(WatchError::Interrupted(e))) => {
                (WireItem::Interrupted(WireError::from(e)), None)
            }
            Some(Err(WatchError::Stopped(e))) => (WireItem::Failed(e.into()), None),
            Some(Err(e)) => (WireItem::Failed(WireError::Backend(e.to_string())), None),
        };
        let last = matches!(item, WireItem::Failed(_));
        if !out.send(Reply::Watch(item)).await || last {
            return;
        }
        // Handed on: the remote consumer answers its own Done.
        if let Some(done) = done {
            done.ok();
        }
    }
}

fn wire_kv(kv: &KeyValue) -> WireKv {
    (
        kv.key.as_str().to_owned(),
        serde_bytes::ByteBuf::from(kv.value.as_bytes().to_vec()),
        kv.revision.0,
    )
}

//! Watch registrations: a resync at R, then the same consumer's messages from R+1.
//!
//! Each registration runs one task ([`datasync::transport::resync::drive`], which owns the
//! recovery loop) over one consumer covering all its prefixes; this module is its
//! [`Upstream`]: the snapshot and consumer, and what each message means. Previous values come
//! from a per-registration cache of the watched keys, seeded by each resync (NATS sends
//! no previous value).
//!
//! Continuity, case by case: any lost message (a consumer-sequence jump, a heartbeat
//! naming a message we did not get), a silent consumer (server restarted, network
//! lost), or the server ending the consumer, is a resync (`Reconnect`) on a new
//! consumer, after an `Interrupted` item. NATS cannot replay what a bucket no longer
//! keeps, so resuming from the last sequence could skip versions: a resync is the only
//! honest answer. A full queue drops the consumer and resyncs (`Overflow`) once the
//! consumer has made room; a requested resync is served once the consumer has taken
//! what was queued, so requests made until then coalesce.

use datasync::transport::Producer;
use std::collections::BTreeMap;

use datasync::transport::relay::{self, Item};
use datasync::transport::resync::{self, Lost, Next, Snapshot, Start, Upstream};
use datasync::{
    Key, KeyChange, KeyValue, Op, Prefix, PrefixSet, ResyncReason, Revision, StoreError, Value,
    Watch, WatchOptions, Watcher,
};

use crate::NatsStore;
use crate::consumer::{Consumer, Record, RecordOp};

pub(crate) async fn start(
    store: NatsStore,
    name: &str,
    prefixes: &[Prefix],
    opts: WatchOptions,
) -> Result<Watch, StoreError> {
    let reg = Producer::new(name, prefixes);
    let set = PrefixSet::new(prefixes.iter().cloned());
    let (state, consumer) = store.snapshot(&set).await?;
    let (relay, watch) = relay::channel(&reg, store.inner.source.clone(), opts.queue_capacity);
    relay
        .try_send(Item::Resync(
            state.revision,
            ResyncReason::Initial,
            state.grouped(&set),
        ))
        .map_err(|_| StoreError::Backend("watch queue refused the first resync".into()))?;
    let up = NatsWatch {
        store,
        set,
        reg,
        cache: state.values,
    };
    let start = Start {
        revision: state.revision,
        follower: consumer,
        owed: None,
    };
    tokio::spawn(resync::drive(up, relay, start));
    Ok(watch)
}

/// One registration's side of the bucket: a consumer of its subjects, and the watched
/// keys' values for previous values.
struct NatsWatch {
    store: NatsStore,
    set: PrefixSet,
    reg: Producer,
    /// The watched keys' current values, for previous values: the resync's own map
    /// (so a resync costs no second copy of the state).
    cache: BTreeMap<Key, KeyValue>,
}

#[async_trait::async_trait]
impl Upstream for NatsWatch {
    type Follower = Consumer;
    // A bucket keeps only some versions: resuming from the last sequence could skip
    // some, so any loss is a resync.
    const RESUMES: bool = false;

    fn idle(&self) -> bool {
        self.set.is_empty()
    }

    fn rescope(&mut self, prefixes: PrefixSet) {
        self.set = prefixes;
    }

    async fn snapshot(&mut self) -> Result<Snapshot<Consumer>, StoreError> {
        let (state, consumer) = self.store.snapshot(&self.set).await?;
        let values = state.grouped(&self.set);
        self.cache = state.values;
        Ok(Snapshot {
            revision: state.revision,
            values,
            follower: consumer,
        })
    }

    async fn resume(&mut self, _from: Revision) -> Result<Consumer, Lost> {
        Err(Lost::Resync(ResyncReason::Reconnect))
    }

    async fn next(&mut self, consumer: &mut Consumer, last: Revision) -> Result<Next, Lost> {
        match consumer.next().await {
            Ok(rec) => self.change(rec, last),
            Err(lost) => Err(Lost::Broken(lost.into())),
        }
    }
}

impl NatsWatch {
    /// The change of one message, if it is one for this registration.
    fn change(&mut self, rec: Record, last: Revision) -> Result<Next, Lost> {
        let rev = Revision(rec.seq);
        if rev <= last {
            // Older than the resync: the hand-off was not what it must be.
            return Err(Lost::Broken(StoreError::Unavailable(
                format!("message {rev} at or before the resync at {last}").into(),
            )));
        }
        let Some(key) = rec.key.filter(|k| self.set.matches(k.as_str())) else {
            return Ok(Next::Progress(rev));
        };
        let change = match rec.op {
            RecordOp::Put => {
                let value = Value::from(rec.value);
                let kv = KeyValue {
                    key: key.clone(),
                    value: value.clone(),
                    revision: rev,
                };
                let prev = self.cache.insert(key.clone(), kv).map(|kv| kv.value);
                KeyChange {
                    key,
                    op: Op::Put,
                    value: Some(value),
                    prev,
                }
            }
            RecordOp::Delete => match self.cache.remove(&key) {
                // A delete of an absent key is no change.
                None => return Ok(Next::Progress(rev)),
                Some(prev) => KeyChange {
                    key,
                    op: Op::Delete,
                    value: None,
                    prev: Some(prev.value),
                },
            },
        };
        tracing::trace!(registration = self.reg.name(), %rev, "change");
        Ok(Next::Change(rev, vec![change]))
    }
}

#[async_trait::async_trait]
impl Watcher for NatsStore {
    async fn watch(
        &self,
        name: &str,
        prefixes: &[Prefix],
        opts: WatchOptions,
    ) -> Result<Watch, StoreError> {
        start(self.clone(), name, prefixes, opts).await
    }
}

//! Watch registrations: a resync at R, then the same consumer's messages from R+1.
//!
//! Each registration runs one task that owns one consumer covering all its prefixes and
//! feeds the registration's bounded queue ([`datasync::relay`]). Previous values come
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

use std::collections::BTreeMap;
use std::time::Duration;

use datasync::relay::{self, Item, Relay};
use datasync::{
    Key, KeyChange, KeyValue, Op, Prefix, PrefixSet, Registration, ResyncReason, Revision,
    StoreError, Value, Watch, WatchOptions,
};

use crate::NatsStore;
use crate::consumer::{Consumer, Record, RecordOp};

pub(crate) async fn start(
    store: NatsStore,
    name: &str,
    prefixes: &[Prefix],
    opts: WatchOptions,
) -> Result<Watch, StoreError> {
    let reg = Registration::new(name);
    let set = PrefixSet::new(prefixes.iter().cloned());
    let (state, consumer) = store.snapshot(&set).await?;
    let (relay, watch) = relay::channel(&reg, store.inner.source.clone(), opts.queue_capacity);
    let mut task = Task {
        store,
        set,
        reg,
        relay,
        last: state.revision,
        cache: BTreeMap::new(),
        consumer,
    };
    task.relay
        .try_send(Item::Resync(
            state.revision,
            ResyncReason::Initial,
            state.grouped(&task.set),
        ))
        .map_err(|_| StoreError::Backend("watch queue refused the first resync".into()))?;
    task.cache = state.values;
    tokio::spawn(task.run());
    Ok(watch)
}

struct Task {
    store: NatsStore,
    set: PrefixSet,
    reg: Registration,
    relay: Relay,
    /// The revision of the consumer's state.
    last: Revision,
    /// The watched keys' current values, for previous values: the resync's own map
    /// (so a resync costs no second copy of the state).
    cache: BTreeMap<Key, KeyValue>,
    /// `None` when the registration watches no prefix.
    consumer: Option<Consumer>,
}

/// How following the consumer ended.
enum Flow {
    Closed,
    Resync(ResyncReason),
    Broken(StoreError),
}

impl Task {
    async fn run(mut self) {
        let mut pause = Duration::from_millis(50);
        loop {
            let reason = match self.follow().await {
                Flow::Closed => return,
                Flow::Resync(reason) => reason,
                Flow::Broken(e) => {
                    tracing::warn!(registration = self.reg.name(), error = %e, "NATS watch lost continuity; resyncing");
                    let _ = self.relay.try_send(Item::Interrupted(e));
                    ResyncReason::Reconnect
                }
            };
            // Release the old consumer before reading anew.
            self.consumer = None;
            loop {
                // Wait for room first, so the snapshot is fresh when it is delivered.
                let Some(permit) = self.relay.reserve().await else {
                    return;
                };
                self.reg.take_resync_request();
                match self.store.snapshot(&self.set).await {
                    Ok((state, consumer)) => {
                        tracing::debug!(registration = self.reg.name(), ?reason, revision = %state.revision, "resync");
                        self.last = state.revision;
                        self.consumer = consumer;
                        permit.send(Item::Resync(
                            state.revision,
                            reason,
                            state.grouped(&self.set),
                        ));
                        self.cache = state.values;
                        pause = Duration::from_millis(50);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(registration = self.reg.name(), error = %e, "resync failed; retrying");
                        permit.send(Item::Interrupted(e));
                        tokio::select! {
                            _ = self.reg.closed() => return,
                            _ = tokio::time::sleep(pause) => {}
                        }
                        pause = (pause * 2).min(Duration::from_secs(2));
                    }
                }
            }
        }
    }

    /// Delivers the consumer's messages until something ends it.
    async fn follow(&mut self) -> Flow {
        let Some(mut consumer) = self.consumer.take() else {
            // Nothing to watch: wait for a close or a request.
            return tokio::select! {
                _ = self.reg.closed() => Flow::Closed,
                _ = self.relay.requested() => Flow::Resync(ResyncReason::Requested),
            };
        };
        // The close and request futures live across messages (not made per message).
        let reg = self.reg.clone();
        let closed = reg.closed();
        tokio::pin!(closed);
        let flow = loop {
            let rec = {
                let requested = self.relay.requested();
                tokio::pin!(requested);
                tokio::select! {
                    biased;
                    _ = &mut closed => break Flow::Closed,
                    _ = &mut requested => break Flow::Resync(ResyncReason::Requested),
                    rec = consumer.next() => match rec {
                        Ok(rec) => rec,
                        Err(lost) => break Flow::Broken(lost.into()),
                    },
                }
            };
            if let Err(flow) = self.deliver(rec) {
                break flow;
            }
        };
        self.consumer = Some(consumer);
        flow
    }

    /// Queues the change of one message, if it is one for this registration.
    fn deliver(&mut self, rec: Record) -> Result<(), Flow> {
        let rev = Revision(rec.seq);
        if rev <= self.last {
            // Older than the resync: the hand-off was not what it must be.
            return Err(Flow::Broken(StoreError::Unavailable(
                format!("message {rev} at or before the resync at {}", self.last).into(),
            )));
        }
        self.last = rev;
        let Some(key) = rec.key.filter(|k| self.set.matches(k.as_str())) else {
            return Ok(());
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
                None => return Ok(()),
                Some(prev) => KeyChange {
                    key,
                    op: Op::Delete,
                    value: None,
                    prev: Some(prev.value),
                },
            },
        };
        if self
            .relay
            .try_send(Item::Change(rev, vec![change]))
            .is_err()
        {
            if self.reg.is_closed() {
                return Err(Flow::Closed);
            }
            tracing::debug!(registration = self.reg.name(), "queue full: resync follows");
            return Err(Flow::Resync(ResyncReason::Overflow));
        }
        Ok(())
    }
}

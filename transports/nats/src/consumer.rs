//! One push consumer on the bucket's stream, read with gap detection.
//!
//! Why not async-nats's KV `Watch`: it sits on an *ordered* consumer, which re-creates
//! itself after a reconnect or a missed message from the last stream sequence it saw.
//! A bucket keeps only the last `history` versions of a key, so versions written while
//! the consumer was gone may have been replaced already: the re-created consumer skips
//! them and the watcher's previous values go wrong, silently. Here every lost message is
//! detected instead (consumer sequences must be consecutive, heartbeats must arrive and
//! must name the last message we received), and the caller turns it into a resync.

use std::pin::Pin;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, ReplayPolicy, push};
use async_nats::{HeaderMap, StatusCode};
use bytes::Bytes;
use datasync::{Key, StoreError};
use futures_util::StreamExt;
use tokio::time::{Instant, Sleep};

use std::sync::Arc;

use crate::bucket::Bucket;
use crate::keys;

/// The heartbeat header naming the flow-control reply a stalled consumer waits for.
const STALLED: &str = "Nats-Consumer-Stalled";

#[cfg(feature = "testing")]
use crate::testing;

/// How often an idle consumer sends a heartbeat.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// Silence after which a consumer is taken for lost.
const SILENCE: Duration = Duration::from_secs(4);

/// What a record does to its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RecordOp {
    Put,
    Delete,
}

/// One message of the bucket's stream.
#[derive(Debug)]
pub(crate) struct Record {
    /// Stream sequence: the revision.
    pub(crate) seq: u64,
    /// The datasync key, `None` for a subject that is not the mapping of one.
    pub(crate) key: Option<Key>,
    pub(crate) op: RecordOp,
    pub(crate) value: Bytes,
    /// The message replaced the subject's earlier versions (a rollup, purge or
    /// expiry marker): nothing older is kept.
    pub(crate) truncates: bool,
}

/// Continuity was lost.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum Lost {
    #[error("consumer sequence jumped from {0} to {1}: messages were lost")]
    Jump(u64, u64),
    #[error("no message or heartbeat from the consumer for {0:?}")]
    Silent(Duration),
    #[error("the server ended the consumer ({0})")]
    Ended(String),
    #[error("the subscription ended")]
    Unsubscribed,
    #[error("malformed delivery: {0}")]
    Malformed(&'static str),
}

impl From<Lost> for StoreError {
    fn from(l: Lost) -> Self {
        StoreError::Unavailable(Box::new(l))
    }
}

/// A push consumer with AckPolicy::None on the bucket's stream; deleted on drop.
#[derive(Debug)]
pub(crate) struct Consumer {
    bucket: Arc<Bucket>,
    name: String,
    sub: async_nats::Subscriber,
    /// Consumer sequence of the last message received.
    cseq: u64,
    /// When the last message (or heartbeat) arrived.
    heard: Instant,
    /// Wakes us to check for silence; re-armed lazily, not per message.
    silence: Pin<Box<Sleep>>,
    /// Reused by key decoding.
    scratch: Vec<u8>,
}

impl Consumer {
    /// Creates a consumer of `filters` (below the bucket's subject prefix); returns it and
    /// how many messages it had to deliver when created.
    pub(crate) async fn open(
        bucket: &Arc<Bucket>,
        filters: &[String],
        policy: DeliverPolicy,
    ) -> Result<(Consumer, u64), StoreError> {
        let inbox = bucket.client.new_inbox();
        // Subscribe first: nothing the consumer pushes can precede our interest.
        let sub = bucket
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| bucket.classify(e))?;
        let mut subjects: Vec<String> = filters
            .iter()
            .map(|f| format!("{}{f}", bucket.subject_prefix))
            .collect();
        let (filter_subject, filter_subjects) = if subjects.len() == 1 {
            (subjects.pop().unwrap_or_default(), Vec::new())
        } else {
            (String::new(), subjects)
        };
        let config = push::Config {
            deliver_subject: inbox,
            deliver_policy: policy,
            ack_policy: AckPolicy::None,
            replay_policy: ReplayPolicy::Instant,
            filter_subject,
            filter_subjects,
            flow_control: true,
            idle_heartbeat: HEARTBEAT,
            // Released by the server if we vanish without deleting it.
            inactive_threshold: Duration::from_secs(10),
            memory_storage: true,
            num_replicas: 1,
            ..Default::default()
        };
        let consumer = bucket
            .timed(bucket.stream.create_consumer(config))
            .await?
            .map_err(|e| bucket.classify(e))?;
        let info = consumer.cached_info();
        Ok((
            Consumer {
                bucket: bucket.clone(),
                name: info.name.clone(),
                sub,
                cseq: 0,
                heard: Instant::now(),
                silence: Box::pin(tokio::time::sleep(SILENCE)),
                scratch: Vec::new(),
            },
            info.num_pending,
        ))
    }

    /// Answers a flow-control request (or a stall) on `reply`.
    fn answer_flow_control(&self, reply: String) {
        #[cfg(feature = "testing")]
        if testing::drop_flow_control() {
            return;
        }
        let client = self.bucket.client.clone();
        tokio::spawn(async move {
            let _ = client.publish(reply, Bytes::new()).await;
        });
    }

    /// The next record. An error means continuity is lost: drop this consumer.
    ///
    /// # Cancel safety
    /// Cancel safe: a record is consumed only when returned.
    pub(crate) async fn next(&mut self) -> Result<Record, Lost> {
        loop {
            let msg = tokio::select! {
                biased;
                msg = self.sub.next() => msg,
                _ = &mut self.silence => {
                    let deadline = self.heard + SILENCE;
                    if Instant::now() >= deadline {
                        return Err(Lost::Silent(SILENCE));
                    }
                    self.silence.as_mut().reset(deadline);
                    continue;
                }
            };
            let Some(msg) = msg else {
                return Err(Lost::Unsubscribed);
            };
            self.heard = Instant::now();
            match msg.status {
                None => {}
                Some(StatusCode::IDLE_HEARTBEAT) => {
                    // A heartbeat naming a stalled consumer: the server still waits for
                    // the answer to a flow-control request (lost, or never sent) and
                    // delivers nothing until it comes, while heartbeats keep coming.
                    let stalled = msg
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(STALLED))
                        .map(|v| v.as_str().to_owned());
                    if let Some(reply) = msg.reply.map(|r| r.to_string()).or(stalled) {
                        // Flow control: the server waits for this answer.
                        self.answer_flow_control(reply);
                    }
                    if let Some(last) = last_consumer(msg.headers.as_ref()) {
                        if last > self.cseq {
                            return Err(Lost::Jump(self.cseq, last));
                        }
                    }
                    continue;
                }
                Some(status) => {
                    let why = msg.description.unwrap_or_else(|| status.to_string());
                    return Err(Lost::Ended(why));
                }
            }
            let reply = msg
                .reply
                .as_deref()
                .ok_or(Lost::Malformed("no reply subject"))?;
            let (seq, cseq) = parse_reply(reply).ok_or(Lost::Malformed("bad reply subject"))?;
            if cseq != self.cseq + 1 {
                return Err(Lost::Jump(self.cseq, cseq));
            }
            self.cseq = cseq;
            let subject = msg.subject.as_str();
            let key = subject
                .strip_prefix(&self.bucket.subject_prefix)
                .and_then(|k| {
                    let key = keys::decode_with(k, &mut self.scratch);
                    if key.is_none() {
                        tracing::warn!(subject, "skipping a NATS key datasync cannot represent");
                    }
                    key
                });
            let (op, truncates) = kind(msg.headers.as_ref());
            return Ok(Record {
                seq,
                key,
                op,
                value: msg.payload,
                truncates,
            });
        }
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        // Release it on the server now; `inactive_threshold` is the backstop.
        let bucket = self.bucket.clone();
        let name = std::mem::take(&mut self.name);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = bucket.timed(bucket.stream.delete_consumer(&name)).await;
            });
        }
    }
}

/// What a message does, from its headers: a KV delete, purge or server marker deletes
/// the key; purges, markers and rollups replace the subject's history.
pub(crate) fn kind(headers: Option<&HeaderMap>) -> (RecordOp, bool) {
    let Some(h) = headers else {
        return (RecordOp::Put, false);
    };
    let rollup = h.get("Nats-Rollup").is_some();
    match h.get("KV-Operation").map(|v| v.as_str()) {
        Some("DEL") => return (RecordOp::Delete, rollup),
        Some("PURGE") => return (RecordOp::Delete, true),
        _ => {}
    }
    if h.get("Nats-Marker-Reason").is_some() {
        return (RecordOp::Delete, true);
    }
    (RecordOp::Put, rollup)
}

fn last_consumer(headers: Option<&HeaderMap>) -> Option<u64> {
    headers?.get("Nats-Last-Consumer")?.as_str().parse().ok()
}

/// Stream and consumer sequence from a JetStream ack subject: `$JS.ACK.` then
/// `<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>` (7 tokens), or with
/// `<domain>.<account hash>.` in front (9 or more).
pub(crate) fn parse_reply(reply: &str) -> Option<(u64, u64)> {
    let rest = reply.strip_prefix("$JS.ACK.")?;
    let mut tokens: [&str; 9] = [""; 9];
    let mut n = 0;
    for t in rest.split('.') {
        if n < tokens.len() {
            tokens[n] = t;
        }
        n += 1;
    }
    let base = match n {
        7 => 0,
        n if n >= 9 => 2,
        _ => return None,
    };
    let seq = tokens[base + 3].parse().ok()?;
    let cseq = tokens[base + 4].parse().ok()?;
    Some((seq, cseq))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_ack_subject_formats() {
        assert_eq!(
            parse_reply("$JS.ACK.KV_b.c1.1.42.7.1790230470084404000.3"),
            Some((42, 7))
        );
        assert_eq!(
            parse_reply("$JS.ACK._.ACC.KV_b.c1.1.42.7.1790230470084404000.3.tok"),
            Some((42, 7))
        );
        assert_eq!(parse_reply("$JS.ACK.KV_b.c1.1.x.7.1.3"), None);
        assert_eq!(parse_reply("_INBOX.abc"), None);
    }

    #[test]
    fn headers_tell_the_operation() {
        let mut h = HeaderMap::new();
        assert_eq!(kind(None), (RecordOp::Put, false));
        assert_eq!(kind(Some(&h)), (RecordOp::Put, false));
        h.insert("Nats-Rollup", "sub");
        assert_eq!(kind(Some(&h)), (RecordOp::Put, true));
        let mut d = HeaderMap::new();
        d.insert("KV-Operation", "DEL");
        assert_eq!(kind(Some(&d)), (RecordOp::Delete, false));
        let mut m = HeaderMap::new();
        m.insert("Nats-Marker-Reason", "MaxAge");
        assert_eq!(kind(Some(&m)), (RecordOp::Delete, true));
    }
}

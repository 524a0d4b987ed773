//! [`NatsStore`]: connecting, reading and writing.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, kv, stream};
use async_nats::{ConnectOptions, HeaderMap, ServerAddr};
use bytes::Bytes;
use datasync::{
    CasOutcome, Consistency, DeleteOptions, Deleted, Expect, Key, KeyValue, Limits, Listing,
    Prefix, PrefixSet, PrefixValues, PutOptions, ReadOptions, Revision, Source, StoreError, Value,
    Writer,
};

use crate::bucket::Bucket;
use crate::consumer::{Consumer, Record, RecordOp};
use crate::error::{classify, connect_error};
use crate::{NatsConfig, keys};

/// A datasync store on a NATS JetStream Key-Value bucket. Cheap to clone.
#[derive(Debug, Clone)]
pub struct NatsStore {
    pub(crate) inner: Arc<Bucket>,
}

/// Room left in a message for our headers (TTL, rollup, expected sequence).
const HEADER_ROOM: usize = 4096;

/// A write refused because the key's last revision was not the expected one.
enum Refused {
    WrongLastSequence,
    Store(StoreError),
}

impl From<StoreError> for Refused {
    fn from(e: StoreError) -> Self {
        Refused::Store(e)
    }
}

/// The state of a bucket's keys at one revision.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) revision: Revision,
    pub(crate) values: BTreeMap<Key, KeyValue>,
}

impl State {
    /// The values grouped by the (normalized) prefixes of `set`, sorted by key.
    pub(crate) fn grouped(&self, set: &PrefixSet) -> Vec<PrefixValues> {
        set.prefixes()
            .iter()
            .map(|p| PrefixValues {
                prefix: p.clone(),
                values: self
                    .values
                    .range::<str, _>((Bound::Included(p.as_str()), Bound::Unbounded))
                    .take_while(|(k, _)| p.matches(k.as_str()))
                    .map(|(_, kv)| kv.clone())
                    .collect(),
            })
            .collect()
    }
}

impl NatsStore {
    /// Connects to the servers and opens the bucket, creating it if missing (with
    /// per-key TTL enabled).
    #[tracing::instrument(level = "debug", skip_all, fields(bucket = %config.bucket))]
    pub async fn connect(config: NatsConfig) -> Result<NatsStore, StoreError> {
        config.validate()?;
        let client = connect_client(&config).await?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(config.request_timeout);
        let stream_name = format!("KV_{}", config.bucket);
        let timeout = config.request_timeout;
        let stream = match js.get_stream(&stream_name).await {
            Ok(s) => s,
            Err(e) if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j) if j.code() == 404) =>
            {
                let kv = js
                    .create_key_value(kv::Config {
                        bucket: config.bucket.clone(),
                        history: i64::from(config.history),
                        max_value_size: i32::try_from(config.max_value_size).unwrap_or(i32::MAX),
                        num_replicas: config.replicas,
                        limit_markers: Some(config.marker_ttl),
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| classify(&client, timeout, e))?;
                kv.stream
            }
            Err(e) => return Err(classify(&client, timeout, e)),
        };
        let info = stream.cached_info();
        let ttl = info.config.allow_message_ttl;
        let server_max = client.server_info().max_payload;
        let max_value_size = config
            .max_value_size
            .min(server_max.saturating_sub(HEADER_ROOM));
        Ok(NatsStore {
            inner: Arc::new(Bucket {
                subject_prefix: format!("$KV.{}.", config.bucket),
                client,
                js,
                stream,
                config,
                max_value_size,
                ttl,
                source: Source::from(""),
            }),
        })
    }

    /// The configuration this store was connected with.
    pub fn config(&self) -> &NatsConfig {
        &self.inner.config
    }

    /// The underlying async-nats client.
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    /// The bucket's current revision (its stream's last sequence).
    pub async fn current_revision(&self) -> Result<Revision, StoreError> {
        let info = self
            .inner
            .timed(self.inner.stream.get_info())
            .await?
            .map_err(|e| self.inner.classify(e))?;
        Ok(Revision(info.state.last_sequence))
    }

    /// How many consumers the bucket's stream has (each watch holds one).
    pub async fn consumers(&self) -> Result<usize, StoreError> {
        let info = self
            .inner
            .timed(self.inner.stream.get_info())
            .await?
            .map_err(|e| self.inner.classify(e))?;
        Ok(info.state.consumer_count)
    }

    fn subject(&self, key: &Key) -> Result<String, StoreError> {
        Ok(format!(
            "{}{}",
            self.inner.subject_prefix,
            keys::encode(key)?
        ))
    }

    /// Publishes one message and waits for the stream's acknowledgement.
    async fn publish(
        &self,
        subject: String,
        payload: Bytes,
        headers: Option<HeaderMap>,
    ) -> Result<u64, Refused> {
        let mut msg = PublishMessage::build().payload(payload);
        if let Some(h) = headers {
            msg = msg.headers(h);
        }
        let ack = self
            .inner
            .js
            .send_publish(subject, msg)
            .await
            .map_err(|e| self.publish_error(e))?;
        let ack = ack.await.map_err(|e| self.publish_error(e))?;
        Ok(ack.sequence)
    }

    fn publish_error(&self, e: async_nats::jetstream::context::PublishError) -> Refused {
        match e.kind() {
            PublishErrorKind::WrongLastSequence => Refused::WrongLastSequence,
            PublishErrorKind::TimedOut => {
                Refused::Store(StoreError::Timeout(self.inner.config.request_timeout))
            }
            PublishErrorKind::BrokenPipe | PublishErrorKind::StreamNotFound => {
                Refused::Store(StoreError::Unavailable(Box::new(e)))
            }
            _ => Refused::Store(self.inner.classify(e)),
        }
    }

    /// Headers of a put: a TTL (rounded up to whole seconds, as NATS takes it) makes the
    /// message replace the key's history, so that its expiry leaves the key empty and the
    /// server writes a delete marker.
    fn put_headers(
        &self,
        opts: &PutOptions,
        expect: Option<u64>,
    ) -> Result<Option<HeaderMap>, StoreError> {
        if opts.ttl.is_none() && expect.is_none() {
            return Ok(None);
        }
        let mut h = HeaderMap::new();
        if let Some(ttl) = opts.ttl {
            if !self.inner.ttl {
                return Err(StoreError::Unsupported(
                    "the bucket was created without limit markers: no per-key TTL",
                ));
            }
            let secs = (ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0)).max(1);
            h.insert("Nats-TTL", secs.to_string().as_str());
            h.insert("Nats-Rollup", "sub");
        }
        if let Some(seq) = expect {
            h.insert(
                "Nats-Expected-Last-Subject-Sequence",
                seq.to_string().as_str(),
            );
        }
        Ok(Some(h))
    }

    /// The latest version of `key`: its record (`None` if never written or gone).
    async fn latest(
        &self,
        key: &Key,
        consistency: Consistency,
    ) -> Result<Option<(u64, RecordOp, Bytes)>, StoreError> {
        let subject = self.subject(key)?;
        let stream = &self.inner.stream;
        let got = match consistency {
            Consistency::Local => self
                .inner
                .timed(stream.direct_get_last_for_subject(subject))
                .await?
                .map_err(|e| {
                    if e.kind() == stream::DirectGetErrorKind::NotFound {
                        None
                    } else {
                        Some(self.inner.classify(e))
                    }
                }),
            _ => self
                .inner
                .timed(stream.get_last_raw_message_by_subject(&subject))
                .await?
                .map_err(|e| {
                    if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound {
                        None
                    } else {
                        Some(self.inner.classify(e))
                    }
                }),
        };
        match got {
            Ok(m) => {
                let (op, _) = crate::consumer::kind(Some(&m.headers));
                Ok(Some((m.sequence, op, m.payload)))
            }
            Err(None) => Ok(None),
            Err(Some(e)) => Err(e),
        }
    }

    /// The state under `set` at one revision R (never older than the store's revision
    /// when called), and the consumer that read it, positioned to deliver changes from
    /// R+1 (for a watch; dropped for a read).
    ///
    /// The consumer delivers the last message of every subject in stream order, then
    /// new messages. Taking the store's revision L first and reading exactly the
    /// `num_pending` messages the consumer was created with gives the state at its
    /// creation; R = max(L, last sequence read) lies between that state and the first
    /// newer message, so the hand-off has no gap and no overlap.
    pub(crate) async fn snapshot(
        &self,
        set: &PrefixSet,
    ) -> Result<(State, Option<Consumer>), StoreError> {
        let before = self.current_revision().await?;
        let filters = keys::filters(set.prefixes());
        if filters.is_empty() {
            let state = State {
                revision: before,
                values: BTreeMap::new(),
            };
            return Ok((state, None));
        }
        let (mut consumer, pending) =
            Consumer::open(&self.inner, &filters, DeliverPolicy::LastPerSubject).await?;
        // Inserting as messages arrive overlaps the ordering work with the server's
        // delivery (sorting at the end would add to the resync's latency).
        let mut state = State {
            revision: before,
            values: BTreeMap::new(),
        };
        for _ in 0..pending {
            let mut rec = consumer.next().await?;
            state.revision = state.revision.max(Revision(rec.seq));
            if let Some(key) = rec.key.take().filter(|k| set.matches(k.as_str())) {
                match rec.op {
                    RecordOp::Put => {
                        let kv = KeyValue {
                            key: key.clone(),
                            value: Value::from(rec.value),
                            revision: Revision(rec.seq),
                        };
                        state.values.insert(key, kv);
                    }
                    RecordOp::Delete => {
                        state.values.remove(&key);
                    }
                }
            }
        }
        Ok((state, Some(consumer)))
    }

    /// What the bucket's stream keeps, from its current configuration and state (not
    /// from this store's configuration: the bucket may have been made elsewhere, with
    /// other limits, and limits can be changed).
    async fn retention(&self) -> Result<Retention, StoreError> {
        let info = self
            .inner
            .timed(self.inner.stream.get_info())
            .await?
            .map_err(|e| self.inner.classify(e))?;
        let c = &info.config;
        let history = usize::try_from(c.max_messages_per_subject)
            .ok()
            .filter(|h| *h > 0)
            .unwrap_or(usize::MAX);
        // Limits that can take a key's every version, not only its older ones: the
        // stream's own (age, count, size), and per-message TTLs on a bucket without
        // expiry markers (the expired message just goes). (With markers, see `ttl`.)
        let whole_keys = !c.max_age.is_zero()
            || c.max_messages > 0
            || c.max_bytes > 0
            || (c.allow_message_ttl && c.subject_delete_marker_ttl.is_none());
        let first_removed = if whole_keys {
            self.first_removed(&info.state).await?
        } else {
            None
        };
        Ok(Retention {
            current: Revision(info.state.last_sequence),
            history,
            first_removed,
            ttl: c.allow_message_ttl,
        })
    }

    /// The first sequence the stream has removed, if any (below its first sequence, or
    /// deleted inside it).
    async fn first_removed(&self, state: &stream::State) -> Result<Option<u64>, StoreError> {
        if state.first_sequence > 1 {
            return Ok(Some(1));
        }
        if state.deleted_count.unwrap_or(0) == 0 {
            return Ok(None);
        }
        let detailed = self
            .inner
            .timed(self.inner.stream.info_builder().with_deleted(true).fetch())
            .await?
            .map_err(|e| self.inner.classify(e))?;
        Ok(detailed.info.state.deleted.iter().flatten().min().copied())
    }

    /// Whether the stream has removed a sequence at or below `at` (read now).
    async fn removed_up_to(&self, at: Revision) -> Result<bool, StoreError> {
        let info = self
            .inner
            .timed(self.inner.stream.get_info())
            .await?
            .map_err(|e| self.inner.classify(e))?;
        Ok(self
            .first_removed(&info.state)
            .await?
            .is_some_and(|f| f <= at.0))
    }

    /// The state under `set` (or of the key `only`) at `at` from the versions the
    /// bucket keeps; `Compacted` where they cannot tell it.
    async fn state_at(
        &self,
        set: &PrefixSet,
        only: Option<&Key>,
        at: Revision,
    ) -> Result<State, StoreError> {
        let Retention {
            current,
            history,
            first_removed,
            ttl,
        } = self.retention().await?;
        if at > current {
            return Err(StoreError::FutureRevision {
                requested: at,
                current,
            });
        }
        // The stream's limits remove whole keys at a time, at no revision: a key removed
        // so leaves no trace, and whether it was there at `at` cannot be told once
        // anything up to `at` has gone. Only the present (`current`) is still known.
        if first_removed.is_some_and(|f| f <= at.0) && at < current {
            return Err(StoreError::Compacted {
                requested: at,
                compacted: Revision(current.0.saturating_sub(1)),
            });
        }
        let filters = match only {
            // The key's own subject: its siblings (`h/kk` for `h/k`) are no business
            // of this read.
            Some(k) => vec![keys::encode(k)?],
            None => keys::filters(set.prefixes()),
        };
        let mut per_key: BTreeMap<Key, Versions> = BTreeMap::new();
        if !filters.is_empty() {
            let (mut consumer, pending) =
                Consumer::open(&self.inner, &filters, DeliverPolicy::All).await?;
            for _ in 0..pending {
                let rec = consumer.next().await?;
                if let Some(key) = rec
                    .key
                    .clone()
                    .filter(|k| set.matches(k.as_str()) && only.is_none_or(|o| o == k))
                {
                    per_key.entry(key).or_default().add(rec, at);
                }
            }
        }
        // With per-message TTLs (and expiry markers), a version whose TTL ran out is
        // removed at no revision: a key's last one leaves a marker, which expires in turn
        // (`NatsConfig::marker_ttl`); one followed by a later version just goes. Either
        // way that version's sequence, at or below `at` if it was the value at `at`, is
        // removed. So an answer that rests on a key's absence at `at` holds only while no
        // sequence up to `at` has been removed; checked after the read, since removals
        // only grow. A key with a version kept at or below `at` is exact (a TTL put rolls
        // up the versions before it).
        let absence = match only {
            Some(k) => per_key.get(k).is_none_or(|v| v.at.is_none()),
            None => true,
        };
        if ttl && absence && at.0 > 0 && at < current && self.removed_up_to(at).await? {
            return Err(StoreError::Compacted {
                requested: at,
                compacted: Revision(current.0.saturating_sub(1)),
            });
        }
        let mut values = BTreeMap::new();
        for (key, v) in per_key {
            if v.at.is_none() && (v.count >= history || v.oldest_truncates) {
                // Versions up to `at` may have been dropped: the state there is unknown.
                return Err(StoreError::Compacted {
                    requested: at,
                    compacted: Revision(v.oldest.saturating_sub(1)),
                });
            }
            if let Some(rec) = v.at.filter(|r| r.op == RecordOp::Put) {
                let kv = KeyValue {
                    key: key.clone(),
                    value: Value::from(rec.value),
                    revision: Revision(rec.seq),
                };
                values.insert(key, kv);
            }
        }
        Ok(State {
            revision: at,
            values,
        })
    }

    /// Deletes each of `keys` if it still has a value, with a delete marker conditional
    /// on the version seen; returns how many were deleted and the last revision.
    async fn delete_keys(&self, mut todo: Vec<(Key, u64)>) -> Result<(u64, u64), StoreError> {
        let mut count = 0;
        let mut last = 0;
        while !todo.is_empty() {
            // Pipelined: publish every marker, then collect the acknowledgements.
            let mut acks = Vec::with_capacity(todo.len());
            for (key, seq) in &todo {
                let mut h = HeaderMap::new();
                h.insert("KV-Operation", "DEL");
                h.insert(
                    "Nats-Expected-Last-Subject-Sequence",
                    seq.to_string().as_str(),
                );
                let msg = PublishMessage::build().headers(h);
                let ack = self
                    .inner
                    .js
                    .send_publish(self.subject(key)?, msg)
                    .await
                    .map_err(|e| match self.publish_error(e) {
                        Refused::Store(e) => e,
                        Refused::WrongLastSequence => {
                            StoreError::Backend("unexpected refusal".into())
                        }
                    })?;
                acks.push((key.clone(), ack));
            }
            let mut retry = Vec::new();
            for (key, ack) in acks {
                match ack.await.map_err(|e| self.publish_error(e)) {
                    Ok(a) => {
                        count += 1;
                        last = last.max(a.sequence);
                    }
                    // Written meanwhile: delete the newer value, if it is one.
                    Err(Refused::WrongLastSequence) => {
                        if let Some((seq, RecordOp::Put, _)) =
                            self.latest(&key, Consistency::Linearizable).await?
                        {
                            retry.push((key, seq));
                        }
                    }
                    Err(Refused::Store(e)) => return Err(e),
                }
            }
            todo = retry;
        }
        Ok((count, last))
    }
}

/// What the bucket's stream keeps (see [`NatsStore::retention`]).
struct Retention {
    /// The stream's last sequence.
    current: Revision,
    /// Versions kept per key.
    history: usize,
    /// Where whole keys can vanish: the first sequence removed, if any.
    first_removed: Option<u64>,
    /// The bucket takes per-message TTLs.
    ttl: bool,
}

/// One key's retained versions, as seen by a read at a past revision.
#[derive(Debug, Default)]
struct Versions {
    count: usize,
    oldest: u64,
    oldest_truncates: bool,
    /// The latest version at or before the revision read.
    at: Option<Record>,
}

impl Versions {
    fn add(&mut self, rec: Record, at: Revision) {
        if self.count == 0 {
            self.oldest = rec.seq;
            self.oldest_truncates = rec.truncates;
        }
        self.count += 1;
        if rec.seq <= at.0 {
            self.at = Some(rec);
        }
    }
}

async fn connect_client(config: &NatsConfig) -> Result<async_nats::Client, StoreError> {
    use crate::config::Auth;
    let servers: Vec<ServerAddr> = config
        .servers
        .iter()
        .map(|s| s.parse::<ServerAddr>())
        .collect::<Result<_, _>>()
        .map_err(|e| StoreError::Backend(Box::new(e)))?;
    let deadline = config
        .wait_for_server
        .map(|w| tokio::time::Instant::now() + w);
    let mut pauses = datasync::transport::resync::Pauses::default();
    loop {
        let mut opts = ConnectOptions::new()
            .connection_timeout(config.connect_timeout)
            .request_timeout(Some(config.request_timeout))
            .name("datasync");
        opts = match &config.auth {
            Auth::None => opts,
            Auth::Token(t) => opts.token(t.clone()),
            Auth::UserPassword(u, p) => opts.user_and_password(u.clone(), p.clone()),
            Auth::NKey(seed) => opts.nkey(seed.clone()),
            Auth::CredentialsFile(path) => opts
                .credentials_file(path)
                .await
                .map_err(|e| StoreError::Backend(Box::new(e)))?,
        };
        if config.tls_required {
            opts = opts.require_tls(true);
        }
        if let Some(roots) = &config.tls_root_certificates {
            opts = opts.add_root_certificates(roots.clone());
        }
        if let Some((cert, key)) = &config.tls_client_cert {
            opts = opts.add_client_certificate(cert.clone(), key.clone());
        }
        match opts.connect(servers.clone()).await {
            Ok(client) => return Ok(client),
            Err(e) => {
                let err = connect_error(e);
                let pause = pauses.next_pause();
                match deadline {
                    Some(d) if err.is_retryable() && tokio::time::Instant::now() + pause < d => {
                        tracing::debug!(error = %err, "NATS unreachable; waiting");
                        tokio::time::sleep(pause).await;
                    }
                    _ => return Err(err),
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl Writer for NatsStore {
    fn limits(&self) -> Limits {
        Limits::new(self.inner.max_value_size)
    }

    async fn put(&self, key: &Key, value: Value, opts: PutOptions) -> Result<Revision, StoreError> {
        self.limits().check_put(&value, &opts)?;
        let subject = self.subject(key)?;
        let headers = self.put_headers(&opts, None)?;
        match self.publish(subject, value.bytes(), headers).await {
            Ok(seq) => Ok(Revision(seq)),
            Err(Refused::Store(e)) => Err(e),
            Err(Refused::WrongLastSequence) => {
                Err(StoreError::Backend("unexpected refusal".into()))
            }
        }
    }

    async fn delete(&self, key: &Key, opts: DeleteOptions) -> Result<Deleted, StoreError> {
        let todo = if opts.prefix {
            let set = PrefixSet::new([Prefix::from(key.clone())]);
            let (state, _) = self.snapshot(&set).await?;
            state
                .values
                .into_values()
                .map(|kv| (kv.key, kv.revision.0))
                .collect()
        } else {
            match self.latest(key, Consistency::Linearizable).await? {
                Some((seq, RecordOp::Put, _)) => vec![(key.clone(), seq)],
                _ => Vec::new(),
            }
        };
        let (count, last) = self.delete_keys(todo).await?;
        let revision = if count == 0 {
            self.current_revision().await?
        } else {
            Revision(last)
        };
        Ok(Deleted { count, revision })
    }

    async fn get(&self, key: &Key, opts: ReadOptions) -> Result<Option<KeyValue>, StoreError> {
        if let Some(at) = opts.revision {
            let set = PrefixSet::new([Prefix::from(key.clone())]);
            let state = self.state_at(&set, Some(key), at).await?;
            let mut state = state;
            return Ok(state.values.remove(key));
        }
        Ok(match self.latest(key, opts.consistency).await? {
            Some((seq, RecordOp::Put, value)) => Some(KeyValue {
                key: key.clone(),
                value: Value::from(value),
                revision: Revision(seq),
            }),
            _ => None,
        })
    }

    async fn list(&self, prefix: &Prefix, opts: ReadOptions) -> Result<Listing, StoreError> {
        let set = PrefixSet::new([prefix.clone()]);
        let state = match opts.revision {
            Some(at) => self.state_at(&set, None, at).await?,
            None => self.snapshot(&set).await?.0,
        };
        Ok(Listing {
            revision: state.revision,
            values: state.values.into_values().collect(),
        })
    }

    async fn compare_and_swap(
        &self,
        key: &Key,
        expect: Expect,
        value: Value,
        opts: PutOptions,
    ) -> Result<CasOutcome, StoreError> {
        self.limits().check_put(&value, &opts)?;
        let subject = self.subject(key)?;
        // NATS compares the subject's last sequence, which may be a delete marker: read
        // first, so that "absent" and "at revision r" mean what datasync says.
        for _ in 0..16 {
            let latest = self.latest(key, Consistency::Linearizable).await?;
            let current = match &latest {
                Some((seq, RecordOp::Put, v)) => Some(KeyValue {
                    key: key.clone(),
                    value: Value::from(v.clone()),
                    revision: Revision(*seq),
                }),
                _ => None,
            };
            let expected_seq = match (expect, &latest, &current) {
                (Expect::Absent, _, Some(_)) => return Ok(CasOutcome::Conflict(current)),
                (Expect::Absent, Some((seq, _, _)), None) => *seq,
                (Expect::Absent, None, None) => 0,
                (Expect::Revision(r), _, Some(kv)) if kv.revision == r => r.0,
                (Expect::Revision(_), _, _) => return Ok(CasOutcome::Conflict(current)),
            };
            let headers = self.put_headers(&opts, Some(expected_seq))?;
            match self.publish(subject.clone(), value.bytes(), headers).await {
                Ok(seq) => return Ok(CasOutcome::Swapped(Revision(seq))),
                // Changed between the read and the write: read again and decide again.
                Err(Refused::WrongLastSequence) => continue,
                Err(Refused::Store(e)) => return Err(e),
            }
        }
        Err(StoreError::Unavailable(
            "compare-and-swap lost 16 races in a row".into(),
        ))
    }
}

//! etcd's Watch service: one bidirectional stream per client carrying many watches,
//! each a store record watch ([`RaftStore::watch_records`]) from now or from a
//! retained revision.

use std::collections::HashMap;
use std::time::Duration;

use datasync::{Op, Revision, StoreError};
use datasync_raft::records::{RecordChanges, RecordEvent};
use datasync_raft::{RaftStore, RecordWatch};
use etcd_client::proto::{
    PbEvent, PbWatchRequest, PbWatchRequestUnion, PbWatchResponse, PbWatchService,
};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::StreamMap;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::convert::{header, key_range, kv, signed};

/// How often a watch created with `progress_notify` hears the revision it has reached
/// when nothing else comes (etcd's default).
const PROGRESS_EVERY: Duration = Duration::from_secs(600);
/// How often a progress request that waits for the watches is checked again.
const PROGRESS_RECHECK: Duration = Duration::from_millis(50);
/// The watch id etcd gives a response that concerns no one watch.
const NO_WATCH: i64 = -1;
// etcd's filter and event type values (rpc.proto, kv.proto).
const FILTER_NOPUT: i32 = 0;
const FILTER_NODELETE: i32 = 1;
const EVENT_PUT: i32 = 0;
const EVENT_DELETE: i32 = 1;

/// The Watch service over one store.
#[derive(Debug, Clone)]
pub(crate) struct Watch {
    store: RaftStore,
    progress_every: Duration,
    /// Ends every session when the endpoint stops (a watch stream never ends by itself).
    stop: CancellationToken,
}

impl Watch {
    pub(crate) fn new(store: RaftStore, stop: CancellationToken) -> Watch {
        Watch {
            store,
            progress_every: PROGRESS_EVERY,
            stop,
        }
    }
}

/// What one watch asked for besides its range.
#[derive(Debug, Clone, Copy)]
struct Options {
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
    progress_notify: bool,
}

type Out = mpsc::Sender<Result<PbWatchResponse, Status>>;

#[tonic::async_trait]
impl PbWatchService for Watch {
    type WatchStream = ReceiverStream<Result<PbWatchResponse, Status>>;

    async fn watch(
        &self,
        request: Request<Streaming<PbWatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let (tx, rx) = mpsc::channel(64);
        let session = Session {
            store: self.store.clone(),
            out: tx,
            watches: StreamMap::new(),
            options: HashMap::new(),
            next_id: 0,
            progress_wanted: false,
        };
        let stop = self.stop.clone();
        let run = session.run(request.into_inner(), self.progress_every);
        tokio::spawn(async move {
            tokio::select! {
                () = run => {}
                () = stop.cancelled() => {}
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// One client's watch stream.
struct Session {
    store: RaftStore,
    out: Out,
    watches: StreamMap<i64, RecordWatch>,
    options: HashMap<i64, Options>,
    next_id: i64,
    /// A progress request waits until every watch has delivered what it owes.
    progress_wanted: bool,
}

impl Session {
    /// Serves the stream until the client ends it or goes away. A slow client holds up
    /// only its own stream: its watches fall behind and catch up from the store's
    /// history, or are cancelled as compacted once that is gone.
    async fn run(mut self, mut incoming: Streaming<PbWatchRequest>, progress_every: Duration) {
        let mut tick = tokio::time::interval(progress_every);
        tick.tick().await;
        // A watch can drain its queue without delivering (revisions outside its range):
        // a waiting progress request is checked again on this tick too.
        let mut recheck = tokio::time::interval(PROGRESS_RECHECK);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let sent = tokio::select! {
                req = incoming.next() => match req {
                    Some(Ok(req)) => self.request(req).await,
                    // The client closed its side or the connection failed.
                    Some(Err(_)) | None => return,
                },
                Some((id, item)) = self.watches.next(), if !self.watches.is_empty() => {
                    match self.deliver(id, item).await {
                        Ok(()) => self.answer_progress().await,
                        e => e,
                    }
                }
                _ = tick.tick() => self.progress_notify().await,
                _ = recheck.tick(), if self.progress_wanted => self.answer_progress().await,
                () = self.out.closed() => return,
            };
            if sent.is_err() {
                return;
            }
        }
    }

    async fn send(&self, resp: PbWatchResponse) -> Result<(), ()> {
        self.out.send(Ok(resp)).await.map_err(drop)
    }

    fn response(&self, watch_id: i64, revision: u64) -> PbWatchResponse {
        PbWatchResponse {
            header: header(&self.store, revision),
            watch_id,
            ..PbWatchResponse::default()
        }
    }

    async fn request(&mut self, req: PbWatchRequest) -> Result<(), ()> {
        match req.request_union {
            Some(PbWatchRequestUnion::CreateRequest(c)) => {
                let now = self.store.revision().0;
                let refuse = |why: String| PbWatchResponse {
                    created: true,
                    canceled: true,
                    cancel_reason: why,
                    ..self.response(NO_WATCH, now)
                };
                let range = match key_range(&c.key, &c.range_end) {
                    Ok(r) => r,
                    Err(s) => return self.send(refuse(s.message().to_owned())).await,
                };
                let id = if c.watch_id != 0 {
                    if self.watches.contains_key(&c.watch_id) {
                        return self
                            .send(refuse("etcdserver: duplicate watch ID provided".into()))
                            .await;
                    }
                    c.watch_id
                } else {
                    while self.watches.contains_key(&self.next_id) {
                        self.next_id += 1;
                    }
                    self.next_id
                };
                let from = u64::try_from(c.start_revision)
                    .ok()
                    .filter(|r| *r > 0)
                    .map(Revision);
                let watch = self.store.watch_records(range, from).await;
                // The header says from where the watch sees every change.
                let at = watch.as_ref().map_or(now, |w| w.registered_at().0);
                let created = PbWatchResponse {
                    created: true,
                    ..self.response(id, at)
                };
                self.send(created).await?;
                match watch {
                    Ok(w) => {
                        self.options.insert(
                            id,
                            Options {
                                prev_kv: c.prev_kv,
                                no_put: c.filters.contains(&FILTER_NOPUT),
                                no_delete: c.filters.contains(&FILTER_NODELETE),
                                progress_notify: c.progress_notify,
                            },
                        );
                        self.watches.insert(id, w);
                        Ok(())
                    }
                    Err(e) => self.cancelled(id, e).await,
                }
            }
            Some(PbWatchRequestUnion::CancelRequest(c)) => {
                if self.watches.remove(&c.watch_id).is_none() {
                    return Ok(());
                }
                self.options.remove(&c.watch_id);
                let now = self.store.revision().0;
                let resp = PbWatchResponse {
                    canceled: true,
                    ..self.response(c.watch_id, now)
                };
                self.send(resp).await?;
                self.answer_progress().await
            }
            Some(PbWatchRequestUnion::ProgressRequest(_)) => {
                self.progress_wanted = true;
                self.answer_progress().await
            }
            None => Ok(()),
        }
    }

    /// Answers a progress request once every watch has delivered all it owes, so the
    /// revision promises that no event at or below it is still to come (checked again
    /// after each delivery until then).
    async fn answer_progress(&mut self) -> Result<(), ()> {
        if !self.progress_wanted {
            return Ok(());
        }
        let reached: Option<Vec<Revision>> =
            self.watches.values().map(RecordWatch::progress).collect();
        let Some(reached) = reached else {
            return Ok(());
        };
        self.progress_wanted = false;
        let rev = reached
            .into_iter()
            .min()
            .map_or(self.store.revision().0, |r| r.0);
        self.send(self.response(NO_WATCH, rev)).await
    }

    async fn deliver(
        &mut self,
        id: i64,
        item: Result<RecordChanges, StoreError>,
    ) -> Result<(), ()> {
        let changes = match item {
            Ok(c) => c,
            Err(e) => {
                self.watches.remove(&id);
                return self.cancelled(id, e).await;
            }
        };
        let Some(o) = self.options.get(&id).copied() else {
            return Ok(());
        };
        let events: Vec<PbEvent> = changes
            .events
            .iter()
            .filter(|e| match e.op {
                Op::Put => !o.no_put,
                Op::Delete => !o.no_delete,
            })
            .map(|e| event(e, o.prev_kv))
            .collect();
        if events.is_empty() {
            return Ok(());
        }
        let resp = PbWatchResponse {
            events,
            ..self.response(id, changes.revision.0)
        };
        self.send(resp).await
    }

    /// Ends watch `id` for `e`: a compacted start or a watch too far behind says to
    /// which revision history is gone, as etcd does.
    async fn cancelled(&mut self, id: i64, e: StoreError) -> Result<(), ()> {
        self.options.remove(&id);
        let now = self.store.revision().0;
        let resp = match e {
            // etcd's compact revision is the first a watch may start from again; the
            // store's is the last one gone.
            StoreError::Compacted { compacted, .. } => PbWatchResponse {
                canceled: true,
                compact_revision: signed(compacted.0.saturating_add(1)),
                cancel_reason: "etcdserver: mvcc: required revision has been compacted".into(),
                ..self.response(id, now)
            },
            e => PbWatchResponse {
                canceled: true,
                cancel_reason: format!("etcdserver: {}", datasync::error_chain(&e)),
                ..self.response(id, now)
            },
        };
        self.send(resp).await
    }

    async fn progress_notify(&mut self) -> Result<(), ()> {
        let due: Vec<(i64, Revision)> = self
            .watches
            .iter()
            .filter(|(id, _)| self.options.get(id).is_some_and(|o| o.progress_notify))
            .filter_map(|(id, w)| w.progress().map(|r| (*id, r)))
            .collect();
        for (id, rev) in due {
            self.send(self.response(id, rev.0)).await?;
        }
        Ok(())
    }
}

/// A store event as etcd's (a delete's record has the key and its revision only).
fn event(e: &RecordEvent, prev_kv: bool) -> PbEvent {
    PbEvent {
        r#type: match e.op {
            Op::Put => EVENT_PUT,
            Op::Delete => EVENT_DELETE,
        },
        kv: Some(kv(&e.record, false)),
        prev_kv: e.prev.as_ref().filter(|_| prev_kv).map(|p| kv(p, false)),
    }
}

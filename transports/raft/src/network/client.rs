//! The calling side: one multiplexed, authenticated connection per peer address.
//!
//! A [`Client`] is a cheap handle to one task that owns the connection: calls are
//! numbered, written as they come and answered as replies arrive, in any order. A broken
//! connection fails the calls in flight with [`NetError::Closed`] (their outcome is
//! unknown) and the next call connects again.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::Framed;
use tracing::debug;

use super::auth::{self, Hello, Opener, Sealer, Secret};
use super::error::NetError;
use super::frame::{Conn, HANDSHAKE_TIMEOUT, MAX_FRAME, codec, recv_plain_or_closed, send_plain};
use super::link::{Fate, Link};
use super::net::Net;
use super::wire::{Envelope, Reply, Request, ServiceError, WireError};

/// A call waiting for its reply (by a deadline), or for its stream of replies.
type Call = (Request, Waiter, Option<tokio::time::Instant>);

#[derive(Debug)]
enum Waiter {
    /// `None`: the connection was given up before the request was written.
    Once(oneshot::Sender<Option<Reply>>),
    Stream(mpsc::Sender<Reply>),
}

/// A handle to the connection with one peer address. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Client {
    inner: Arc<ClientInner>,
}

#[derive(Debug)]
struct ClientInner {
    addr: String,
    secret: Secret,
    conn: tokio::sync::Mutex<Option<mpsc::Sender<Call>>>,
    /// Injected faults, and the address this node is known by in them.
    faults: Option<(Arc<dyn Link>, String)>,
    net: Arc<dyn Net>,
}

impl Client {
    /// A client of `addr`; with `faults` (and the address this node is known by), each
    /// request first travels the link from this node to the peer, its reply the way back.
    pub(crate) fn new(
        addr: String,
        secret: Secret,
        faults: Option<(Arc<dyn Link>, String)>,
        net: Arc<dyn Net>,
    ) -> Self {
        Client {
            inner: Arc::new(ClientInner {
                addr,
                secret,
                conn: tokio::sync::Mutex::new(None),
                faults,
                net,
            }),
        }
    }

    /// Waits out an injected delay; a lost message is only noticed at the deadline.
    async fn deliver(
        &self,
        from: &str,
        to: &str,
        deadline: tokio::time::Instant,
    ) -> Result<(), NetError> {
        let Some((faults, _)) = &self.inner.faults else {
            return Ok(());
        };
        match faults.fate(from, to) {
            // Even a zero sleep waits for the timer wheel's next tick (~1 ms).
            Fate::Delivered(d) if d.is_zero() => {}
            Fate::Delivered(d) => tokio::time::sleep(d).await,
            Fate::Lost => {
                tokio::time::sleep_until(deadline).await;
                return Err(NetError::Timeout(self.inner.addr.clone()));
            }
        }
        Ok(())
    }

    /// `reply`, or "stopping" in its place where the faults say so.
    fn stopped_instead(&self, from: &str, to: &str, reply: Reply) -> Reply {
        let Some((faults, _)) = &self.inner.faults else {
            return reply;
        };
        match reply {
            Reply::Proposed(_) if faults.take_stopped(from, to) => {
                Reply::Proposed(Err(ServiceError::Stopped))
            }
            Reply::Client(_) if faults.take_stopped(from, to) => {
                Reply::Client(Err(WireError::Stopped))
            }
            other => other,
        }
    }

    /// Sends `req` and waits for the reply, within `timeout` in all.
    ///
    /// # Cancel safety
    /// Dropping the future abandons the reply; the request may still be executed.
    pub(crate) async fn call(&self, req: Request, timeout: Duration) -> Result<Reply, NetError> {
        let addr = &self.inner.addr;
        let deadline = tokio::time::Instant::now() + timeout;
        let me = self.inner.faults.as_ref().map_or("", |(_, me)| me.as_str());
        self.deliver(me, addr, deadline).await?;
        let tx = self.sender_by(deadline).await?;
        let (reply, rx) = oneshot::channel();
        if tx
            .send((req, Waiter::Once(reply), Some(deadline)))
            .await
            .is_err()
        {
            return Err(NetError::Unsent(addr.clone()));
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Err(_) => Err(NetError::Timeout(addr.clone())),
            Ok(Err(_)) => Err(NetError::Closed(addr.clone())),
            Ok(Ok(None)) => Err(NetError::Unsent(addr.clone())),
            Ok(Ok(Some(reply))) => {
                self.deliver(addr, me, deadline).await?;
                Ok(self.stopped_instead(addr, me, reply))
            }
        }
    }

    /// Sends a [streaming](Request::is_stream) request: its replies arrive on the
    /// returned queue until the connection breaks. Give a stream a client of its own:
    /// dropping that client closes the connection, which ends the stream on the peer.
    pub(crate) async fn stream(
        &self,
        req: Request,
        timeout: Duration,
    ) -> Result<mpsc::Receiver<Reply>, NetError> {
        let tx = self
            .sender_by(tokio::time::Instant::now() + timeout)
            .await?;
        let (replies, rx) = mpsc::channel(64);
        if tx.send((req, Waiter::Stream(replies), None)).await.is_err() {
            return Err(NetError::Unsent(self.inner.addr.clone()));
        }
        Ok(rx)
    }

    /// [`sender`](Self::sender), connected by `deadline`.
    async fn sender_by(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<mpsc::Sender<Call>, NetError> {
        tokio::time::timeout_at(deadline, self.sender())
            .await
            .map_err(|_| NetError::Connect {
                addr: self.inner.addr.clone(),
                source: std::io::ErrorKind::TimedOut.into(),
            })?
    }

    /// The live connection's queue, connecting first if there is none.
    async fn sender(&self) -> Result<mpsc::Sender<Call>, NetError> {
        let mut conn = self.inner.conn.lock().await;
        if let Some(tx) = conn.as_ref().filter(|tx| !tx.is_closed()) {
            return Ok(tx.clone());
        }
        let (tx, rx) = mpsc::channel(1024);
        let (framed, sealer, opener) =
            connect(&*self.inner.net, &self.inner.addr, &self.inner.secret).await?;
        tokio::spawn(run(framed, sealer, opener, rx, self.inner.addr.clone()));
        *conn = Some(tx.clone());
        Ok(tx)
    }
}

/// Connects and authenticates.
async fn connect(
    net: &dyn Net,
    addr: &str,
    secret: &Secret,
) -> Result<(Conn, Sealer, Opener), NetError> {
    let connect_err = |source| NetError::Connect {
        addr: addr.to_owned(),
        source,
    };
    let stream = net.connect(addr).await.map_err(connect_err)?;
    let mut conn = Framed::new(stream, codec());
    let handshake = async {
        let nonce = auth::nonce()?;
        send_plain(
            &mut conn,
            &Hello {
                magic: auth::MAGIC,
                version: auth::VERSION,
                nonce,
            },
        )
        .await?;
        // A peer that closes before its challenge (it is stopping) refused nothing: the
        // call was not sent, and another member may take it.
        let challenge = match recv_plain_or_closed(&mut conn).await {
            Ok(Some(challenge)) => challenge,
            Ok(None) => return Err(connect_err(std::io::ErrorKind::ConnectionAborted.into())),
            Err(NetError::Io(e)) => return Err(connect_err(e)),
            Err(e) => return Err(e),
        };
        let (proof, sealer, mut opener) = auth::answer(secret, &nonce, &challenge)?;
        send_plain(&mut conn, &proof).await?;
        conn.codec_mut().set_max_frame_length(MAX_FRAME);
        // The server's first sealed frame accepts us; a refusal closes the connection.
        match conn.next().await {
            Some(Ok(frame)) => {
                opener.open(frame)?;
            }
            _ => return Err(NetError::AuthFailed("the peer refused the cluster secret")),
        }
        Ok((sealer, opener))
    };
    let (sealer, opener) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| connect_err(std::io::ErrorKind::TimedOut.into()))??;
    Ok((conn, sealer, opener))
}

/// How long a connection may stay silent past a call's deadline (see [`run`]).
pub(crate) const SILENT_FOR: Duration = Duration::from_secs(3);

/// Owns one connection: writes calls, routes replies to their callers.
///
/// A connection is taken for dead and closed, so the next call connects again, once
/// a call written on it has passed its deadline and nothing at all has been heard on
/// it for [`SILENT_FOR`] (both since the last frame received). Why: a connection can
/// stop delivering without failing (a peer host that froze or rebooted without a
/// reset, a middlebox that lost its state); TCP then retransmits for many minutes
/// before it reports an error, and every call meanwhile would time out on the same
/// connection. Why both: a call past its deadline alone is no sign (raft's heartbeats
/// have 100 ms deadlines, a busy peer may take longer), and silence alone is none
/// either (a slow call, a quiet stream). Calls queued but not yet written when it is
/// given up fail as [`NetError::Unsent`], safe to send elsewhere.
async fn run(
    conn: Conn,
    mut sealer: Sealer,
    mut opener: Opener,
    mut calls: mpsc::Receiver<Call>,
    addr: String,
) {
    let (mut sink, mut stream) = conn.split();
    let mut pending: BTreeMap<u64, Waiter> = BTreeMap::new();
    let mut next_id = 0u64;
    let mut heard_at = tokio::time::Instant::now();
    // The earliest deadline of the calls written since the peer was last heard from.
    let mut expires: Option<tokio::time::Instant> = None;
    let why = loop {
        let dead_at = expires.map(|d| d.max(heard_at + SILENT_FOR));
        tokio::select! {
            // A frame that arrived counts before the deadline that passed meanwhile.
            biased;
            frame = stream.next() => {
                let frame = match frame {
                    Some(Ok(f)) => f,
                    Some(Err(e)) => break format!("read: {e}"),
                    None => break "closed by the peer".to_string(),
                };
                heard_at = tokio::time::Instant::now();
                expires = None;
                let env: Envelope<Reply> = match opener
                    .open(frame)
                    .and_then(|b| bincode::deserialize(&b).map_err(NetError::Decode))
                {
                    Ok(env) => env,
                    Err(e) => break format!("reply: {e}"),
                };
                match pending.remove(&env.id) {
                    Some(Waiter::Once(tx)) => {
                        let _ = tx.send(Some(env.body));
                    }
                    // A stream's consumer sets the pace (its connection is its own).
                    Some(Waiter::Stream(tx)) => {
                        if tx.send(env.body).await.is_ok() {
                            pending.insert(env.id, Waiter::Stream(tx));
                        } else if pending.is_empty() {
                            break "the stream's consumer is gone".to_string();
                        }
                    }
                    None => {}
                }
            }
            () = async { tokio::time::sleep_until(dead_at.expect("guarded")).await }, if dead_at.is_some() => {
                // Calls not written yet did not run: their callers may send them elsewhere.
                calls.close();
                while let Ok((_, waiter, _)) = calls.try_recv() {
                    if let Waiter::Once(tx) = waiter {
                        let _ = tx.send(None);
                    }
                }
                break format!("nothing heard from the peer for {SILENT_FOR:?}, past a call's deadline: the connection is taken for dead");
            }
            call = calls.recv() => {
                let Some(mut call) = call else { break "no more handles".to_string() };
                // Calls queued meanwhile go out with this one, in one write.
                let sent = loop {
                    let (body, reply, deadline) = call;
                    if let Some(d) = deadline {
                        expires = Some(expires.map_or(d, |s| s.min(d)));
                    }
                    // Calls whose callers gave up take no room.
                    if pending.len() >= 64 && pending.len().is_power_of_two() {
                        pending.retain(|_, w| !matches!(w, Waiter::Once(tx) if tx.is_closed()));
                    }
                    let id = next_id;
                    next_id += 1;
                    let bytes = match bincode::serialize(&Envelope { id, body }) {
                        Ok(b) => b,
                        Err(e) => break Err(format!("encoding a request: {e}")),
                    };
                    pending.insert(id, reply);
                    if let Err(e) = sink.feed(sealer.seal(&bytes)).await {
                        break Err(format!("write: {e}"));
                    }
                    match calls.try_recv() {
                        Ok(next) => call = next,
                        Err(_) => break sink.flush().await.map_err(|e| format!("write: {e}")),
                    }
                };
                if let Err(why) = sent {
                    break why;
                }
            }
        }
    };
    debug!(peer = %addr, reason = %why, calls_failed = pending.len(), "connection ended");
}

/// Connections shared by every user of one node (raft replication, forwarding, joins).
#[derive(Debug, Clone)]
pub(crate) struct Pool {
    secret: Secret,
    clients: Arc<Mutex<HashMap<String, Client>>>,
    faults: Option<(Arc<dyn Link>, String)>,
    net: Arc<dyn Net>,
}

impl Pool {
    /// Connections with `secret`; `faults` (with this node's advertised address) for
    /// fault-injection tests.
    pub(crate) fn new(
        secret: Secret,
        faults: Option<(Arc<dyn Link>, String)>,
        net: Arc<dyn Net>,
    ) -> Self {
        Pool {
            secret,
            clients: Arc::default(),
            faults,
            net,
        }
    }

    pub(crate) fn get(&self, addr: &str) -> Client {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients
            .entry(addr.to_owned())
            .or_insert_with(|| {
                Client::new(
                    addr.to_owned(),
                    self.secret.clone(),
                    self.faults.clone(),
                    self.net.clone(),
                )
            })
            .clone()
    }
}

//! The answering side: accepts connections, authenticates each peer, and hands every
//! request to the node's [`Handler`] in its own task (replies go back in any order).

use std::net::SocketAddr;
use std::sync::Arc;

use super::net::{Listener, Socket};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::auth::{self, Hello, Proof, Secret};
use super::error::NetError;
use super::frame::{
    HANDSHAKE_TIMEOUT, MAX_FRAME, codec, recv_plain, recv_plain_or_closed, send_plain,
};
use super::wire::{Envelope, Reply, Request};

/// What a node does with an authenticated peer's request.
#[async_trait::async_trait]
pub(crate) trait Handler: Send + Sync + 'static {
    async fn handle(&self, req: Request) -> Reply;

    /// Answers a [streaming](Request::is_stream) request through `out` until it ends or
    /// the peer goes away.
    async fn stream(&self, req: Request, out: Replies) {
        let _ = (req, out);
    }
}

/// Where a streaming request's replies go: every one carries the request's id.
#[derive(Debug)]
pub(crate) struct Replies {
    id: u64,
    tx: mpsc::Sender<Envelope<Reply>>,
    closed: CancellationToken,
}

impl Replies {
    /// Sends one reply, waiting for room; `false` once the peer is gone.
    pub(crate) async fn send(&self, body: Reply) -> bool {
        tokio::select! {
            _ = self.closed.cancelled() => false,
            sent = self.tx.send(Envelope { id: self.id, body }) => sent.is_ok(),
        }
    }

    /// Resolves once the peer has closed the connection.
    pub(crate) async fn closed(&self) {
        self.closed.cancelled().await
    }
}

/// Connections from one address allowed to be in their handshake at once. Each costs
/// a task and a socket for up to [`HANDSHAKE_TIMEOUT`] before it has shown the secret;
/// past this many, that address's new connections are closed at once (members and
/// clients retry with backoff). Per address, so that one host holding sockets open
/// cannot lock the members and clients on other hosts out.
pub(crate) const MAX_HANDSHAKES_PER_ADDR: usize = 16;
/// Connections in their handshake at once, from all addresses.
pub(crate) const MAX_HANDSHAKES: usize = 512;

/// Handshakes in progress per source address.
#[derive(Debug, Default)]
struct Handshaking(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

/// One connection's place among the handshakes in progress; given back on drop.
struct InHandshake {
    /// Held for its drop: the place among all handshakes.
    _all: tokio::sync::OwnedSemaphorePermit,
    by_addr: Arc<Handshaking>,
    addr: std::net::IpAddr,
}

impl Handshaking {
    /// A place for a handshake from `addr`, unless that address or everyone has too many.
    fn enter(
        self: &Arc<Self>,
        all: &Arc<tokio::sync::Semaphore>,
        addr: std::net::IpAddr,
    ) -> Option<InHandshake> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(addr).or_default();
        if *n >= MAX_HANDSHAKES_PER_ADDR {
            return None;
        }
        let permit = all.clone().try_acquire_owned().ok()?;
        *n += 1;
        Some(InHandshake {
            _all: permit,
            by_addr: self.clone(),
            addr,
        })
    }
}

impl Drop for InHandshake {
    fn drop(&mut self) {
        let mut m = self.by_addr.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.addr);
            }
        }
    }
}

/// Logs a warning at most once a second, counting the ones it held back, so that a
/// flood of refused connections cannot flood the log.
#[derive(Debug)]
struct Throttle(std::sync::Mutex<(Option<tokio::time::Instant>, u64)>);

impl Throttle {
    fn new() -> Self {
        Throttle(std::sync::Mutex::new((None, 0)))
    }

    /// Runs `log` (given how many were held back since the last one) unless a warning
    /// went out less than a second ago.
    fn warn(&self, log: impl FnOnce(u64)) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let now = tokio::time::Instant::now();
        if g.0
            .is_some_and(|t| now.duration_since(t) < std::time::Duration::from_secs(1))
        {
            g.1 += 1;
            return;
        }
        let held = std::mem::take(&mut g.1);
        g.0 = Some(now);
        drop(g);
        log(held);
    }
}

/// Serves `listener` until `stop`; connections end with it, and calls under way are
/// answered first (for up to [`DRAIN`]): a call that ran to its end is not reported
/// to its client as "stopped" (which says it did nothing).
pub(crate) async fn serve(
    listener: Box<dyn Listener>,
    secret: Secret,
    handler: Arc<dyn Handler>,
    stop: CancellationToken,
) {
    let tasks = TaskTracker::new();
    let calls = TaskTracker::new();
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let handshaking = Arc::new(Handshaking::default());
    let throttle = Arc::new(Throttle::new());
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(permit) = handshaking.enter(&handshakes, peer.ip()) else {
            throttle.warn(|held| {
                warn!(%peer, held_back = held, "refused a connection: too many handshakes in progress from its address, or in all");
            });
            drop(stream);
            continue;
        };
        let (secret, handler, stop) = (secret.clone(), handler.clone(), stop.clone());
        let (throttle, calls) = (throttle.clone(), calls.clone());
        tasks.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                () = connection(stream, peer, secret, handler, permit, &throttle, &calls) => {}
            }
        });
    }
    tasks.close();
    tasks.wait().await;
    calls.close();
    if tokio::time::timeout(DRAIN, calls.wait()).await.is_err() {
        warn!("calls still running {DRAIN:?} after the server stopped");
    }
}

/// How long a stopping server waits for the calls under way.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

async fn connection(
    stream: Socket,
    peer: SocketAddr,
    secret: Secret,
    handler: Arc<dyn Handler>,
    handshake_permit: InHandshake,
    throttle: &Throttle,
    calls: &TaskTracker,
) {
    let mut conn = Framed::new(stream, codec());
    let handshake = async {
        // A peer that closes before it says anything (a local client checking that the
        // socket is alive) is no failed login.
        let Some(hello): Option<Hello> = recv_plain_or_closed(&mut conn).await? else {
            return Ok(None);
        };
        let (challenge, nonce_s) = auth::challenge(&secret, &hello)?;
        send_plain(&mut conn, &challenge).await?;
        let proof: Proof = recv_plain(&mut conn).await?;
        auth::accept(&secret, &hello.nonce, &nonce_s, &proof).map(Some)
    };
    let (mut sealer, mut opener) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(Some(keys))) => keys,
        Ok(Ok(None)) => {
            debug!(%peer, "closed before its handshake");
            return;
        }
        Ok(Err(e)) => {
            throttle.warn(|held| {
                warn!(%peer, error = %e, held_back = held, "refused a peer that did not authenticate");
            });
            return;
        }
        Err(_) => {
            throttle.warn(|held| {
                warn!(%peer, held_back = held, "refused a peer: no handshake within {HANDSHAKE_TIMEOUT:?}");
            });
            return;
        }
    };
    drop(handshake_permit);
    conn.codec_mut().set_max_frame_length(MAX_FRAME);
    let (mut sink, mut frames) = conn.split();
    if sink.send(sealer.seal(b"accepted")).await.is_err() {
        return;
    }
    let (tx, mut rx) = mpsc::channel::<Envelope<Reply>>(256);
    let writer = tokio::spawn(async move {
        // Replies ready together go out in one write.
        while let Some(mut env) = rx.recv().await {
            loop {
                let bytes = match bincode::serialize(&env) {
                    Ok(b) => b,
                    Err(e) => {
                        warn!(error = %e, "encoding a reply");
                        return;
                    }
                };
                if sink.feed(sealer.seal(&bytes)).await.is_err() {
                    return;
                }
                match rx.try_recv() {
                    Ok(next) => env = next,
                    Err(_) => break,
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });
    // Streams end with the connection.
    let closed = CancellationToken::new();
    let _closing = closed.clone().drop_guard();
    while let Some(frame) = frames.next().await {
        let env: Envelope<Request> = match frame
            .map_err(NetError::Io)
            .and_then(|f| opener.open(f))
            .and_then(|b| bincode::deserialize(&b).map_err(NetError::Decode))
        {
            Ok(env) => env,
            Err(e) => {
                warn!(%peer, error = %e, "dropping a connection: bad frame");
                break;
            }
        };
        let (handler, tx) = (handler.clone(), tx.clone());
        if env.body.is_stream() {
            let out = Replies {
                id: env.id,
                tx,
                closed: closed.clone(),
            };
            calls.spawn(async move { handler.stream(env.body, out).await });
            continue;
        }
        calls.spawn(async move {
            let body = handler.handle(env.body).await;
            let _ = tx.send(Envelope { id: env.id, body }).await;
        });
    }
    drop(tx);
    closed.cancel();
    let _ = writer.await;
    debug!(%peer, "connection closed");
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::members::Members;
    use crate::network::client::Client;
    use crate::network::net::tcp;
    use tokio::net::{TcpListener, TcpStream};

    #[derive(Default)]
    struct Counting(AtomicUsize);

    #[async_trait::async_trait]
    impl Handler for Arc<Counting> {
        async fn handle(&self, _req: Request) -> Reply {
            self.0.fetch_add(1, Ordering::SeqCst);
            Reply::Members(Members::default())
        }
    }

    /// A server with `secret` on a free loopback port, counting the requests that reach
    /// it: its address, the count, and the token that stops it.
    async fn counting_server(secret: &Secret) -> (String, Arc<Counting>, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let count = Arc::new(Counting::default());
        let stop = CancellationToken::new();
        tokio::spawn(serve(
            Box::new(listener),
            secret.clone(),
            Arc::new(count.clone()),
            stop.clone(),
        ));
        (addr, count, stop)
    }

    #[tokio::test]
    async fn only_a_peer_with_the_secret_reaches_the_handler() {
        let good = Secret::new("the right cluster secret").expect("secret");
        let bad = Secret::new("a wrong cluster secret!!").expect("secret");
        let (addr, count, stop) = counting_server(&good).await;
        let t = Duration::from_secs(5);

        let stranger = Client::new(addr.clone(), bad, None, tcp());
        let refused = stranger.call(Request::Members, t).await;
        assert!(
            matches!(refused, Err(NetError::AuthFailed(_))),
            "a wrong secret is refused: {refused:?}"
        );
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            0,
            "nothing reached the node"
        );

        // A peer that skips the check and sends a made-up proof gets no further.
        let raw: crate::network::net::Socket =
            Box::new(TcpStream::connect(&addr).await.expect("connect"));
        let mut raw = Framed::new(raw, codec());
        let hello = Hello {
            magic: auth::MAGIC,
            version: auth::VERSION,
            nonce: [7; 32],
        };
        send_plain(&mut raw, &hello).await.expect("hello");
        let _: auth::Challenge = recv_plain(&mut raw).await.expect("challenge");
        send_plain(&mut raw, &Proof { proof: vec![0; 32] })
            .await
            .expect("proof");
        assert!(
            !matches!(raw.next().await, Some(Ok(_))),
            "a forged proof gets no accept, the connection closes"
        );
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            0,
            "nothing reached the node"
        );

        let member = Client::new(addr, good, None, tcp());
        let reply = member.call(Request::Members, t).await.expect("call");
        assert!(matches!(reply, Reply::Members(_)));
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        stop.cancel();
    }

    /// Connections that never authenticate take at most [`MAX_HANDSHAKES_PER_ADDR`]
    /// slots of their address; the ones past that are closed at once, and once the idle
    /// ones go, a member gets in.
    #[tokio::test]
    async fn unauthenticated_connections_are_capped() {
        let secret = Secret::new("the right cluster secret").expect("secret");
        let (addr, _count, stop) = counting_server(&secret).await;
        let mut idle = Vec::new();
        for _ in 0..MAX_HANDSHAKES_PER_ADDR {
            idle.push(TcpStream::connect(&addr).await.expect("connect"));
        }
        // Give the server time to take them all in.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut extra = TcpStream::connect(&addr).await.expect("connect");
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::io::AsyncReadExt::read(&mut extra, &mut buf),
        )
        .await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "a connection past the cap is closed at once (well before the {HANDSHAKE_TIMEOUT:?} handshake timeout): {read:?}"
        );
        drop(idle);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let member = Client::new(addr, secret, None, tcp());
        let reply = member
            .call(Request::Members, Duration::from_secs(5))
            .await
            .expect("a member gets in once the idle connections are gone");
        assert!(matches!(reply, Reply::Members(_)));
        stop.cancel();
    }

    /// A TCP proxy to `upstream` on a free loopback port. Bumping the returned
    /// generation freezes every connection opened before: it stays open but forwards
    /// nothing more, either way (a peer host that froze, a middlebox that lost its
    /// state). Connections opened after work.
    async fn freezing_proxy(upstream: String) -> (String, Arc<AtomicUsize>) {
        use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
        type Half<T> = Box<T>;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let generation = Arc::new(AtomicUsize::new(0));
        let current = generation.clone();
        tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let Ok(up) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let born = current.load(Ordering::SeqCst);
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                let ways: [(
                    Half<dyn AsyncRead + Send + Unpin>,
                    Half<dyn AsyncWrite + Send + Unpin>,
                ); 2] = [(Box::new(dr), Box::new(uw)), (Box::new(ur), Box::new(dw))];
                for (mut r, mut w) in ways {
                    let current = current.clone();
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 8192];
                        while let Ok(n) = r.read(&mut buf).await {
                            if n == 0 {
                                return;
                            }
                            if current.load(Ordering::SeqCst) != born {
                                // Frozen: hold the sockets open, deliver nothing.
                                std::future::pending::<()>().await;
                            }
                            if w.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        (addr, generation)
    }

    /// A connection that goes silent without failing is given up once a call it did
    /// not answer is past its deadline and nothing was heard for `SILENT_FOR`, so the
    /// next call connects again instead of timing out on it too (TCP would report the
    /// dead connection only after many minutes).
    #[tokio::test]
    async fn a_connection_silent_past_a_calls_deadline_is_replaced() {
        let secret = Secret::new("the right cluster secret").expect("secret");
        let (addr, count, stop) = counting_server(&secret).await;
        let (proxy, generation) = freezing_proxy(addr).await;
        let member = Client::new(proxy, secret, None, tcp());
        let t = Duration::from_secs(5);
        member
            .call(Request::Members, t)
            .await
            .expect("a first call");
        generation.fetch_add(1, Ordering::SeqCst);
        let lost = member
            .call(Request::Members, Duration::from_millis(300))
            .await;
        assert!(matches!(lost, Err(NetError::Timeout(_))), "{lost:?}");
        // Given up once nothing has been heard for SILENT_FOR past that deadline.
        tokio::time::sleep(crate::network::client::SILENT_FOR).await;
        let reply = member
            .call(Request::Members, t)
            .await
            .expect("the call after a silent timeout goes out on a new connection");
        assert!(matches!(reply, Reply::Members(_)));
        let reached = count.0.load(Ordering::SeqCst);
        assert_eq!(
            reached, 2,
            "the first and the third call reach the node, the lost one not"
        );
        stop.cancel();
    }
}

//! A TCP proxy on loopback that a test can cut and restore, to drop the network between
//! a client and a server without touching either, or pause, to hold the server's bytes
//! back (its sends block once the flow-control windows fill).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};

/// Forwards connections to `upstream` while open; [`cut`](Proxy::cut) drops every
/// connection and refuses new ones until [`restore`](Proxy::restore). Stops on drop.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

#[derive(Debug)]
struct State {
    open: AtomicBool,
    conns: Mutex<Vec<AbortHandle>>,
    /// While true, nothing is read from the server.
    paused: watch::Sender<bool>,
}

impl Proxy {
    /// Starts a proxy to `upstream` (`host:port`) on a free loopback port.
    pub async fn start(upstream: &str) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            open: AtomicBool::new(true),
            conns: Mutex::new(Vec::new()),
            paused: watch::Sender::new(false),
        });
        let upstream = upstream.to_owned();
        let st = state.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if !st.open.load(Ordering::Acquire) {
                    continue; // dropped: the client sees the connection close
                }
                let upstream = upstream.clone();
                let paused = st.paused.subscribe();
                let task = tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(&upstream).await {
                        let (mut from_server, mut to_server) = server.into_split();
                        let (mut from_client, to_client) = client.into_split();
                        let up = async {
                            tokio::io::copy(&mut from_client, &mut to_server).await?;
                            to_server.shutdown().await
                        };
                        let down = forward(&mut from_server, to_client, paused);
                        let _ = tokio::join!(up, down);
                    }
                });
                st.conns
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(task.abort_handle());
            }
        });
        Ok(Proxy {
            addr,
            state,
            accept,
        })
    }

    /// The proxy's URL, `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        self.state.open.store(false, Ordering::Release);
        for c in self
            .state
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            c.abort();
        }
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.state.open.store(true, Ordering::Release);
    }

    /// Stops reading from the server (connections stay open): the server's sends
    /// block once the socket buffers and its flow-control windows are full.
    pub fn pause(&self) {
        self.state.paused.send_replace(true);
    }

    /// Forwards the server's bytes again.
    pub fn resume(&self) {
        self.state.paused.send_replace(false);
    }
}

/// Copies `from` to `to`, reading nothing while `paused`.
async fn forward(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut paused: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if paused.wait_for(|p| !*p).await.is_err() {
            return Ok(());
        }
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

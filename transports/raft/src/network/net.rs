//! Where connections come from: TCP, or (in a simulation) a simulated network. The
//! protocol above ([`super::frame`], [`super::auth`], client and server) sees only a
//! byte stream, so a simulation runs it unchanged.

use std::fmt::Debug;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

/// A connection's byte stream.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + Debug + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + Debug + 'static> Stream for T {}

/// A boxed connection.
pub type Socket = Box<dyn Stream>;

/// Connects and listens.
#[async_trait::async_trait]
pub trait Net: Send + Sync + Debug + 'static {
    /// Connects to `addr` (`host:port`).
    async fn connect(&self, addr: &str) -> io::Result<Socket>;

    /// Listens on `addr`.
    async fn bind(&self, addr: SocketAddr) -> io::Result<Box<dyn Listener>>;
}

/// A bound listener.
#[async_trait::async_trait]
pub trait Listener: Send + Sync + Debug {
    /// The address it is bound to.
    fn local_addr(&self) -> io::Result<SocketAddr>;

    /// The next connection and the peer's address.
    ///
    /// # Cancel safety
    /// Must be cancel safe: a dropped call loses no connection.
    async fn accept(&self) -> io::Result<(Socket, SocketAddr)>;
}

/// TCP, with Nagle's algorithm off (calls are small and latency-bound).
#[derive(Debug, Clone, Copy, Default)]
pub struct Tcp;

/// The network every store and client uses unless a test sets another.
pub(crate) fn tcp() -> Arc<dyn Net> {
    Arc::new(Tcp)
}

#[async_trait::async_trait]
impl Net for Tcp {
    async fn connect(&self, addr: &str) -> io::Result<Socket> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Box::new(stream))
    }

    async fn bind(&self, addr: SocketAddr) -> io::Result<Box<dyn Listener>> {
        Ok(Box::new(tokio::net::TcpListener::bind(addr).await?))
    }
}

#[async_trait::async_trait]
impl Listener for tokio::net::TcpListener {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        tokio::net::TcpListener::local_addr(self)
    }

    async fn accept(&self) -> io::Result<(Socket, SocketAddr)> {
        let (stream, peer) = tokio::net::TcpListener::accept(self).await?;
        // A refused option leaves a working (if slower) connection.
        let _ = stream.set_nodelay(true);
        Ok((Box::new(stream), peer))
    }
}

#[async_trait::async_trait]
impl Listener for tokio::net::UnixListener {
    /// A Unix socket has no IP address: the unspecified one stands for it.
    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    async fn accept(&self) -> io::Result<(Socket, SocketAddr)> {
        let (stream, _) = tokio::net::UnixListener::accept(self).await?;
        Ok((Box::new(stream), SocketAddr::from(([0, 0, 0, 0], 0))))
    }
}

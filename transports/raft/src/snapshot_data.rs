//! openraft's `SnapshotData` for this store: bytes made when first used.
//!
//! Why lazy: the state machine's tables are the snapshot (see `storage::sm::snapshot`).
//! openraft builds snapshots to purge the log and asks for the current one at start for
//! its metadata; neither reads the bytes, so only a follower that needs the state pays
//! for encoding it.

use std::io::{self, Cursor, SeekFrom};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite};

type Encode = Box<dyn FnOnce(&AtomicBool) -> Result<Vec<u8>, String> + Send>;

/// A raft snapshot's bytes: encoded the first time they are read, written or sought
/// (the storage's are a pinned view of the state machine), or already there (one
/// received from a leader).
pub struct SnapshotData {
    data: Data,
    /// A seek asked for before the bytes were there.
    seek: Option<SeekFrom>,
    /// Set when this is dropped, to stop an encoding under way.
    dropped: Arc<AtomicBool>,
}

impl Drop for SnapshotData {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::Relaxed);
    }
}

enum Data {
    Pending(Option<Encode>),
    Encoding(tokio::task::JoinHandle<Result<Vec<u8>, String>>),
    Bytes(Cursor<Vec<u8>>),
    Failed(String),
}

impl std::fmt::Debug for SnapshotData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.data {
            Data::Pending(_) => "pending",
            Data::Encoding(_) => "encoding",
            Data::Bytes(_) => "bytes",
            Data::Failed(_) => "failed",
        };
        f.debug_struct("SnapshotData")
            .field("state", &state)
            .finish()
    }
}

impl SnapshotData {
    /// Bytes `encode` makes when they are first needed, on the blocking pool (inline
    /// under a simulation). `encode` may stop early, with an error, once the flag it is
    /// given is set: nobody wants the bytes any more.
    pub(crate) fn lazy(
        encode: impl FnOnce(&AtomicBool) -> Result<Vec<u8>, String> + Send + 'static,
    ) -> Self {
        SnapshotData {
            data: Data::Pending(Some(Box::new(encode))),
            seek: None,
            dropped: Arc::default(),
        }
    }

    /// Bytes already encoded (a snapshot being received, or a test's).
    pub(crate) fn bytes(data: Vec<u8>) -> Self {
        SnapshotData {
            data: Data::Bytes(Cursor::new(data)),
            seek: None,
            dropped: Arc::default(),
        }
    }

    /// The encoded bytes.
    ///
    /// # Cancel safety
    /// Dropping the future drops the snapshot; an encoding under way finishes on the
    /// blocking pool and is discarded.
    pub(crate) async fn into_bytes(mut self) -> io::Result<Vec<u8>> {
        std::future::poll_fn(|cx| self.poll_cursor(cx).map_ok(|_| ())).await?;
        match &mut self.data {
            Data::Bytes(c) => Ok(std::mem::take(c.get_mut())),
            _ => Err(io::Error::other("snapshot bytes missing")),
        }
    }

    /// The bytes, encoding them first if they are not there yet; a seek asked for
    /// meanwhile is made.
    fn poll_cursor(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<&mut Cursor<Vec<u8>>>> {
        loop {
            match &mut self.data {
                Data::Bytes(_) => break,
                Data::Failed(e) => return Poll::Ready(Err(io::Error::other(e.clone()))),
                Data::Pending(encode) => {
                    let Some(encode) = encode.take() else {
                        self.data = Data::Failed("snapshot encoder lost".into());
                        continue;
                    };
                    let dropped = self.dropped.clone();
                    let encode = move || encode(&dropped);
                    self.data = if crate::rt::inline() {
                        done(encode())
                    } else {
                        Data::Encoding(tokio::task::spawn_blocking(encode))
                    };
                }
                Data::Encoding(job) => {
                    let res = ready!(Pin::new(job).poll(cx));
                    self.data = done(res.unwrap_or_else(|e| Err(e.to_string())));
                }
            }
        }
        let Data::Bytes(c) = &mut self.data else {
            return Poll::Ready(Err(io::Error::other("snapshot bytes missing")));
        };
        if let Some(pos) = self.seek.take() {
            Pin::new(&mut *c).start_seek(pos)?;
        }
        Poll::Ready(Ok(c))
    }
}

fn done(res: Result<Vec<u8>, String>) -> Data {
    match res {
        Ok(bytes) => Data::Bytes(Cursor::new(bytes)),
        Err(e) => Data::Failed(format!("encoding the snapshot: {e}")),
    }
}

impl AsyncRead for SnapshotData {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let c = ready!(self.get_mut().poll_cursor(cx))?;
        Pin::new(c).poll_read(cx, buf)
    }
}

impl AsyncWrite for SnapshotData {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let c = ready!(self.get_mut().poll_cursor(cx))?;
        Pin::new(c).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let c = ready!(self.get_mut().poll_cursor(cx))?;
        Pin::new(c).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let c = ready!(self.get_mut().poll_cursor(cx))?;
        Pin::new(c).poll_shutdown(cx)
    }
}

impl AsyncSeek for SnapshotData {
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
        let this = self.get_mut();
        match &mut this.data {
            Data::Bytes(c) => Pin::new(c).start_seek(position),
            _ => {
                this.seek = Some(position);
                Ok(())
            }
        }
    }

    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        let c = ready!(self.get_mut().poll_cursor(cx))?;
        Pin::new(c).poll_complete(cx)
    }
}

//! Framing: length-delimited frames, and the plain (unsealed) messages of the
//! handshake. Below both the client and the server.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use super::error::NetError;

/// The largest frame accepted once a peer is authenticated.
pub(crate) const MAX_FRAME: usize = 256 << 20;
/// The largest frame accepted before (handshake messages are small).
pub(crate) const HANDSHAKE_FRAME: usize = 1024;
/// How long a handshake may take.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) type Conn = Framed<super::net::Socket, LengthDelimitedCodec>;

pub(crate) fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(HANDSHAKE_FRAME)
        .new_codec()
}

pub(crate) async fn send_plain<T: serde::Serialize>(
    conn: &mut Conn,
    msg: &T,
) -> Result<(), NetError> {
    let bytes = bincode::serialize(msg).map_err(NetError::Decode)?;
    conn.send(bytes::Bytes::from(bytes))
        .await
        .map_err(NetError::Io)?;
    Ok(())
}

pub(crate) async fn recv_plain<T: serde::de::DeserializeOwned>(
    conn: &mut Conn,
) -> Result<T, NetError> {
    recv_plain_or_closed(conn)
        .await?
        .ok_or(NetError::AuthFailed(
            "the peer closed the connection during the handshake",
        ))
}

/// [`recv_plain`], with `None` when the peer closed the connection first.
pub(crate) async fn recv_plain_or_closed<T: serde::de::DeserializeOwned>(
    conn: &mut Conn,
) -> Result<Option<T>, NetError> {
    match conn.next().await {
        Some(Ok(frame)) => bincode::deserialize(&frame)
            .map(Some)
            .map_err(NetError::Decode),
        Some(Err(e)) => Err(NetError::Io(e)),
        None => Ok(None),
    }
}

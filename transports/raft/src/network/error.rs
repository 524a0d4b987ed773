//! Errors of node-to-node calls.

/// A call to another node failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// The peer could not be reached (connect refused or timed out).
    #[error("cannot connect to {addr}")]
    Connect {
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The peer, or this node, failed the cluster-secret check.
    #[error("authentication failed: {0}")]
    AuthFailed(&'static str),
    /// The peer speaks another protocol version.
    #[error("peer speaks protocol version {0}")]
    Version(u16),
    /// A frame failed its integrity check, or is malformed.
    #[error("a frame failed its integrity check")]
    BadFrame,
    /// A message did not decode.
    #[error("undecodable message")]
    Decode(#[source] bincode::Error),
    /// The connection was given up before the request was written: it did not run.
    #[error("connection to {0} given up before the request was sent")]
    Unsent(String),
    /// The connection broke after the request was sent: its outcome is unknown.
    #[error("connection to {0} closed")]
    Closed(String),
    /// No answer in time; the outcome is unknown.
    #[error("no answer from {0} in time")]
    Timeout(String),
    /// The system random source failed.
    #[error("no randomness for a nonce")]
    Random,
    /// An I/O error on an established connection.
    #[error("I/O error")]
    Io(#[from] std::io::Error),
}

impl NetError {
    /// Whether the request certainly did not reach the peer (safe to send elsewhere).
    pub(crate) fn not_sent(&self) -> bool {
        matches!(
            self,
            NetError::Connect { .. }
                | NetError::AuthFailed(_)
                | NetError::Version(_)
                | NetError::Unsent(_)
        )
    }
}

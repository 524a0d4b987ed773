//! Errors of cluster operations (members and remote clients).

use std::time::Duration;

use crate::members::Refusal;
use crate::network::NetError;

/// A cluster operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// The store was opened without a [`ClusterConfig`](crate::ClusterConfig).
    #[error("this store is not part of a cluster")]
    NotClustered,
    /// No leader answered in time.
    #[error("no leader answered within {0:?}")]
    NoLeader(Duration),
    /// Another membership change was still in progress when the time ran out.
    #[error("another membership change is in progress")]
    InProgress,
    /// The leader refused the change.
    #[error("the leader refused: {0}")]
    Refused(Refusal),
    /// A remote client was given no endpoints.
    #[error("no endpoints to connect to")]
    NoEndpoints,
    /// A member answered with a message this version does not expect for the call.
    #[error("unexpected reply from a member")]
    UnexpectedReply,
    /// The call failed after it was sent: its outcome is unknown.
    #[error("call failed")]
    Net(#[source] NetError),
    /// The peer refused this node's cluster secret, or this node refused the peer's.
    #[error("peer not authenticated")]
    Unauthenticated(#[source] NetError),
    /// No member answered in time (a remote client).
    #[error("no member answered within {0:?}")]
    NoMember(Duration),
    /// This node left the group: it keeps its data for local reads, but no longer
    /// writes, serves linearizable reads or new watches.
    #[error(
        "this node has left the cluster (its data is kept; to join again, start from a fresh data directory)"
    )]
    Left,
    /// This node is stopping.
    #[error("the node is stopping")]
    Stopped,
    /// This member restarted after a crash and no leader has yet confirmed how far the
    /// log is committed, so its replica may be older than what it served before: it
    /// serves no local read or new watch until then.
    #[error(
        "this member restarted after a crash and is not yet caught up with its group (it needs a leader)"
    )]
    CatchingUp,
    /// No process serves a local endpoint in this data directory (none holds the store,
    /// or the one that did crashed): open the store directly.
    #[error("no process serves the store in {} ({reason})", dir.display())]
    NoLocalEndpoint {
        /// The data directory.
        dir: std::path::PathBuf,
        /// What was missing.
        reason: String,
    },
}

impl ClusterError {
    /// Whether trying the same call again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ClusterError::NoLeader(_)
                | ClusterError::NoMember(_)
                | ClusterError::InProgress
                | ClusterError::Net(_)
                | ClusterError::CatchingUp
        )
    }
}

impl From<ClusterError> for datasync::StoreError {
    fn from(e: ClusterError) -> Self {
        match e {
            ClusterError::Stopped => datasync::StoreError::Stopped,
            e @ ClusterError::Unauthenticated(_) => {
                datasync::StoreError::Unauthenticated(Box::new(e))
            }
            e if e.is_retryable() => datasync::StoreError::Unavailable(Box::new(e)),
            e => datasync::StoreError::Backend(Box::new(e)),
        }
    }
}

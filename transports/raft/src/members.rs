//! Group membership as the public API shows it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::types::{NodeId, StoredMembership};

/// A member's part in the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Role {
    /// Votes and counts towards the quorum.
    Voter,
    /// Receives the log but does not vote.
    Learner,
}

/// A committed group configuration.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Members {
    /// Voters and their addresses.
    pub voters: BTreeMap<NodeId, String>,
    /// Learners and their addresses.
    pub learners: BTreeMap<NodeId, String>,
    /// Whether the group is between two voter sets (joint consensus).
    pub joint: bool,
    /// The log index of this configuration.
    pub log_index: u64,
}

impl Members {
    pub(crate) fn from_stored(m: &StoredMembership) -> Members {
        let addr = |id: &NodeId| {
            m.membership()
                .get_node(id)
                .map(|n| n.addr.clone())
                .unwrap_or_default()
        };
        Members {
            voters: m.voter_ids().map(|id| (id, addr(&id))).collect(),
            learners: m
                .membership()
                .learner_ids()
                .map(|id| (id, addr(&id)))
                .collect(),
            joint: m.membership().get_joint_config().len() > 1,
            log_index: m.log_id().map_or(0, |l| l.index),
        }
    }

    /// `id`'s role, if it is a member.
    pub fn role(&self, id: NodeId) -> Option<Role> {
        if self.voters.contains_key(&id) {
            Some(Role::Voter)
        } else if self.learners.contains_key(&id) {
            Some(Role::Learner)
        } else {
            None
        }
    }
}

/// Why the leader refused a membership change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The change would leave the group without a voter.
    #[error("the change would leave no voter")]
    NoVoterLeft,
    /// The node to promote is not a learner of the group (it was removed meanwhile).
    #[error("node {0} is not a learner of the group")]
    NotALearner(NodeId),
    /// The store is a single node, not a cluster member (reached through its local
    /// endpoint).
    #[error("this store is a single node, not a cluster")]
    NotClustered,
    /// The node to register is a member already.
    #[error("node {0} is a member already")]
    AlreadyMember(NodeId),
    /// Another member (this one) has the address already.
    #[error("node {0} has that address already")]
    AddressInUse(NodeId),
    /// The node is not a member of the group.
    #[error("node {0} is not a member of the group")]
    NotAMember(NodeId),
    /// The node to promote votes already.
    #[error("node {0} is a voter already")]
    AlreadyVoter(NodeId),
    /// The learner to promote has not replicated enough of the leader's log (etcd's
    /// rule: 90 % of it).
    #[error(
        "learner {id} is not in sync with the leader (it holds log index {matched} of {leader})"
    )]
    NotInSync {
        /// The learner.
        id: NodeId,
        /// The last log index it holds, as the leader knows.
        matched: u64,
        /// The leader's last log index.
        leader: u64,
    },
    /// A voter's address cannot be changed: the leader sends to the new address as
    /// soon as the change is in its log, so committing it would need the voter there
    /// already (a wrong address would stall the group). Remove it and add it again.
    #[error("node {0} is a voter: only a learner's address can be changed")]
    VoterMove(NodeId),
    /// The address is not `host:port`.
    #[error("the address is not host:port")]
    BadAddress,
}

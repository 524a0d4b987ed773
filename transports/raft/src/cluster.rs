//! Clusters: several stores replicating one state over the authenticated network
//! (how it works: [`ClusterConfig`]).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use openraft::error::{ChangeMembershipError, CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, Raft};

use crate::error::ClusterError;
use crate::members::{Members, Refusal, Role};
use crate::network::Secret;
use crate::network::client::Pool;
use crate::network::link::Link;
use crate::network::server::{Handler, Replies};
use crate::network::wire::{
    ClientOp, ClientReply, Reply, Request, ServiceError, WireError, WireItem,
};
use crate::propose::{Proposals, ProposeError};
use crate::routing::route;
use crate::storage::sm;
use crate::types::{NodeId, RequestId, TypeConfig, leader_of};

/// How a store takes part in a cluster.
///
/// Every member opens its store with this config: an address to listen on, the
/// shared [`Secret`], and either nothing to join (the first member bootstraps a new
/// group on its first start) or the addresses of existing members. A joining node asks
/// any member; the request is routed to the leader, which adds it as a learner, waits
/// until it has caught up (log or snapshot), then makes it a voter unless it joins as a
/// [`Role::Learner`]. Later starts restart from disk with the same identity and never
/// join or bootstrap again.
///
/// Writes on a follower are forwarded to the leader (redirects followed, retried while
/// there is no leader, within [`ClusterConfig::forward_timeout`]); the caller never
/// sees raft's `ForwardToLeader`. A forwarded write returns once it is applied on this
/// member too, so a write is visible to the next local read and to local watches.
/// Linearizable reads on a follower ask the leader for its read index and wait until
/// this member has applied it; local reads read the replica as it is.
///
/// Membership is observed from the **committed** configuration only (the state
/// machine's), so a crashed member is still a member: only a [`leave`] removes one.
///
/// [`leave`]: crate::RaftStore::remove_member
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClusterConfig {
    /// Where this node listens for the other members.
    pub listen: SocketAddr,
    /// The address other nodes use to reach this one (default: the bound `listen`
    /// address; required when `listen` is a wildcard address).
    pub advertise: Option<String>,
    /// The shared cluster secret.
    pub secret: Secret,
    /// Members to join through on the first start; empty bootstraps a new group.
    pub join: Vec<String>,
    /// Whether this node joins as a voter or a learner.
    pub role: Role,
    /// How long a forwarded write, read index or membership change may look for the
    /// leader (default 10 s).
    pub forward_timeout: Duration,
    /// How long joining may take, catching up included (default 300 s).
    pub join_timeout: Duration,
    /// Raft heartbeat interval (default 100 ms).
    pub heartbeat: Duration,
    /// Raft election timeout range (default 500–1000 ms): a follower that hears no
    /// leader for a random time in it starts an election.
    pub election: (Duration, Duration),
    /// How messages travel: the real link, or injected faults (tests only).
    pub(crate) link: Option<Arc<dyn Link>>,
    /// How connections are made: TCP, or a simulated network (tests only).
    pub(crate) net: Arc<dyn crate::network::net::Net>,
}

/// How long the leader waits for a learner to catch up in one call (see
/// `Service::add_caught_up`).
const CATCH_UP_WAIT: Duration = Duration::from_secs(5);

impl ClusterConfig {
    /// A member listening on `listen` with `secret`, bootstrapping a new group unless
    /// [`join`](Self::join) names members.
    pub fn new(listen: SocketAddr, secret: Secret) -> Self {
        ClusterConfig {
            listen,
            advertise: None,
            secret,
            join: Vec::new(),
            role: Role::Voter,
            forward_timeout: Duration::from_secs(10),
            join_timeout: Duration::from_secs(300),
            heartbeat: Duration::from_millis(100),
            election: (Duration::from_millis(500), Duration::from_millis(1000)),
            link: None,
            net: crate::network::net::tcp(),
        }
    }

    /// Makes connections and listens through `net` instead of TCP (a simulated
    /// network).
    #[cfg(feature = "testing")]
    #[must_use]
    pub fn net(mut self, net: Arc<dyn crate::testing::Net>) -> Self {
        self.net = net;
        self
    }

    /// Joins an existing group through these members on the first start.
    #[must_use]
    pub fn join<S: Into<String>>(mut self, members: impl IntoIterator<Item = S>) -> Self {
        self.join = members.into_iter().map(Into::into).collect();
        self
    }

    /// Joins as a non-voting learner.
    #[must_use]
    pub fn learner(mut self) -> Self {
        self.role = Role::Learner;
        self
    }

    /// Sets the address other nodes reach this one at.
    #[must_use]
    pub fn advertise(mut self, addr: impl Into<String>) -> Self {
        self.advertise = Some(addr.into());
        self
    }

    /// Sets raft's heartbeat and election timeouts.
    #[must_use]
    pub fn timing(mut self, heartbeat: Duration, election: (Duration, Duration)) -> Self {
        self.heartbeat = heartbeat;
        self.election = election;
        self
    }

    /// Sets how long forwarded calls may look for the leader.
    #[must_use]
    pub fn forward_timeout(mut self, timeout: Duration) -> Self {
        self.forward_timeout = timeout;
        self
    }

    pub(crate) fn validate(&self) -> Result<(), &'static str> {
        if self.advertise.is_none() && self.listen.ip().is_unspecified() {
            return Err("cluster.advertise is required when listening on a wildcard address");
        }
        if self.heartbeat.is_zero() || self.election.0 <= self.heartbeat.saturating_mul(2) {
            return Err("the election timeout must exceed twice the heartbeat");
        }
        if self.election.1 <= self.election.0 {
            return Err("the election timeout range must not be empty");
        }
        // openraft adds and multiplies these in milliseconds.
        if self.heartbeat > Duration::from_secs(60) || self.election.1 > Duration::from_secs(600) {
            return Err(
                "the heartbeat must be at most 60 s and the election timeout at most 10 min",
            );
        }
        if self.forward_timeout.is_zero() || self.forward_timeout > Duration::from_secs(86_400) {
            return Err("the forward timeout must be positive and at most a day");
        }
        Ok(())
    }
}

/// What a member serves to its peers (and, on the leader, to itself).
pub(crate) struct Service {
    pub(crate) raft: Raft<TypeConfig>,
    pub(crate) proposals: Proposals,
    pub(crate) sm: Arc<sm::Shared>,
    /// Remote clients' operations, served by the member's store (set once it is open).
    pub(crate) clients: OnceLock<Box<dyn ClientService>>,
    /// When a leader's append last reached this member (see [`Node::hears_leader`]).
    pub(crate) leader_heard: std::sync::Mutex<Option<tokio::time::Instant>>,
}

/// What a member's store answers remote clients (`serve.rs`).
///
/// Why set late: a member answers raft RPCs while its store opens (a joining node is
/// caught up through them before `RaftStore::open` returns), so the server starts
/// first and clients are refused as stopped until the store is there. The store holds
/// the server, so this side holds the store weakly.
#[async_trait::async_trait]
pub(crate) trait ClientService: Send + Sync + 'static {
    /// Runs one operation.
    async fn op(&self, op: ClientOp, id: Option<RequestId>) -> Result<ClientReply, WireError>;
    /// Streams a watch to `out` until the client goes away.
    async fn watch(
        &self,
        name: String,
        prefixes: Vec<String>,
        queue_capacity: usize,
        resume: Option<u64>,
        out: Replies,
    );
    /// The committed configuration (`None` once the store is gone).
    fn members(&self) -> Option<crate::members::Members>;
}

fn change_error(e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> ServiceError {
    match e {
        RaftError::Fatal(_) => ServiceError::Stopped,
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => ServiceError::NotLeader {
            leader: leader_of(&f),
        },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(
            ChangeMembershipError::InProgress(_),
        )) => ServiceError::InProgress,
        RaftError::APIError(ClientWriteError::ChangeMembershipError(
            ChangeMembershipError::EmptyMembership(_),
        )) => ServiceError::Refused(Refusal::NoVoterLeft),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(
            ChangeMembershipError::LearnerNotFound(l),
        )) => ServiceError::Refused(Refusal::NotALearner(l.node_id)),
    }
}

fn check_error(e: RaftError<NodeId, CheckIsLeaderError<NodeId, BasicNode>>) -> ServiceError {
    match e {
        RaftError::Fatal(_) => ServiceError::Stopped,
        RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)) => ServiceError::NotLeader {
            leader: leader_of(&f),
        },
        RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_)) => ServiceError::NoQuorum,
    }
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service").finish_non_exhaustive()
    }
}

impl Service {
    /// A leader reached this member (see [`Node::hears_leader`]).
    fn heard(&self) {
        *self.leader_heard.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(tokio::time::Instant::now());
    }

    /// A leader's message with `vote` arrived: heard, unless the vote is older than
    /// this member's.
    fn heard_from(&self, vote: &openraft::Vote<NodeId>) {
        let current = self.raft.metrics().borrow().vote;
        if *vote >= current {
            self.heard();
        }
    }

    fn members(&self) -> Members {
        Members::from_stored(&self.sm.membership.borrow())
    }

    /// A member that knows another leader redirects membership changes itself (openraft
    /// would log the redirect as an error).
    fn redirect(&self) -> Result<(), ServiceError> {
        let m = self.raft.metrics();
        let m = m.borrow();
        match m.current_leader {
            Some(l) if l != m.id => Err(ServiceError::NotLeader {
                leader: m
                    .membership_config
                    .membership()
                    .get_node(&l)
                    .map(|n| (l, n.addr.clone())),
            }),
            _ => Ok(()),
        }
    }

    async fn join(&self, id: NodeId, addr: String, voter: bool) -> Result<u64, ServiceError> {
        self.redirect()?;
        let now = self.members();
        let change = |c| async move {
            self.raft
                .change_membership(c, false)
                .await
                .map(|r| r.log_id.index)
                .map_err(change_error)
        };
        match now.role(id) {
            Some(Role::Voter) => Ok(now.log_index),
            Some(Role::Learner) if !voter => Ok(now.log_index),
            Some(Role::Learner) => {
                // Caught up first (as a new member is): a learner registered before it
                // ran, or one restarting far behind, must not take a vote without the
                // log.
                let addr = now.learners.get(&id).cloned().unwrap_or(addr);
                self.add_caught_up(id, addr).await?;
                change(ChangeMembers::AddVoterIds(BTreeSet::from([id]))).await
            }
            None => {
                let added = self.add_caught_up(id, addr).await?;
                if voter {
                    change(ChangeMembers::AddVoterIds(BTreeSet::from([id]))).await
                } else {
                    Ok(added)
                }
            }
        }
    }

    /// Adds (or re-adds) learner `id` and waits until it has caught up, at most
    /// [`CATCH_UP_WAIT`]: then `InProgress`, which a joining member retries (the
    /// learner stays). Why bounded: openraft waits for as long as this node leads, in a
    /// task no caller would be waiting on once its own call timed out, and which would
    /// promote the node whenever it caught up.
    async fn add_caught_up(&self, id: NodeId, addr: String) -> Result<u64, ServiceError> {
        match tokio::time::timeout(
            CATCH_UP_WAIT,
            self.raft.add_learner(id, BasicNode::new(addr), true),
        )
        .await
        {
            Ok(added) => added.map(|r| r.log_id.index).map_err(change_error),
            Err(_) => Err(ServiceError::InProgress),
        }
    }

    /// etcd's `member add`: the node is added now as a learner, whether or not it
    /// runs; the leader replicates to it once it answers. It becomes a voter when it
    /// joins as one, once caught up (see `join`), or by `promote`.
    ///
    /// Why never a voter at once, as etcd does: openraft changes voters through a joint
    /// configuration that a majority of the new voters must commit, so a voter that does
    /// not run yet would stall every write of a group with a member down (and of a single
    /// node) until it ran. The same learner at the same address again is no change (a
    /// retry).
    async fn register(&self, id: NodeId, addr: String) -> Result<u64, ServiceError> {
        self.redirect()?;
        let now = self.members();
        match now.role(id) {
            Some(Role::Learner) if now.learners.get(&id) == Some(&addr) => {
                return Ok(now.log_index);
            }
            Some(_) => return Err(ServiceError::Refused(Refusal::AlreadyMember(id))),
            None => {}
        }
        // Two ids at one address would be one process with two votes.
        if let Some((&other, _)) = now
            .voters
            .iter()
            .chain(&now.learners)
            .find(|(_, a)| **a == addr)
        {
            return Err(ServiceError::Refused(Refusal::AddressInUse(other)));
        }
        self.raft
            .add_learner(id, BasicNode::new(addr), false)
            .await
            .map(|r| r.log_id.index)
            .map_err(change_error)
    }

    /// etcd's `member update`: learner `id` is reached at `addr` from now on; the member
    /// itself must listen there (restart it with that address). No change when it is
    /// there already; refused for a voter (see `Refusal::VoterMove`), for an address
    /// another member has, and for one that is not `host:port`.
    async fn update(&self, id: NodeId, addr: String) -> Result<u64, ServiceError> {
        self.redirect()?;
        let now = self.members();
        if now.voters.contains_key(&id) {
            return Err(ServiceError::Refused(Refusal::VoterMove(id)));
        }
        match now.learners.get(&id) {
            None => return Err(ServiceError::Refused(Refusal::NotAMember(id))),
            Some(a) if *a == addr => return Ok(now.log_index),
            Some(_) => {}
        }
        let valid = addr.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty()
                && !host.contains(['/', ' '])
                && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !valid {
            return Err(ServiceError::Refused(Refusal::BadAddress));
        }
        if let Some((&other, _)) = now
            .voters
            .iter()
            .chain(&now.learners)
            .find(|(o, a)| **a == addr && **o != id)
        {
            return Err(ServiceError::Refused(Refusal::AddressInUse(other)));
        }
        // `SetNodes` replaces the node's entry (openraft warns that pointing an id at
        // another process splits the group: here it is the same member, moved).
        let nodes = std::collections::BTreeMap::from([(id, BasicNode::new(addr))]);
        self.raft
            .change_membership(openraft::ChangeMembers::SetNodes(nodes), false)
            .await
            .map(|r| r.log_id.index)
            .map_err(change_error)
    }

    /// etcd's `member promote`: refused unless the learner holds 90 % of the leader's
    /// log (etcd's rule), so a learner that never started cannot take a vote.
    async fn promote(&self, id: NodeId) -> Result<u64, ServiceError> {
        self.redirect()?;
        match self.members().role(id) {
            None => return Err(ServiceError::Refused(Refusal::NotAMember(id))),
            Some(Role::Voter) => return Err(ServiceError::Refused(Refusal::AlreadyVoter(id))),
            Some(Role::Learner) => {}
        }
        let (matched, leader) = {
            let m = self.raft.metrics().borrow().clone();
            let matched = m
                .replication
                .as_ref()
                .and_then(|r| r.get(&id).cloned().flatten())
                .map_or(0, |l| l.index);
            (matched, m.last_log_index.unwrap_or(0))
        };
        if matched.saturating_mul(10) < leader.saturating_mul(9) {
            return Err(ServiceError::Refused(Refusal::NotInSync {
                id,
                matched,
                leader,
            }));
        }
        self.raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
            .map(|r| r.log_id.index)
            .map_err(change_error)
    }

    async fn leave(&self, id: NodeId) -> Result<u64, ServiceError> {
        self.redirect()?;
        let now = self.members();
        let ids = BTreeSet::from([id]);
        let change = match now.role(id) {
            None => return Ok(now.log_index),
            Some(Role::Voter) => ChangeMembers::RemoveVoters(ids),
            Some(Role::Learner) => ChangeMembers::RemoveNodes(ids),
        };
        self.raft
            .change_membership(change, false)
            .await
            .map(|r| r.log_id.index)
            .map_err(change_error)
    }
}

#[async_trait::async_trait]
impl Handler for Service {
    async fn handle(&self, req: Request) -> Reply {
        match req {
            Request::Append(r) => {
                // Heard on arrival (a slow append must not make a leader look gone) from a
                // leader at this member's vote or later, and again on any answer but
                // "higher vote".
                self.heard_from(&r.vote);
                let reply = self.raft.append_entries(r).await;
                if let Ok(
                    openraft::raft::AppendEntriesResponse::Success
                    | openraft::raft::AppendEntriesResponse::PartialSuccess(_)
                    | openraft::raft::AppendEntriesResponse::Conflict,
                ) = &reply
                {
                    self.heard();
                }
                Reply::Append(reply)
            }
            Request::Vote(r) => Reply::Vote(self.raft.vote(r).await),
            Request::Snapshot(r) => {
                let vote = r.vote;
                self.heard_from(&vote);
                let reply = self.raft.install_snapshot(r).await;
                // A long install must not make the leader look gone.
                if reply.as_ref().is_ok_and(|resp| vote >= resp.vote) {
                    self.heard();
                }
                Reply::Snapshot(reply)
            }
            Request::Propose(cmd) => {
                Reply::Proposed(self.proposals.propose(cmd).await.map_err(|e| match e {
                    ProposeError::NotLeader(leader) => ServiceError::NotLeader { leader },
                    ProposeError::Store(datasync::StoreError::Stopped) => ServiceError::Stopped,
                    ProposeError::Store(e) => ServiceError::Store(e.into()),
                }))
            }
            Request::ReadIndex => Reply::ReadIndex(match self.raft.get_read_log_id().await {
                Ok((read, _)) => Ok(read.map_or(0, |l| l.index)),
                Err(e) => Err(check_error(e)),
            }),
            Request::Join { id, addr, voter } => {
                Reply::Membership(self.join(id, addr, voter).await)
            }
            Request::Leave { id } => Reply::Membership(self.leave(id).await),
            Request::Register { id, addr } => Reply::Membership(self.register(id, addr).await),
            Request::Promote { id } => Reply::Membership(self.promote(id).await),
            Request::Update { id, addr } => Reply::Membership(self.update(id, addr).await),
            Request::Members => Reply::Members(self.members()),
            Request::Client(op, id) => Reply::Client(match self.clients.get() {
                Some(clients) => clients.op(op, id).await,
                None => Err(WireError::Stopped),
            }),
            Request::Watch { .. } => Reply::Watch(WireItem::Failed(WireError::Misrouted)),
        }
    }

    async fn stream(&self, req: Request, out: Replies) {
        let Request::Watch {
            name,
            prefixes,
            queue_capacity,
            resume,
        } = req
        else {
            return;
        };
        match self.clients.get() {
            Some(clients) => {
                clients
                    .watch(name, prefixes, queue_capacity, resume, out)
                    .await
            }
            None => {
                out.send(Reply::Watch(WireItem::Failed(WireError::Stopped)))
                    .await;
            }
        }
    }
}

/// This member's place in the cluster: who it is and how it reaches the others.
#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) id: NodeId,
    /// The address peers reach this node at.
    pub(crate) addr: String,
    pub(crate) pool: Pool,
    pub(crate) service: Arc<Service>,
    pub(crate) forward_timeout: Duration,
    /// The task serving peers and remote clients (awaited at shutdown).
    pub(crate) server: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Set once this node's own leave committed (it may never apply it itself: the
    /// leader stops replicating to it).
    pub(crate) left: std::sync::atomic::AtomicBool,
    /// Whether this member's replica holds at least what it held before it last
    /// stopped (see [`crate::store::RaftStore::caught_up`]).
    pub(crate) caught_up: tokio::sync::watch::Sender<bool>,
}

/// How long a member may go without hearing a leader before it stops serving remote
/// clients (or three election timeouts, if longer). Long enough that a slow fsync or a
/// busy leader does not end every watch on a healthy member.
pub(crate) const LEADERLESS: Duration = Duration::from_secs(3);

impl Node {
    /// `Err(Left)` once this node has left the group.
    pub(crate) fn check_member(&self) -> Result<(), ClusterError> {
        if self.left.load(std::sync::atomic::Ordering::Acquire) {
            return Err(ClusterError::Left);
        }
        Ok(())
    }
}

impl Node {
    /// The leader this member knows of, with its address.
    fn leader(&self) -> Option<(NodeId, String)> {
        let m = self.service.raft.metrics();
        let m = m.borrow();
        let id = m.current_leader?;
        let addr = m.membership_config.membership().get_node(&id)?.addr.clone();
        Some((id, addr))
    }

    /// Whether this member leads now.
    pub(crate) fn leads(&self) -> bool {
        self.service.raft.metrics().borrow().current_leader == Some(self.id)
    }

    /// Whether this member follows a live leader: it leads (a voter of its group, with
    /// a quorum's acknowledgement within [`LEADERLESS`] or three election timeouts,
    /// whichever is longer, as far as openraft's metrics tell; a new leader none has
    /// answered yet does not count), or a leader's append or snapshot reached it within
    /// that time.
    ///
    /// Why: a member cut off from the leader, or removed from the group (the leader
    /// stops replicating to it, and it may never apply its own removal), keeps a
    /// replica that only ages. Its remote watches end, so their clients move to another
    /// member (etcd ends watches that require a leader likewise); reads and writes go
    /// through the leader already. Not covered: a member cut off together with a
    /// deposed leader that still sends it appends (openraft 0.9 leaders do not step down
    /// without a quorum) hears a leader until the partition heals.
    pub(crate) fn hears_leader(&self) -> bool {
        let election = Duration::from_millis(self.service.raft.config().election_timeout_max);
        let within = (election * 3).max(LEADERLESS);
        {
            let m = self.service.raft.metrics();
            let m = m.borrow();
            if m.current_leader == Some(self.id) {
                // A leader that removed itself may still say it leads (openraft 0.9).
                return m.membership_config.voter_ids().any(|v| v == self.id)
                    && m.millis_since_quorum_ack
                        .is_some_and(|ms| u128::from(ms) < within.as_millis());
            }
        }
        self.service
            .leader_heard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|t| t.elapsed() < within)
    }

    /// Sends a request to the leader, following redirects and waiting out elections,
    /// for up to [`ClusterConfig::forward_timeout`]. Returns the reply and whether it
    /// came from another member.
    pub(crate) async fn to_leader(
        &self,
        make: impl Fn() -> Request,
    ) -> Result<(Reply, bool), ClusterError> {
        let make = &make;
        route(
            self.forward_timeout,
            Duration::ZERO,
            |hint| hint.or_else(|| self.leader()),
            |target| async move {
                match target {
                    (id, _) if id == self.id => Ok((self.service.handle(make()).await, false)),
                    (_, addr) => {
                        let left = self.forward_timeout.min(Duration::from_secs(30));
                        let reply = self.pool.get(&addr).call(make(), left).await?;
                        Ok((reply, true))
                    }
                }
            },
        )
        .await
    }
}

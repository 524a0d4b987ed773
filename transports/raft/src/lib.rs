//! datasync-raft: the built-in store, embedded in the agent process.
//!
//! A replicated key-value state machine on Raft ([openraft] 0.9), durable on local disk:
//! the raft log in append-only segment files, the state machine in a [redb] database. A single node is the zero-setup default: the first
//! [`RaftStore::open`] bootstraps a one-node group, later opens restart it from disk
//! (never re-initializing). [`RaftStore`] implements `datasync`'s `Watcher` and `Writer`
//! and passes the conformance suite unchanged.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use datasync::{Key, PutOptions, Writer};
//! use datasync_raft::{RaftConfig, RaftStore};
//!
//! let store = RaftStore::open(RaftConfig::new("./data")).await?;
//! let rev = store.put(&Key::new("config/a")?, "1".into(), PutOptions::new()).await?;
//! println!("committed and durable at revision {rev}");
//! store.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Several agents can run one replicated store: give each a [`ClusterConfig`] (an
//! address, the shared [`Secret`], and for all but the first the members to join
//! through). [`ClusterConfig`] says how joining, routing and reads work.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use datasync_raft::{ClusterConfig, RaftConfig, RaftStore, Secret};
//!
//! let secret = Secret::from_file("/etc/datasync/cluster.secret")?;
//! // On the first start node 2 joins through node 1; later starts restart from disk.
//! let cluster = ClusterConfig::new("10.0.0.2:7400".parse()?, secret).join(["10.0.0.1:7400"]);
//! let store = RaftStore::open(RaftConfig::new("./data").cluster(2, cluster)).await?;
//! println!("members: {:?}", store.members());
//! # Ok(()) }
//! ```
//!
//! A process with no replica (the CLI, another agent) uses a cluster through a
//! [`RemoteStore`]: the same `Watcher` and `Writer`, over the members' authenticated
//! protocol, with membership changes too.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use datasync::{Key, ReadOptions, Writer};
//! use datasync_raft::{RemoteConfig, RemoteStore, Secret};
//!
//! let secret = Secret::from_file("/etc/datasync/cluster.secret")?;
//! let remote = RemoteStore::connect(RemoteConfig::new(["10.0.0.1:7400", "10.0.0.2:7400"], secret)).await?;
//! let value = remote.get(&Key::new("config/a")?, ReadOptions::new()).await?;
//! println!("{value:?}; members: {:?}", remote.members().await?);
//! # Ok(()) }
//! ```
//!
//! How it keeps the contract:
//! - **Revisions** are counted by the state machine: every applied command that changes
//!   something takes the next revision, persisted with the data and last-applied in one
//!   transaction. A command that changes nothing (a delete of an absent key, a failed
//!   compare-and-swap, an expiry of a key re-put since) takes none.
//! - **Durability and group commit**: a write is acknowledged once its log entry is on
//!   disk (a frame of the log's segment files, written with `O_DIRECT | O_DSYNC`) and
//!   applied. openraft 0.9 waits for each log append to be flushed before it starts
//!   the next, so group commit happens above it: the store's proposer drains every
//!   proposal queued while earlier entries commit into one `Command::Batch` entry (one
//!   such entry in flight on a single node, two in a cluster), and concurrent writes
//!   share one fsync. Each write in a batch still gets its own revision and change
//!   event. The state machine commits without fsync (see `storage` docs for why that is
//!   safe), on a writer thread behind the apply: an apply computes outcomes, events and
//!   undo records from redb plus the writes not yet stored, and hands its writes on.
//!   A read waits for the writer to catch up, so it sees every write acknowledged
//!   before it.
//! - **Watches** are fed from the apply path through `datasync::transport::feed` (bounded queue per
//!   registration; overflow becomes a resync; a snapshot install resyncs everyone).
//! - **Reads** are linearizable by default (`ensure_linearizable`, a read index through
//!   the leader), or local. Reads at a past revision use an in-memory undo history of the
//!   last [`RaftConfig::history`] transactions; older revisions, and any before a restart,
//!   answer `StoreError::Compacted`. A replica never goes back: the state machine
//!   commits durably about once a second, so a store that crashed may hold less than
//!   it served until it replays its log. A single node replays before `open` returns;
//!   a cluster member learns how far to replay only from a leader, so after a crash
//!   (not after a clean stop) it refuses local reads and new watches with
//!   `ClusterError::CatchingUp` until it has applied a leader's read index.
//! - **TTL** is a lease decided by the leader on its monotonic clock: a put carries its
//!   TTL as a duration (never a wall-clock deadline, so skew between members or a
//!   clock step changes nothing); every replica counts it from its own apply of the
//!   put, and the leader proposes an `Expire` command for keys past their deadline
//!   (each only if still at the revision that set the lease). Every replica deletes the
//!   same keys at the same revision, and the Delete events carry the previous values.
//!   A new leader counts from its own apply, so a leader change never expires a key
//!   early. The rule across restarts is etcd's after a leader change: at open every
//!   lease gets its full TTL again (the time a store was down is not measured), and
//!   reads serve the key until then. TTLs round up to whole milliseconds, never to
//!   zero, and are at most `datasync::MAX_TTL`. Expiry happens within milliseconds
//!   after the deadline, not exactly at it.
//! - **Exactly-once writes**: in a cluster every client write carries a request id,
//!   the same in every retry (a member that answers "stopping" may have committed it);
//!   the state machine answers a repeat with the first outcome. See `storage::session`.
//! - **State-sync view** (the DDA seed): [`RaftStore::propose`] returns once committed;
//!   a watch starts with the current state as one resync event (the synthetic sets and
//!   the end marker in one); [`RaftStore::state_hash`] compares replicas;
//!   [`RaftStore::observe_membership`] reports committed configurations only.
//! - **Clusters**: openraft over a framed TCP protocol authenticated with the cluster
//!   secret; followers forward writes to the leader and serve linearizable reads
//!   through the leader's read index; a member that installs a snapshot resyncs its
//!   watchers. The protocol is versioned in its handshake; members and clients of
//!   different versions refuse each other (`NetError::Version`), so a cluster is
//!   upgraded by stopping every member, not one at a time. Version 3 (errors keep
//!   their type on the wire) does not talk to version 2.

pub mod backup;
mod bytes;
mod cluster;
#[cfg(test)]
mod decode_fuzz;
mod error;
mod local;
mod members;
mod metrics;
mod network;
mod once;
mod propose;
pub mod records;
mod remote;
mod routing;
mod rt;
mod serve;
mod snapshot_data;
mod storage;
mod store;
#[cfg(feature = "testing")]
pub mod testing;
pub mod types;

pub use cluster::ClusterConfig;
pub use error::ClusterError;
pub use members::{Members, Refusal, Role};
pub use network::{MIN_SECRET, NetError, Secret, SecretError};
pub use records::{KeyRange, Record, Txn, TxnOutcome};
pub use remote::{RemoteConfig, RemoteStore};
pub use storage::OpenError;
pub use storage::lease::Clock;
pub use storage::sm::RecordWatch;
pub use store::{
    CLUSTER_VALUE_PER_100MS, Health, MAX_HISTORY_AGE, MAX_VALUE_SIZE, MembershipWatch, RaftConfig,
    RaftStore,
};

//! Node-to-node network: a framed protocol over TCP, authenticated with the cluster
//! secret.
//!
//! Why not gRPC: the README's main command must build with only the Rust toolchain
//! (no `protoc`), and openraft's messages already have serde forms. So each message is
//! bincode in a length-delimited frame (`tokio_util::codec`), encrypted and tagged
//! ([`auth`]); one connection per peer carries many calls at once, answered in any
//! order. The same protocol serves raft (append, vote, snapshot chunks) and the client
//! services (forwarded writes, read index, join, leave, membership), so a node without
//! the secret can neither vote, replicate nor write, and every refusal is logged.
//!
//! Errors map onto openraft's: a peer that cannot be connected is `Unreachable` (backed
//! off), a call whose reply never came is `Network`/`Timeout`, an oversized append is
//! `PayloadTooLarge` (openraft sends fewer entries).

pub(crate) mod auth;
pub(crate) mod client;
mod error;
pub(crate) mod frame;
pub(crate) mod link;
// Public types, reached from outside only through `testing` (feature `testing`).
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub(crate) mod net;
pub(crate) mod nopeers;
pub(crate) mod peer;
pub(crate) mod server;
pub(crate) mod wire;

pub use auth::{MIN_SECRET, Secret, SecretError};
pub use error::NetError;

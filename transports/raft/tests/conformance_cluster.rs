//! The conformance suite, unchanged, against a follower of a three-node raft cluster
//! (each node on its own loopback port and temp dir, real TCP, real disk): writes are
//! forwarded to the leader, watches and reads are served by the follower.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

datasync::conformance_tests!(datasync_raft::testing::ClusterHarness::default());

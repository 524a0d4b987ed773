//! The conformance suite, unchanged, against a remote client: a `RemoteStore` with no
//! replica of its own, talking to a follower of a three-node cluster over the members'
//! authenticated protocol (real TCP, real disk).
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

datasync::conformance_tests!(datasync_raft::testing::RemoteHarness::default());

//! The conformance suite, unchanged, against a single embedded raft node on real disk.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

datasync::conformance_tests!(datasync_raft::testing::RaftHarness::default());

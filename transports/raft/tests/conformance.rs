//! The conformance suite, unchanged, against a single embedded raft node on real disk.

datasync::conformance_tests!(datasync_raft::testing::RaftHarness::default());

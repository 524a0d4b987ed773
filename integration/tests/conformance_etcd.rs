//! The conformance suite, unchanged, against `datasync-etcd` on a real etcd.

datasync::conformance_tests!(datasync_integration::EtcdHarness::default());

//! The conformance suite, unchanged, against `datasync-nats` on a real nats-server.

datasync::conformance_tests!(datasync_integration::NatsHarness::default());

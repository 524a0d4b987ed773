//! The conformance suite against the in-memory `local` transport, expanded exactly as a
//! transport crate expands it: one named test per contract rule.

datasync::conformance_tests!(datasync::testing::LocalHarness);

//! How messages between members travel. The real link delivers every message at once;
//! fault-injection tests plug in a switchboard (`testing::Faults`, feature `testing`)
//! through [`ClusterConfig::faults`](crate::ClusterConfig), and the real network code
//! runs underneath it.

use std::time::Duration;

/// What happens to one message (made only by a test link).
#[cfg_attr(not(feature = "testing"), allow(dead_code))]
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Fate {
    Lost,
    Delivered(Duration),
}

/// A link's behaviour, consulted by the client for every message.
pub(crate) trait Link: Send + Sync + std::fmt::Debug + 'static {
    /// The fate of one message from `from` to `to` (members named by the address they
    /// advertise).
    fn fate(&self, from: &str, to: &str) -> Fate;

    /// Whether this answer to a write from `from` to `to` is to be replaced with "the
    /// member is stopping" (after the write ran).
    fn take_stopped(&self, from: &str, to: &str) -> bool;
}

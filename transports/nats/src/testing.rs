//! Fault switches for tests (feature `testing`). Process-wide: a test that sets one
//! should run in a process of its own or tolerate others' use.

use std::sync::atomic::{AtomicU64, Ordering};

static DROP_FLOW_CONTROL: AtomicU64 = AtomicU64::new(0);
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Leaves the next `n` flow-control answers unsent, as if they were lost on the way.
pub fn drop_flow_control_answers(n: u64) {
    DROP_FLOW_CONTROL.store(n, Ordering::SeqCst);
}

/// How many flow-control answers were left unsent so far.
pub fn flow_control_answers_dropped() -> u64 {
    DROPPED.load(Ordering::SeqCst)
}

/// Whether to drop this answer (and count it).
pub(crate) fn drop_flow_control() -> bool {
    let dropped = DROP_FLOW_CONTROL
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if dropped {
        DROPPED.fetch_add(1, Ordering::SeqCst);
    }
    dropped
}

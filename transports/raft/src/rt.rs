//! Where the store's work runs, and where its randomness comes from: the one place a
//! seeded simulation (issue 18, `docs/SIMULATION.md`) switches.
//!
//! In production blocking work goes to tokio's blocking pool and the state machine's
//! writer is an OS thread. A simulation runs every member of a cluster on one thread,
//! under simulated time; work that ran on another OS thread would finish at a moment no
//! seed decides. On a thread that called [`set_inline`], blocking work and the writer
//! run inline, on the calling task, and randomness comes from `fastrand`'s generator of
//! that thread, which the simulation seeds. Everything else is the same code.

use std::cell::Cell;

thread_local! {
    static INLINE: Cell<bool> = const { Cell::new(false) };
}

/// Whether work runs inline on this thread (under a simulation).
pub(crate) fn inline() -> bool {
    INLINE.with(Cell::get)
}

#[cfg_attr(not(any(test, feature = "testing")), allow(dead_code, unreachable_pub))]
/// Runs blocking work on this thread from now on (`true`), or off the async workers
/// again (`false`). For a simulation that runs a cluster on one thread.
pub fn set_inline(on: bool) {
    INLINE.with(|c| c.set(on));
}

/// Blocking work that did not finish: it panicked, or the runtime shut down under it.
#[derive(Debug, thiserror::Error)]
#[error("blocking work did not finish: {0}")]
pub(crate) struct Unfinished(#[from] pub(crate) tokio::task::JoinError);

/// Runs `f` off the async workers (inline under a simulation).
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Unfinished> {
    if inline() {
        return Ok(f());
    }
    Ok(tokio::task::spawn_blocking(f).await?)
}

/// Work on an OS thread of its own, or already done (inline under a simulation).
#[derive(Debug)]
pub(crate) enum Background<T> {
    Thread(std::thread::JoinHandle<T>),
    Done(T),
}

impl<T: Send + 'static> Background<T> {
    /// Starts `f` on a thread of its own named `name` (runs it now under a simulation);
    /// an error if the system refuses a thread.
    pub(crate) fn spawn(
        name: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::io::Result<Self> {
        if inline() {
            return Ok(Background::Done(f()));
        }
        let h = std::thread::Builder::new().name(name.into()).spawn(f)?;
        Ok(Background::Thread(h))
    }

    /// Waits for the work; `None` if its thread panicked.
    pub(crate) fn join(self) -> Option<T> {
        match self {
            Background::Thread(h) => h.join().ok(),
            Background::Done(t) => Some(t),
        }
    }
}

/// Fills `buf` with random bytes: from the operating system, or from the seeded
/// generator under a simulation. `None` if the system's source failed.
pub(crate) fn fill_random(buf: &mut [u8]) -> Option<()> {
    if inline() {
        buf.iter_mut().for_each(|b| *b = fastrand::u8(..));
        return Some(());
    }
    use ring::rand::SecureRandom;
    ring::rand::SystemRandom::new().fill(buf).ok()
}

/// openraft's runtime: tokio, except for the generator of election timeouts, which is
/// `fastrand`'s thread-local one (seeded by a simulation, from the system otherwise).
#[derive(Debug, Default, PartialEq, Eq, Clone, Copy)]
pub struct Runtime;

/// `fastrand`'s thread-local generator, as a `rand` 0.8 generator for openraft.
#[derive(Debug, Default)]
pub struct Rng;

impl rand::RngCore for Rng {
    fn next_u32(&mut self) -> u32 {
        fastrand::u32(..)
    }

    fn next_u64(&mut self) -> u64 {
        fastrand::u64(..)
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        dest.iter_mut().for_each(|b| *b = fastrand::u8(..));
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

type Tokio = openraft::TokioRuntime;

impl openraft::AsyncRuntime for Runtime {
    type JoinError = <Tokio as openraft::AsyncRuntime>::JoinError;
    type JoinHandle<T: openraft::OptionalSend + 'static> =
        <Tokio as openraft::AsyncRuntime>::JoinHandle<T>;
    type Sleep = <Tokio as openraft::AsyncRuntime>::Sleep;
    type Instant = <Tokio as openraft::AsyncRuntime>::Instant;
    type TimeoutError = <Tokio as openraft::AsyncRuntime>::TimeoutError;
    type Timeout<R, T: std::future::Future<Output = R> + openraft::OptionalSend> =
        <Tokio as openraft::AsyncRuntime>::Timeout<R, T>;
    type ThreadLocalRng = Rng;
    type OneshotSender<T: openraft::OptionalSend> =
        <Tokio as openraft::AsyncRuntime>::OneshotSender<T>;
    type OneshotReceiverError = <Tokio as openraft::AsyncRuntime>::OneshotReceiverError;
    type OneshotReceiver<T: openraft::OptionalSend> =
        <Tokio as openraft::AsyncRuntime>::OneshotReceiver<T>;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: std::future::Future + openraft::OptionalSend + 'static,
        T::Output: openraft::OptionalSend + 'static,
    {
        Tokio::spawn(future)
    }

    fn sleep(duration: std::time::Duration) -> Self::Sleep {
        Tokio::sleep(duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        Tokio::sleep_until(deadline)
    }

    fn timeout<R, F: std::future::Future<Output = R> + openraft::OptionalSend>(
        duration: std::time::Duration,
        future: F,
    ) -> Self::Timeout<R, F> {
        Tokio::timeout(duration, future)
    }

    fn timeout_at<R, F: std::future::Future<Output = R> + openraft::OptionalSend>(
        deadline: Self::Instant,
        future: F,
    ) -> Self::Timeout<R, F> {
        Tokio::timeout_at(deadline, future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        Tokio::is_panic(join_error)
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        Rng
    }

    fn oneshot<T>() -> (Self::OneshotSender<T>, Self::OneshotReceiver<T>)
    where
        T: openraft::OptionalSend,
    {
        Tokio::oneshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn inline_work_runs_on_the_calling_thread_and_pooled_work_does_not() {
        let here = std::thread::current().id();
        let pooled = blocking(move || std::thread::current().id()).await.unwrap();
        assert_ne!(pooled, here);
        set_inline(true);
        let inlined = blocking(move || std::thread::current().id()).await.unwrap();
        set_inline(false);
        assert_eq!(inlined, here);
    }

    #[test]
    fn seeded_randomness_repeats_under_a_simulation() {
        let draw = || {
            let mut b = [0u8; 16];
            fill_random(&mut b).unwrap();
            (b, rand::RngCore::next_u64(&mut Rng))
        };
        set_inline(true);
        fastrand::seed(7);
        let first = draw();
        fastrand::seed(7);
        let again = draw();
        set_inline(false);
        assert_eq!(first, again);
        assert_ne!(
            draw().0,
            first.0,
            "the system's source is not the seeded one"
        );
    }
}

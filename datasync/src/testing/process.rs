//! Child processes for tests: servers (etcd, nats-server), agents and cluster members a
//! test starts on free loopback ports with temp dirs. Killed when dropped, so tests run
//! in parallel and leave nothing behind.

use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::time::Duration;

use backon::{ConstantBuilder, Retryable};

/// A child process, its command (to start it again) and its log file.
pub struct Process {
    name: String,
    child: Child,
    /// How to start it again (`None`: started once, from a given `Command`).
    command: Option<Box<dyn FnMut() -> Command + Send + Sync>>,
    log: Option<PathBuf>,
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("name", &self.name)
            .field("pid", &self.child.id())
            .finish_non_exhaustive()
    }
}

/// Why a process did not become ready.
#[derive(Debug, thiserror::Error)]
#[error("{name} did not become ready: {reason}")]
pub struct NotReady {
    /// The process's name.
    pub name: String,
    /// What happened, with the end of its log.
    pub reason: String,
}

impl Process {
    /// Spawns `command()`; `log` is the file the process writes its log to, whose end
    /// goes into errors.
    pub fn spawn(
        name: &str,
        log: Option<PathBuf>,
        mut command: impl FnMut() -> Command + Send + Sync + 'static,
    ) -> std::io::Result<Process> {
        let child = command().spawn()?;
        Ok(Process {
            name: name.to_owned(),
            child,
            command: Some(Box::new(command)),
            log,
        })
    }

    /// Spawns `command` once (it cannot be [restarted](Self::restart)).
    pub fn spawn_once(name: &str, mut command: Command) -> std::io::Result<Process> {
        Ok(Process {
            name: name.to_owned(),
            child: command.spawn()?,
            command: None,
            log: None,
        })
    }

    /// The running child (to take its output, or wait for it).
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Kills it with SIGKILL (as a crash would) and waits until it is gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills it and starts the same command again (same dirs, ports and arguments).
    pub fn restart(&mut self) -> std::io::Result<()> {
        let Some(command) = &mut self.command else {
            return Err(std::io::Error::other(format!(
                "{} was started once: no command to start again",
                self.name
            )));
        };
        let mut command = command();
        self.kill();
        self.child = command.spawn()?;
        Ok(())
    }

    /// Asks it to stop with SIGTERM and waits up to `within` for its exit; kills it if
    /// it is still running then, and says so. Blocks the thread: from async code, use
    /// [`stop`](Self::stop).
    pub fn terminate(&mut self, within: Duration) -> Result<ExitStatus, String> {
        self.sigterm()?;
        let deadline = std::time::Instant::now() + within;
        loop {
            let overdue = std::time::Instant::now() >= deadline;
            if let Some(done) = self.after_sigterm(overdue, within) {
                return done;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// [`terminate`](Self::terminate), waiting on the runtime's timer.
    ///
    /// # Cancel safety
    /// Dropping the future leaves the process stopping (SIGTERM was sent).
    pub async fn stop(&mut self, within: Duration) -> Result<ExitStatus, String> {
        self.sigterm()?;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let overdue = tokio::time::Instant::now() >= deadline;
            if let Some(done) = self.after_sigterm(overdue, within) {
                return done;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// One look after SIGTERM: the exit status, or (once `overdue`) a kill and an
    /// error; `None` to look again.
    fn after_sigterm(
        &mut self,
        overdue: bool,
        within: Duration,
    ) -> Option<Result<ExitStatus, String>> {
        if let Some(status) = self.exited() {
            return Some(Ok(status));
        }
        if overdue {
            self.kill();
            return Some(Err(format!("{} ignored SIGTERM for {within:?}", self.name)));
        }
        None
    }

    fn sigterm(&mut self) -> Result<(), String> {
        // Never signal a pid that may have been reused.
        if self.exited().is_some() {
            return Ok(());
        }
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status();
        match sent {
            Ok(s) if s.success() => Ok(()),
            _ => Err(format!("could not send SIGTERM to {} ({pid})", self.name)),
        }
    }

    /// Waits until `ready()` holds, checking every 50 ms: fails when the process exits
    /// first or `within` passes (a `ready()` still running then included), with the end
    /// of its log.
    ///
    /// # Cancel safety
    /// Cancel safe (it only polls).
    pub async fn wait_ready<F, Fut>(
        &mut self,
        within: Duration,
        mut ready: F,
    ) -> Result<(), NotReady>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = self.exited() {
                return Err(self.not_ready(format!("exited with {status}")));
            }
            // A probe that hangs (a server that accepts and never answers) counts as
            // not ready, within the same deadline.
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if tokio::time::timeout(left, ready()).await == Ok(true) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(self.not_ready(format!("not ready after {within:?}")));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A [`NotReady`] saying `what`, with the last lines of the log.
    pub fn not_ready(&self, what: String) -> NotReady {
        let tail = self
            .log
            .as_ref()
            .and_then(|l| std::fs::read_to_string(l).ok())
            .map(|log| log.lines().rev().take(5).collect::<Vec<_>>().join(" | "))
            .unwrap_or_default();
        NotReady {
            name: self.name.clone(),
            reason: format!("{what}; log: {tail}"),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `start` up to `attempts` times until it succeeds, for a server started on ports
/// picked free and then bound by the server: another process may take a port in
/// between. Returns the last error.
pub async fn with_port_retries<T, E, F, Fut>(attempts: usize, start: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let again = ConstantBuilder::default()
        .with_delay(Duration::ZERO)
        .with_max_times(attempts.saturating_sub(1));
    start.retry(again).sleep(tokio::time::sleep).await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_process_that_exits_is_not_ready_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let path = log.clone();
        let mut p = Process::spawn("sh", Some(log), move || {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(format!("echo 'bad flag' > {}; exit 3", path.display()));
            c
        })
        .unwrap();
        let e = p
            .wait_ready(Duration::from_secs(10), || async { false })
            .await
            .unwrap_err();
        assert!(e.reason.contains("exit status: 3"), "{e}");
        assert!(e.reason.contains("bad flag"), "{e}");
    }

    #[tokio::test]
    async fn terminate_stops_a_process_and_restart_runs_it_again() {
        let mut p = Process::spawn("sleep", None, || {
            let mut c = Command::new("sleep");
            c.arg("30");
            c
        })
        .unwrap();
        let first = p.pid();
        let status = p.terminate(Duration::from_secs(5)).unwrap();
        assert!(!status.success(), "killed by SIGTERM: {status}");
        p.restart().unwrap();
        assert_ne!(p.pid(), first);
        assert!(p.exited().is_none());
        let ready = p
            .wait_ready(Duration::from_secs(5), || async { true })
            .await;
        assert!(ready.is_ok());
    }

    #[tokio::test]
    async fn port_retries_stop_at_the_first_success_or_the_last_attempt() {
        let mut n = 0;
        let r: Result<u32, u32> = with_port_retries(3, || {
            n += 1;
            let v = n;
            async move { if v < 2 { Err(v) } else { Ok(v) } }
        })
        .await;
        assert_eq!(r, Ok(2));
        let r: Result<u32, &str> = with_port_retries(3, || async { Err("taken") }).await;
        assert_eq!(r, Err("taken"));
    }
}

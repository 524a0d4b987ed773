//! What the process tests share.
#![allow(dead_code, clippy::unwrap_used)] // each test file uses its part

use std::ffi::OsStr;
use std::process::{Command, Output};
use std::time::Duration;

use datasync::testing::process::Process;

/// `datasync --store STORE ARGS…`, run to the end.
pub(crate) fn cli(store: impl AsRef<OsStr>, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_datasync"))
        .arg("--store")
        .arg(store)
        .args(args)
        .output()
        .unwrap()
}

/// The standard output of a command that must have succeeded (else its stderr).
pub(crate) fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `GET url`: the status and body (status 0 if nothing answered).
pub(crate) fn get(url: &str) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    match agent.get(url).call() {
        Ok(mut r) => (
            r.status().as_u16(),
            r.body_mut().read_to_string().unwrap_or_default(),
        ),
        Err(_) => (0, String::new()),
    }
}

/// A child process, killed if the test fails before it is stopped.
pub(crate) struct Running(pub(crate) Process);

impl Running {
    /// Spawns `command`.
    pub(crate) fn spawn(command: Command) -> Running {
        Running(Process::spawn_once("datasync", command).unwrap())
    }

    /// `datasync agent --config config` (the binary `bin`), its standard output
    /// discarded, its log (debug for datasync) in [`agent_log`]`(config)`.
    pub(crate) fn agent(bin: &str, config: &std::path::Path) -> Running {
        let log = std::fs::File::create(agent_log(config)).unwrap();
        let mut c = Command::new(bin);
        c.args(["agent", "--config"])
            .arg(config)
            .env("RUST_LOG", "info,datasync=debug,datasync_nats=debug")
            .stdout(std::process::Stdio::null())
            .stderr(log);
        Running::spawn(c)
    }

    /// SIGTERM, then a clean exit within 10 s.
    pub(crate) fn stop(mut self) {
        let status = self
            .0
            .terminate(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(status.success(), "exited with {status}");
    }
}

/// Where [`Running::agent`] writes the log of the agent configured by `config`.
pub(crate) fn agent_log(config: &std::path::Path) -> std::path::PathBuf {
    config.with_extension("log")
}

/// The last `lines` lines of that log, for a failure message.
pub(crate) fn agent_log_tail(config: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read_to_string(agent_log(config)).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

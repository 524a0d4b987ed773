//! Harnesses for real servers, shared by the cross-transport tests and benchmarks.
//!
//! Each harness spawns its own server on free loopback ports with a temp data dir and
//! kills it on drop, so tests run in parallel and leave nothing behind. A missing binary
//! is an error that says how to install it, never a silent skip.

pub mod bench;
pub mod etcd;
pub mod etcd_cluster;
pub mod nats;
pub mod plot;
pub mod proc;
pub mod proxy;
pub mod testkit;

pub use etcd::{EtcdHarness, EtcdServer};
pub use etcd_cluster::EtcdCluster;
pub use nats::{NatsHarness, NatsServer};
pub use proxy::Proxy;

/// A server could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HarnessError {
    /// The server binary is not installed.
    #[error("`{binary}` not found on PATH: install it with `{install}`")]
    Missing {
        /// The binary looked for.
        binary: &'static str,
        /// How to install it.
        install: &'static str,
    },
    /// The server started but did not become ready.
    #[error("{binary} did not become ready: {reason}")]
    NotReady {
        /// The binary.
        binary: &'static str,
        /// What happened (with the end of its log).
        reason: String,
    },
    /// Spawning or preparing failed.
    #[error("cannot start {binary}")]
    Io {
        /// The binary.
        binary: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Finds `binary` on `PATH`.
pub fn find_binary(binary: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|p| p.is_file())
}

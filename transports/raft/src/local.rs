//! A store's local endpoint: a Unix socket in its data directory through which other
//! processes reach the store this process holds (the CLI next to a running agent),
//! speaking the remote clients' protocol ([`RemoteStore::connect_local`]).
//!
//! Why a socket and a key file, both `0600`, in the data directory: whoever may read
//! the data directory could open the store itself when no process holds it, so its
//! permissions are the access control, and no setup is needed. The key is fresh at
//! every open, so the protocol stays the authenticated one members and remote clients
//! speak, and a key read from a former run does not open the next one. A socket left
//! by a crashed process is stale: only the process holding the store's lock binds it,
//! and it removes what it finds first.

use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::cluster::ClientService;
use crate::error::ClusterError;
use crate::members::Refusal;
use crate::network::Secret;
use crate::network::server::{self, Handler, Replies};
use crate::network::wire::{Reply, Request, ServiceError, WireError, WireItem};
use crate::remote::{RemoteConfig, RemoteStore};

/// The socket, in the data directory.
pub(crate) const SOCKET: &str = "datasync.sock";
/// The key of the running process's endpoint, in the data directory.
pub(crate) const KEY: &str = "local.key";
/// How long [`RemoteStore::connect_local`] waits for the holding process to answer.
const CONNECT_WITHIN: Duration = Duration::from_secs(3);
/// The longest path a Unix socket address holds (`sun_path` less its NUL, on Linux).
const MAX_PATH: usize = 107;

/// The endpoint a store serves while it is open; closed (and its files removed) at
/// shutdown or drop.
pub(crate) struct LocalEndpoint {
    dir: PathBuf,
    /// The socket file's device and inode, and the key: the files are removed only
    /// while they are still this endpoint's (a later open may have replaced them).
    socket_id: (u64, u64),
    key: String,
    stop: CancellationToken,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for LocalEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalEndpoint")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Opens `dir`'s local endpoint, serving `handler`. The caller holds the store's lock,
/// so what it finds there is a crashed holder's: removed first.
pub(crate) async fn open(dir: &Path, handler: Arc<dyn Handler>) -> io::Result<LocalEndpoint> {
    let socket = dir.join(SOCKET);
    if socket.as_os_str().len() > MAX_PATH || socket.to_str().is_none() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is not UTF-8 or longer than a Unix socket address holds ({MAX_PATH} bytes)",
                socket.display()
            ),
        ));
    }
    for stale in [&socket, &dir.join(KEY)] {
        match std::fs::remove_file(stale) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    let listener = tokio::net::UnixListener::bind(&socket)?;
    // The key last: a client that finds it finds a socket that answers with it.
    let published = (|| {
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
        let meta = std::fs::metadata(&socket)?;
        let key = fresh_key()?;
        let tmp = dir.join(format!("{KEY}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| io::Write::write_all(&mut f, key.as_bytes()))?;
        std::fs::rename(&tmp, dir.join(KEY))?;
        Ok::<_, io::Error>(((meta.dev(), meta.ino()), key))
    })();
    let (socket_id, key) = match published {
        Ok(p) => p,
        Err(e) => {
            let _ = std::fs::remove_file(&socket);
            return Err(e);
        }
    };
    let secret = Secret::new(&key).map_err(io::Error::other)?;
    let stop = CancellationToken::new();
    let task = tokio::spawn(server::serve(
        Box::new(listener),
        secret,
        handler,
        stop.clone(),
    ));
    debug!(socket = %socket.display(), "local endpoint open");
    Ok(LocalEndpoint {
        dir: dir.to_owned(),
        socket_id,
        key,
        stop,
        task: std::sync::Mutex::new(Some(task)),
    })
}

/// 32 random bytes from the system (never the simulation's seeded generator), in hex.
fn fresh_key() -> io::Result<String> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| io::Error::other("no randomness for the local endpoint's key"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

impl LocalEndpoint {
    /// Stops serving (open connections end) and removes the socket and key.
    ///
    /// The files go first, so that a new client goes to the store itself (once this
    /// process lets it go) rather than into a handshake cut short. Calls under way are
    /// answered before the store stops (`server::serve` waits for them).
    pub(crate) async fn close(&self) {
        self.remove_files();
        self.stop.cancel();
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task
            && tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .is_err()
        {
            warn!("the local endpoint did not stop within 10 s");
        }
    }

    fn remove_files(&self) {
        let socket = self.dir.join(SOCKET);
        if std::fs::metadata(&socket).is_ok_and(|m| (m.dev(), m.ino()) == self.socket_id) {
            let _ = std::fs::remove_file(&socket);
        }
        let key = self.dir.join(KEY);
        if std::fs::read(&key).is_ok_and(|k| k == self.key.as_bytes()) {
            let _ = std::fs::remove_file(&key);
        }
    }
}

impl Drop for LocalEndpoint {
    fn drop(&mut self) {
        self.stop.cancel();
        self.remove_files();
    }
}

/// What a single node's local endpoint answers: a remote client's calls and watches.
/// (A cluster member's endpoint answers as its cluster address does.)
pub(crate) struct SingleNode(pub(crate) Box<dyn ClientService>);

#[async_trait::async_trait]
impl Handler for SingleNode {
    async fn handle(&self, req: Request) -> Reply {
        match req {
            Request::Client(op, id) => Reply::Client(self.0.op(op, id).await),
            Request::Members => match self.0.members() {
                Some(members) => Reply::Members(members),
                None => Reply::Client(Err(WireError::Stopped)),
            },
            Request::Join { .. }
            | Request::Leave { .. }
            | Request::Register { .. }
            | Request::Promote { .. }
            | Request::Update { .. } => {
                Reply::Membership(Err(ServiceError::Refused(Refusal::NotClustered)))
            }
            _ => Reply::Client(Err(WireError::Misrouted)),
        }
    }

    async fn stream(&self, req: Request, out: Replies) {
        match req {
            Request::Watch {
                name,
                prefixes,
                queue_capacity,
                resume,
            } => {
                self.0
                    .watch(name, prefixes, queue_capacity, resume, out)
                    .await
            }
            _ => {
                out.send(Reply::Watch(WireItem::Failed(WireError::Misrouted)))
                    .await;
            }
        }
    }
}

impl RemoteStore {
    /// Connects to the store another process holds in data directory `dir` (an agent,
    /// `datasync serve`, a CLI `watch`), through that process's local endpoint. Fails
    /// with [`ClusterError::NoLocalEndpoint`] when no process serves it (then the
    /// store can be opened directly, or its holder is starting or stopping).
    pub async fn connect_local(dir: impl AsRef<Path>) -> Result<RemoteStore, ClusterError> {
        let dir = dir.as_ref();
        let none = |reason: String| ClusterError::NoLocalEndpoint {
            dir: dir.to_owned(),
            reason,
        };
        let key = std::fs::read(dir.join(KEY)).map_err(|e| none(format!("{KEY}: {e}")))?;
        let secret = Secret::new(key.trim_ascii()).map_err(|e| none(format!("{KEY}: {e}")))?;
        let socket = dir.join(SOCKET);
        let Some(path) = socket.to_str() else {
            return Err(none(format!("{} is not UTF-8", socket.display())));
        };
        // A socket a crashed process left refuses connections: say so now, rather than
        // retrying it for the whole connect time.
        drop(
            tokio::net::UnixStream::connect(&socket)
                .await
                .map_err(|e| none(format!("{SOCKET}: {e}")))?,
        );
        let mut config = RemoteConfig::new([path], secret);
        config.net = Arc::new(Unix);
        // A process that is stopping refuses calls, and one whose key was replaced
        // meanwhile refuses ours: either is no endpoint to use.
        RemoteStore::connect_within(config, CONNECT_WITHIN)
            .await
            .map_err(|e| match e {
                ClusterError::NoMember(_) | ClusterError::Unauthenticated(_) => {
                    none(format!("the process holding it did not answer: {e}"))
                }
                e => e,
            })
    }
}

/// Connections to a local endpoint (addresses are socket paths). Kept apart from TCP,
/// so that no address from the network makes a member dial a local socket.
#[derive(Debug)]
struct Unix;

#[async_trait::async_trait]
impl crate::network::net::Net for Unix {
    async fn connect(&self, addr: &str) -> io::Result<crate::network::net::Socket> {
        Ok(Box::new(tokio::net::UnixStream::connect(addr).await?))
    }

    async fn bind(
        &self,
        _: std::net::SocketAddr,
    ) -> io::Result<Box<dyn crate::network::net::Listener>> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "a local endpoint is bound by the store",
        ))
    }
}

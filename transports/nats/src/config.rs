//! Connection and bucket settings.

use std::path::PathBuf;
use std::time::Duration;

use datasync::StoreError;

/// How to authenticate to the NATS servers.
#[derive(Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Auth {
    /// No credentials.
    #[default]
    None,
    /// A token.
    Token(String),
    /// A user name and password.
    UserPassword(String, String),
    /// An NKey seed (`SU…`).
    NKey(String),
    /// A `.creds` file (JWT and NKey seed).
    CredentialsFile(PathBuf),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        match self {
            Auth::None => f.write_str("None"),
            Auth::Token(_) => f.write_str("Token(..)"),
            Auth::UserPassword(u, _) => write!(f, "UserPassword({u:?}, ..)"),
            Auth::NKey(_) => f.write_str("NKey(..)"),
            Auth::CredentialsFile(p) => write!(f, "CredentialsFile({p:?})"),
        }
    }
}

/// Settings of a [`crate::NatsStore`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct NatsConfig {
    /// Server URLs, e.g. `nats://127.0.0.1:4222`.
    pub servers: Vec<String>,
    /// Credentials.
    pub auth: Auth,
    /// Require TLS.
    pub tls_required: bool,
    /// Extra root certificates (PEM) to trust for TLS.
    pub tls_root_certificates: Option<PathBuf>,
    /// A client certificate and key (PEM) for mutual TLS.
    pub tls_client_cert: Option<(PathBuf, PathBuf)>,
    /// The KV bucket (`[a-zA-Z0-9_-]+`); created if missing.
    pub bucket: String,
    /// Replicas of a bucket this store creates (1 to 5; a cluster is needed above 1).
    pub replicas: usize,
    /// Versions kept per key (1 to 64): how far back [`datasync::ReadOptions::at`] reads
    /// reach for a key that keeps changing.
    pub history: u8,
    /// How long the delete marker of an expired TTL key is kept (at least 1 s), for a
    /// bucket this store creates. A consumer that lags further than this behind the
    /// bucket could miss an expiry, so keep it well above any expected lag. The server
    /// also raises every per-key TTL below it to it (seen with nats-server 2.15): it is
    /// the shortest TTL the bucket gives.
    pub marker_ttl: Duration,
    /// Largest value accepted (capped by the server's `max_payload`, less room for
    /// headers).
    pub max_value_size: usize,
    /// Timeout of each request to the server.
    pub request_timeout: Duration,
    /// Timeout of connecting to a server.
    pub connect_timeout: Duration,
    /// At connect, wait (with backoff) for an unreachable server for up to this long,
    /// instead of failing at once.
    pub wait_for_server: Option<Duration>,
}

impl NatsConfig {
    /// Settings for `servers`, with bucket `datasync`.
    pub fn new<S: Into<String>>(servers: impl IntoIterator<Item = S>) -> Self {
        NatsConfig {
            servers: servers.into_iter().map(Into::into).collect(),
            auth: Auth::None,
            tls_required: false,
            tls_root_certificates: None,
            tls_client_cert: None,
            bucket: "datasync".into(),
            replicas: 1,
            history: 16,
            marker_ttl: Duration::from_secs(5),
            max_value_size: 1024 * 1024 - 4096,
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            wait_for_server: None,
        }
    }

    /// Sets the bucket.
    #[must_use]
    pub fn with_bucket(mut self, bucket: impl Into<String>) -> Self {
        self.bucket = bucket.into();
        self
    }

    /// Sets the credentials.
    #[must_use]
    pub fn with_auth(mut self, auth: Auth) -> Self {
        self.auth = auth;
        self
    }

    /// Sets the versions kept per key.
    #[must_use]
    pub fn with_history(mut self, history: u8) -> Self {
        self.history = history;
        self
    }

    /// Sets the replicas of a bucket this store creates.
    #[must_use]
    pub fn with_replicas(mut self, replicas: usize) -> Self {
        self.replicas = replicas;
        self
    }

    /// Sets the request timeout.
    #[must_use]
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Waits up to `wait` for an unreachable server at connect.
    #[must_use]
    pub fn with_wait_for_server(mut self, wait: Duration) -> Self {
        self.wait_for_server = Some(wait);
        self
    }

    /// Requires TLS, trusting the PEM root certificates in `roots` (instead of the
    /// system's, which async-nats reads only when none are given).
    #[must_use]
    pub fn with_tls(mut self, roots: Option<PathBuf>) -> Self {
        self.tls_required = true;
        self.tls_root_certificates = roots;
        self
    }

    /// Presents the PEM client certificate `cert` with its key `key` (mutual TLS).
    #[must_use]
    pub fn with_client_cert(mut self, cert: PathBuf, key: PathBuf) -> Self {
        self.tls_client_cert = Some((cert, key));
        self
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), StoreError> {
        let bad = |what: &'static str| Err(StoreError::Unsupported(what));
        if self.servers.is_empty() {
            return bad("no NATS server given");
        }
        if self.bucket.is_empty()
            || !self
                .bucket
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return bad("bucket names are [a-zA-Z0-9_-]+");
        }
        if !(1..=64).contains(&self.history) {
            return bad("history must be 1 to 64");
        }
        if !(1..=5).contains(&self.replicas) {
            return bad("replicas must be 1 to 5");
        }
        if self.marker_ttl < Duration::from_secs(1) {
            return bad("marker_ttl must be at least 1 s");
        }
        Ok(())
    }
}

//! Connection and behaviour options of [`crate::EtcdStore`].

use std::time::Duration;

/// How to reach etcd and how the store behaves. Build with [`EtcdConfig::new`] and the
/// `with_*` methods.
#[derive(Clone)]
#[non_exhaustive]
pub struct EtcdConfig {
    /// Client URLs, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Prefix of every etcd key of this store, trimmed from the keys the store returns.
    pub namespace: String,
    /// Time allowed to open a connection.
    pub connect_timeout: Duration,
    /// Time allowed for each request; a request that takes longer fails with
    /// [`datasync::StoreError::Timeout`] (its outcome is unknown).
    pub request_timeout: Duration,
    /// How long [`crate::EtcdStore::connect`] keeps retrying (with backoff) an etcd that
    /// cannot be reached; zero fails at once with a retryable error.
    pub wait_for_server: Duration,
    /// `(user, password)` for etcd authentication.
    pub user: Option<(String, String)>,
    /// Largest value accepted, in bytes (etcd's own request limit is 1.5 MiB by default).
    pub max_value_size: usize,
    /// Keys per page when reading a prefix (each page pinned to one revision).
    ///
    /// Large by default: etcd 3.4 walks the whole rest of the range for every page (it
    /// has no limit push-down), so small pages make a big resync quadratic — pages of
    /// 1,000 made a 100k-key resync 9× slower than one request. A page that exceeds the
    /// client's message limit is retried at half the size.
    pub page_size: usize,
    /// TLS options (feature `tls`).
    #[cfg(feature = "tls")]
    pub tls: Option<etcd_client::TlsOptions>,
}

impl std::fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("namespace", &self.namespace)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("wait_for_server", &self.wait_for_server)
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .field("max_value_size", &self.max_value_size)
            .field("page_size", &self.page_size)
            .finish_non_exhaustive()
    }
}

impl EtcdConfig {
    /// Defaults for `endpoints`: no namespace, 5 s connect and request timeouts, no
    /// waiting for an unreachable server, 1 MiB values, pages of 100,000 keys.
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Self {
        EtcdConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            namespace: String::new(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            wait_for_server: Duration::ZERO,
            user: None,
            max_value_size: 1 << 20,
            page_size: 100_000,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }

    /// Sets [`namespace`](Self::namespace).
    #[must_use]
    pub fn with_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Sets [`connect_timeout`](Self::connect_timeout).
    #[must_use]
    pub fn with_connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t;
        self
    }

    /// Sets [`request_timeout`](Self::request_timeout).
    #[must_use]
    pub fn with_request_timeout(mut self, t: Duration) -> Self {
        self.request_timeout = t;
        self
    }

    /// Sets [`wait_for_server`](Self::wait_for_server).
    #[must_use]
    pub fn with_wait_for_server(mut self, t: Duration) -> Self {
        self.wait_for_server = t;
        self
    }

    /// Sets [`user`](Self::user).
    #[must_use]
    pub fn with_user(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.user = Some((user.into(), password.into()));
        self
    }

    /// Sets [`max_value_size`](Self::max_value_size).
    #[must_use]
    pub fn with_max_value_size(mut self, n: usize) -> Self {
        self.max_value_size = n;
        self
    }

    /// Sets [`page_size`](Self::page_size) (at least 1).
    #[must_use]
    pub fn with_page_size(mut self, n: usize) -> Self {
        self.page_size = n.max(1);
        self
    }

    /// Sets [`tls`](Self::tls).
    #[cfg(feature = "tls")]
    #[must_use]
    pub fn with_tls(mut self, tls: etcd_client::TlsOptions) -> Self {
        self.tls = Some(tls);
        self
    }

    pub(crate) fn connect_options(&self) -> etcd_client::ConnectOptions {
        let mut o = etcd_client::ConnectOptions::new()
            .with_connect_timeout(self.connect_timeout)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        if let Some((u, p)) = &self.user {
            o = o.with_user(u.clone(), p.clone());
        }
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.tls {
            o = o.with_tls(tls.clone());
        }
        o
    }
}

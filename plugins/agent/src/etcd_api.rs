//! etcd's v3 API on the embedded store (`[store.etcd_api]`, `datasync serve
//! --etcd-listen`), when built with the `etcd-api` feature.

use std::net::SocketAddr;

use crate::{AgentError, AnyStore, EtcdApiSettings, StoreConfig};

/// A running etcd API endpoint.
#[derive(Debug)]
pub struct EtcdApiServing {
    #[cfg(feature = "etcd-api")]
    serving: datasync_etcd_api::Serving,
}

impl EtcdApiServing {
    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        #[cfg(feature = "etcd-api")]
        return self.serving.addr();
        #[cfg(not(feature = "etcd-api"))]
        unreachable!("no endpoint exists without the etcd-api feature")
    }

    /// Stops serving (open watches end).
    pub async fn stop(self) {
        #[cfg(feature = "etcd-api")]
        self.serving.stop().await;
    }
}

/// Serves etcd's API for `store` (an embedded raft store) as `settings` say.
pub async fn serve_etcd_api(
    store: &AnyStore,
    settings: &EtcdApiSettings,
) -> Result<EtcdApiServing, AgentError> {
    let addr = settings.listen;
    let AnyStore::Raft(raft) = store else {
        return Err(AgentError::Config(crate::ConfigError::Invalid {
            origin: "store.etcd_api".into(),
            message: "the etcd API is served by the embedded raft store only".into(),
        }));
    };
    #[cfg(feature = "etcd-api")]
    {
        settings.check().map_err(|message| {
            AgentError::Config(crate::ConfigError::Invalid {
                origin: "store.etcd_api".into(),
                message,
            })
        })?;
        let mut api = datasync_etcd_api::EtcdApi::new(raft.clone());
        if let (Some(cert), Some(key)) = (&settings.cert_file, &settings.key_file) {
            let read = |path: &std::path::Path| {
                std::fs::read(path).map_err(|source| AgentError::EtcdApi {
                    addr,
                    source: format!("cannot read {}: {source}", path.display()).into(),
                })
            };
            api = api.tls(datasync_etcd_api::Tls {
                cert: read(cert)?,
                key: read(key)?,
                client_ca: settings.client_ca_file.as_deref().map(read).transpose()?,
            });
        }
        let serving = api.bind(addr).await.map_err(|source| AgentError::EtcdApi {
            addr,
            source: Box::new(source),
        })?;
        tracing::info!(addr = %serving.addr(), "serving the etcd v3 API");
        Ok(EtcdApiServing { serving })
    }
    #[cfg(not(feature = "etcd-api"))]
    {
        let _ = (raft, addr, settings);
        Err(AgentError::NotBuiltIn("etcd-api"))
    }
}

/// The endpoint `config` asks for, if any.
pub(crate) async fn from_config(
    config: &StoreConfig,
    store: &AnyStore,
) -> Result<Option<EtcdApiServing>, AgentError> {
    match config {
        StoreConfig::Raft {
            etcd_api: Some(api),
            ..
        } => serve_etcd_api(store, api).await.map(Some),
        _ => Ok(None),
    }
}

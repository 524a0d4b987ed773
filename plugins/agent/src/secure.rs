//! Secure connections to etcd and NATS: TLS (`[store.tls]`) and credentials
//! (`[store.auth]`), from the agent's config, its `DATASYNC__STORE__…` overrides, or a
//! CLI store URL.
//!
//! Secrets can live in files (`password_file`, `token_file`, `creds_file`,
//! `nkey_file`) so that the config itself can be world-readable; a `password` or
//! `token` given inline (or in the environment) works too. Files are read when the
//! store is opened, so an error names the file.
// Without a NATS or etcd transport, only the settings' checks are used.
#![cfg_attr(not(any(feature = "nats", feature = "etcd")), allow(dead_code))]

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::AgentError;

/// TLS to the store's servers (`[store.tls]`). Its presence turns TLS on.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct TlsSettings {
    /// PEM CA certificate(s) to trust for the server's certificate, instead of the
    /// system's (etcd: required, as etcd-client reads no system roots).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for servers that verify clients (mutual TLS); needs
    /// `key_file`.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// etcd: the name the server's certificate must carry (default: the endpoint's
    /// host).
    #[serde(default)]
    pub server_name: Option<String>,
}

/// Credentials for the store (`[store.auth]`): etcd takes a user and password; NATS
/// takes one of a user and password, a token, a credentials file or an NKey seed.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct AuthSettings {
    /// User name (with `password` or `password_file`).
    #[serde(default)]
    pub user: Option<String>,
    /// Password, inline (a TOML string).
    #[serde(default, deserialize_with = "scalar")]
    pub password: Option<String>,
    /// File holding the password (surrounding whitespace trimmed).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// NATS: a token, inline.
    #[serde(default, deserialize_with = "scalar")]
    pub token: Option<String>,
    /// NATS: file holding a token.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// NATS: a `.creds` file (user JWT and NKey seed).
    #[serde(default)]
    pub creds_file: Option<PathBuf>,
    /// NATS: file holding a user's NKey seed (`SU…`).
    #[serde(default)]
    pub nkey_file: Option<PathBuf>,
}

/// A secret, which must be a string: anything else is refused without showing it
/// (serde's message would quote a number, and TOML would have rewritten it: `0x1F`,
/// `1_000`, `1e3`).
fn scalar<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    use serde::de::Error;
    match Option::<toml::Value>::deserialize(d)? {
        None => Ok(None),
        Some(toml::Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(D::Error::custom(
            "a password or token must be a string: quote it",
        )),
    }
}

impl std::fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a secret, only whether it is set.
        let set = |o: bool| if o { "Some(..)" } else { "None" };
        f.debug_struct("AuthSettings")
            .field("user", &self.user)
            .field("password", &set(self.password.is_some()))
            .field("password_file", &self.password_file)
            .field("token", &set(self.token.is_some()))
            .field("token_file", &self.token_file)
            .field("creds_file", &self.creds_file)
            .field("nkey_file", &self.nkey_file)
            .finish()
    }
}

impl AuthSettings {
    fn password_given(&self) -> bool {
        self.password.is_some() || self.password_file.is_some()
    }

    fn token_given(&self) -> bool {
        self.token.is_some() || self.token_file.is_some()
    }

    /// Checks the fields fit together, for `kind` ("etcd" or "nats"), naming the field.
    pub(crate) fn check(&self, kind: &str) -> Result<(), String> {
        let both = |a: &str, b: &str| format!("store.auth: give {a} or {b}, not both");
        if self.password.is_some() && self.password_file.is_some() {
            return Err(both("password", "password_file"));
        }
        if self.token.is_some() && self.token_file.is_some() {
            return Err(both("token", "token_file"));
        }
        if self.user.is_some() != self.password_given() {
            return Err(match self.user {
                Some(_) => "store.auth: user needs password or password_file".to_owned(),
                None => "store.auth: password needs user".to_owned(),
            });
        }
        let methods = [
            self.user.is_some(),
            self.token_given(),
            self.creds_file.is_some(),
            self.nkey_file.is_some(),
        ];
        if kind == "etcd" && methods[1..].iter().any(|m| *m) {
            return Err(
                "store.auth: etcd takes user and password only (token, creds_file and \
                 nkey_file are NATS's)"
                    .to_owned(),
            );
        }
        if methods.iter().filter(|m| **m).count() > 1 {
            return Err(
                "store.auth: give one of user/password, token, creds_file or nkey_file".to_owned(),
            );
        }
        Ok(())
    }

    fn password(&self) -> Result<Option<String>, AgentError> {
        secret(self.password.as_ref(), self.password_file.as_deref())
    }

    #[cfg(feature = "nats")]
    fn token(&self) -> Result<Option<String>, AgentError> {
        secret(self.token.as_ref(), self.token_file.as_deref())
    }
}

impl TlsSettings {
    /// Checks the fields fit together, naming the field.
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err("store.tls: cert_file and key_file go together".to_owned());
        }
        Ok(())
    }
}

/// An inline secret, or one read from `file`.
fn secret(inline: Option<&String>, file: Option<&Path>) -> Result<Option<String>, AgentError> {
    match (inline, file) {
        (Some(s), _) => Ok(Some(s.clone())),
        (None, Some(path)) => Ok(Some(read(path)?.trim().to_owned())),
        (None, None) => Ok(None),
    }
}

fn read(path: &Path) -> Result<String, AgentError> {
    std::fs::read_to_string(path).map_err(|source| AgentError::CredentialFile {
        path: path.to_owned(),
        source,
    })
}

fn read_bytes(path: &Path) -> Result<Vec<u8>, AgentError> {
    std::fs::read(path).map_err(|source| AgentError::CredentialFile {
        path: path.to_owned(),
        source,
    })
}

/// The etcd transport's settings. With TLS, every endpoint must be `https://`
/// (etcd-client would refuse an `http://` one less clearly).
#[cfg(feature = "etcd")]
pub(crate) fn etcd_config(
    endpoints: &[String],
    namespace: &str,
    tls: Option<&TlsSettings>,
    auth: &AuthSettings,
) -> Result<datasync_etcd::EtcdConfig, AgentError> {
    use etcd_client::{Certificate, Identity, TlsOptions};
    let mut c = datasync_etcd::EtcdConfig::new(endpoints.to_owned()).with_namespace(namespace);
    if let (Some(user), Some(password)) = (&auth.user, auth.password()?) {
        if tls.is_none() {
            tracing::warn!("an etcd password without [store.tls] crosses the network in clear");
        }
        c = c.with_user(user.clone(), password);
    }
    if let Some(t) = tls {
        let mut o = TlsOptions::new();
        if let Some(ca) = &t.ca_file {
            o = o.ca_certificate(Certificate::from_pem(read_bytes(ca)?));
        }
        if let (Some(cert), Some(key)) = (&t.cert_file, &t.key_file) {
            o = o.identity(Identity::from_pem(read_bytes(cert)?, read_bytes(key)?));
        }
        if let Some(name) = &t.server_name {
            o = o.domain_name(name.clone());
        }
        c = c.with_tls(o);
    }
    Ok(c)
}

/// The NATS transport's settings.
#[cfg(feature = "nats")]
pub(crate) fn nats_config(
    servers: &[String],
    bucket: &str,
    tls: Option<&TlsSettings>,
    auth: &AuthSettings,
) -> Result<datasync_nats::NatsConfig, AgentError> {
    use datasync_nats::Auth;
    let mut c = datasync_nats::NatsConfig::new(servers.to_owned()).with_bucket(bucket);
    let a = if let (Some(user), Some(password)) = (&auth.user, auth.password()?) {
        Auth::UserPassword(user.clone(), password)
    } else if let Some(token) = auth.token()? {
        Auth::Token(token)
    } else if let Some(creds) = &auth.creds_file {
        Auth::CredentialsFile(creds.clone())
    } else if let Some(seed) = &auth.nkey_file {
        Auth::NKey(read(seed)?.trim().to_owned())
    } else {
        Auth::None
    };
    let secured = !matches!(a, Auth::None);
    c = c.with_auth(a);
    if let Some(t) = tls {
        // async-nats reads these when it connects, and would report a missing file
        // as a TLS failure without its name: read them here first.
        let pem = |f: &Option<PathBuf>, label: &str| -> Result<(), AgentError> {
            let Some(f) = f else { return Ok(()) };
            let text = String::from_utf8_lossy(&read_bytes(f)?).into_owned();
            match text.contains("-----BEGIN ") && text.contains(label) {
                true => Ok(()),
                false => Err(AgentError::CredentialFile {
                    path: f.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("no PEM {} in it", label.trim_end_matches('-')),
                    ),
                }),
            }
        };
        pem(&t.ca_file, "CERTIFICATE-----")?;
        pem(&t.cert_file, "CERTIFICATE-----")?;
        pem(&t.key_file, "PRIVATE KEY-----")?;
        c = c.with_tls(t.ca_file.clone());
        if let (Some(cert), Some(key)) = (&t.cert_file, &t.key_file) {
            c = c.with_client_cert(cert.clone(), key.clone());
        }
    } else if secured && servers.iter().any(|s| !s.starts_with("tls://")) {
        tracing::warn!(
            "NATS credentials without [store.tls]: they cross the network in clear unless the server requires TLS"
        );
    }
    Ok(c)
}

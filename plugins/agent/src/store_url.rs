//! A store as a URL, for the CLI's `--store` (and `DATASYNC_STORE`).
//!
//! ```text
//! ./data  raft:DIR                                  the embedded raft store
//! raft://HOST:PORT[,…]                              a raft cluster, as a remote client
//! nats://[USER:PASSWORD@|TOKEN@]HOST:PORT[,…]       NATS (tls:// requires TLS)
//!     ?bucket=B&ca=F&cert=F&key=F&user=U&password_file=F&token_file=F&creds=F&nkey=F
//! etcd://[USER[:PASSWORD]@]HOST:PORT[,…]            etcd (TLS when ca, cert, key,
//!     ?namespace=N&ca=F&cert=F&key=F&server_name=S   server_name or tls=true is given)
//!      &tls=true&user=U&password_file=F
//! ```
//!
//! A password in the URL is visible to other users of the machine (`ps`):
//! `password_file` (or the agent's config) keeps it out of sight. Characters that
//! would end the part they are in (`@`, `:`, `/`, `?`, `,` in a user or password; `&`,
//! `=`, `%` in a parameter) are percent-encoded (`%40`); `+` is a plus. Error messages
//! never repeat what comes before `@`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::{AuthSettings, StoreConfig, TlsSettings};

const FORMS: &str = "a directory, raft:DIR, raft://HOST:PORT[,…], \
    nats://HOST:PORT[,…][?bucket=B], tls://HOST:PORT[,…][?bucket=B] or \
    etcd://HOST:PORT[,…][?namespace=N]";

impl StoreConfig {
    /// The store `spec` names (see the module docs): a value without `://` is a
    /// directory; with it, the scheme must be one this knows (a typo must not turn into
    /// a directory named after a URL). `secret_file` is a raft cluster's secret.
    /// Errors say what is wrong with the URL.
    pub fn from_url(spec: &str, secret_file: Option<&Path>) -> Result<StoreConfig, String> {
        // What may be shown of the URL: a secret may precede an '@' (or, not
        // percent-encoded, sit anywhere after it).
        let quiet = spec.contains('@');
        let Some((scheme, rest)) = spec.split_once("://") else {
            if let Some(s) = ["nats:", "tls:", "etcd:"]
                .iter()
                .find(|s| spec.starts_with(**s))
            {
                return Err(format!(
                    "a store starting with {s:?} but without \"://\" is no URL (and no directory \
                     this would take); --store takes {FORMS}"
                ));
            }
            let dir = spec.strip_prefix("raft:").unwrap_or(spec);
            if dir.is_empty() {
                return Err(format!("empty store directory; --store takes {FORMS}"));
            }
            return Ok(StoreConfig::raft(dir));
        };
        if !["raft", "nats", "tls", "etcd"].contains(&scheme) {
            return Err(match quiet {
                false => {
                    format!("unknown store scheme {scheme:?} in {spec:?}; --store takes {FORMS}")
                }
                true => format!("unknown store scheme; --store takes {FORMS}"),
            });
        }
        let shown = match quiet {
            true => format!("{scheme}://…"),
            false => spec.to_owned(),
        };
        let param = |k: &str| match quiet {
            true => "a parameter".to_owned(),
            false => format!("parameter {k:?}"),
        };
        let (hosts, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (userinfo, hosts) = match hosts.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, hosts),
        };
        let mut params = BTreeMap::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let (k, v) = (decode(k)?, decode(v)?);
            if params.insert(k.clone(), v).is_some() {
                return Err(format!("{} given twice", param(&k)));
            }
        }
        let endpoints = hosts
            .split(',')
            .map(|h| endpoint(scheme, h, quiet))
            .collect::<Result<Vec<_>, _>>()?;
        let mut take = |k: &str| params.remove(k);
        let config = if scheme == "raft" {
            if userinfo.is_some() {
                return Err("a raft:// store takes its secret from --secret-file".to_owned());
            }
            StoreConfig::Remote {
                endpoints,
                secret_file: secret_file
                    .ok_or("a raft:// store needs --secret-file (or DATASYNC_SECRET_FILE)")?
                    .to_owned(),
            }
        } else {
            let file = |v: Option<String>| v.map(PathBuf::from);
            let mut auth = AuthSettings {
                user: take("user"),
                password_file: file(take("password_file")),
                token_file: file(take("token_file")),
                creds_file: file(take("creds")),
                nkey_file: file(take("nkey")),
                ..AuthSettings::default()
            };
            if let Some(info) = userinfo {
                if auth.user.is_some() {
                    return Err("give the user before '@' or as user=, not both".to_owned());
                }
                match info.split_once(':') {
                    Some((u, p)) => {
                        auth.user = Some(decode(u)?);
                        auth.password = Some(decode(p)?);
                    }
                    None if scheme == "etcd" => auth.user = Some(decode(info)?),
                    None => auth.token = Some(decode(info)?),
                }
            }
            let tls_flag = match take("tls").as_deref() {
                None => None,
                Some("false") => Some(false),
                Some("true") => Some(true),
                Some(v) if !quiet => {
                    return Err(format!("tls={v:?}: give tls=true or tls=false"));
                }
                Some(_) => return Err("tls: give tls=true or tls=false".to_owned()),
            };
            let tls = TlsSettings {
                ca_file: file(take("ca")),
                cert_file: file(take("cert")),
                key_file: file(take("key")),
                server_name: take("server_name"),
            };
            let tls = match tls_flag {
                Some(false) if tls != TlsSettings::default() => {
                    return Err("tls=false with ca, cert, key or server_name".to_owned());
                }
                Some(false) => None,
                _ if tls != TlsSettings::default() => Some(tls),
                Some(true) => Some(tls),
                None => None,
            };
            if scheme == "etcd" {
                let web = if tls.is_some() { "https" } else { "http" };
                StoreConfig::Etcd {
                    endpoints: endpoints.iter().map(|e| format!("{web}://{e}")).collect(),
                    namespace: take("namespace").unwrap_or_default(),
                    tls,
                    auth,
                }
            } else {
                StoreConfig::Nats {
                    servers: endpoints
                        .iter()
                        .map(|e| format!("{scheme}://{e}"))
                        .collect(),
                    bucket: take("bucket").unwrap_or_else(|| "datasync".to_owned()),
                    tls,
                    auth,
                }
            }
        };
        if let Some(k) = params.keys().next() {
            return Err(format!("unknown {} for a {scheme}:// store", param(k)));
        }
        // The same checks as the agent's config; the field names are the URL's.
        config.check().map_err(|e| {
            let e = e.replace("store.auth: ", "").replace("store.tls: ", "");
            format!("{shown:?}: {e}")
        })?;
        Ok(config)
    }
}

/// A percent-encoded part of a URL (`+` stays a plus: these are paths and names, not
/// form fields).
fn decode(s: &str) -> Result<String, String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| "a part of the store URL is not UTF-8 once percent-decoded".to_owned())
}

/// One `HOST:PORT` of a store URL, checked by the `url` crate; `quiet`: the URL may
/// hold a secret, which a message must not repeat.
fn endpoint(scheme: &str, hostport: &str, quiet: bool) -> Result<String, String> {
    let bad = |why: &str| match quiet {
        false => format!("bad {scheme}:// endpoint {hostport:?}: {why}"),
        true => format!(
            "bad {scheme}:// endpoint: {why} (percent-encode '@', ':', '/', '?' and ',' in \
             a user or password)"
        ),
    };
    let u = url::Url::parse(&format!("{scheme}://{hostport}")).map_err(|e| bad(&e.to_string()))?;
    if u.host_str().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    if u.port().is_none() {
        return Err(bad("no port"));
    }
    if !matches!(u.path(), "" | "/") || u.fragment().is_some() || !u.username().is_empty() {
        return Err(bad("only HOST:PORT is allowed"));
    }
    Ok(hostport.to_owned())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn urls_carry_tls_and_credentials() {
        let c = StoreConfig::from_url(
            "etcd://agent:p%40ss@127.0.0.1:2379,127.0.0.1:2380?ca=/ca.pem&cert=/c.pem&key=/c.key&namespace=n/",
            None,
        )
        .unwrap();
        let StoreConfig::Etcd {
            endpoints,
            namespace,
            tls,
            auth,
        } = c
        else {
            panic!("{c:?}")
        };
        assert_eq!(
            endpoints,
            ["https://127.0.0.1:2379", "https://127.0.0.1:2380"]
        );
        assert_eq!(namespace, "n/");
        assert_eq!(tls.unwrap().key_file, Some(PathBuf::from("/c.key")));
        assert_eq!(
            (auth.user.as_deref(), auth.password.as_deref()),
            (Some("agent"), Some("p@ss"))
        );

        let c = StoreConfig::from_url("etcd://127.0.0.1:2379?namespace=x", None).unwrap();
        assert!(
            matches!(&c, StoreConfig::Etcd { endpoints, tls: None, .. } if endpoints[0].starts_with("http://"))
        );

        let c = StoreConfig::from_url("tls://t0k@h:4222?bucket=b&ca=/ca.pem", None).unwrap();
        let StoreConfig::Nats {
            servers, tls, auth, ..
        } = c
        else {
            panic!("{c:?}")
        };
        assert_eq!(servers, ["tls://h:4222"]);
        assert_eq!(tls.unwrap().ca_file, Some(PathBuf::from("/ca.pem")));
        assert_eq!(auth.token.as_deref(), Some("t0k"));
        let c = StoreConfig::from_url("nats://h:4222?creds=/u.creds", None).unwrap();
        assert!(
            matches!(c, StoreConfig::Nats { tls: None, auth, .. } if auth.creds_file.is_some())
        );
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        let refused = |spec: &str, why: &str| {
            let e = StoreConfig::from_url(spec, None).unwrap_err();
            assert!(e.contains(why), "{spec}: {e}");
        };
        refused("etcd://u@h:1", "user needs password");
        refused(
            "etcd://h:1?token_file=/t",
            "etcd takes user and password only",
        );
        refused("nats://u:p@h:1?token_file=/t", "one of");
        refused("nats://h:1?cert=/c", "cert_file and key_file");
        refused("etcd://h:1?tls=true", "needs ca_file");
        refused("etcd://h:1?tls=yes", "tls=true or tls=false");
        refused("nats://h:1?colour=red", "unknown parameter \"colour\"");
        refused("raft://u@h:1", "--secret-file");
        refused("htp://h:1", "unknown store scheme");
        refused("nats://h", "no port");
        refused("", "empty store directory");
        refused("etcd://h:1?ca=a&ca=b", "given twice");
        refused("etcd://u:p@h:1?user=v", "not both");
        refused("etcd://h:1?tls=false&ca=a", "tls=false with ca");
        // What precedes '@' is never repeated, even where the URL is wrong.
        for spec in [
            "nats://agent:s3cret@h:1?cert=/c",
            "etcd://u:s3cret?x@h:1",
            "etcd://admin:2024?s3cret@db:2379",
            "etcd://u:1?tls=s3cret@h:1",
            "etcd://u:1?k=1&k=s3cret@h:1",
            "u:s3cret@etcd://h:1",
            "htp://u:s3cret@h:1",
            "etcd://u:s3cret@h",
            "etcd:/u:s3cret@h:1",
        ] {
            let e = StoreConfig::from_url(spec, None).unwrap_err();
            assert!(!e.contains("s3cret"), "{spec}: {e}");
        }
        // A plus is a plus; percent-encoding is decoded.
        let c = StoreConfig::from_url("etcd://u:p%3Fw@h:1?password_file=/c++/pw&ca=/a%20b", None);
        assert!(c.is_err(), "password and password_file");
        let c =
            StoreConfig::from_url("etcd://u@h:1?password_file=/c++/pw&ca=/a%20b", None).unwrap();
        let StoreConfig::Etcd { tls, auth, .. } = c else {
            panic!("{c:?}")
        };
        assert_eq!(auth.password_file, Some(PathBuf::from("/c++/pw")));
        assert_eq!(tls.unwrap().ca_file, Some(PathBuf::from("/a b")));
        let c = StoreConfig::from_url("etcd://u:p%3Fw%40x@h:1", None).unwrap();
        assert!(
            matches!(c, StoreConfig::Etcd { auth, .. } if auth.password.as_deref() == Some("p?w@x"))
        );
    }
}

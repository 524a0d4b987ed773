//! The built-in store's etcd endpoint over TLS with client certificates (made with the
//! `openssl` CLI): `etcdctl` and the `datasync-etcd` transport get in with a
//! certificate the test CA signed, nothing gets in without one, and plain text is
//! refused.
#![cfg(feature = "tls")]
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::process::Command;
use std::time::Duration;

use datasync::{Key, ReadOptions, Writer};
use datasync_etcd::{EtcdConfig, EtcdStore};
use datasync_etcd_api::{BindError, EtcdApi, Tls};
use datasync_integration::testkit::{certificates, put_watch_get};
use datasync_raft::{RaftConfig, RaftStore};
use etcd_client::{Certificate, Identity, TlsOptions};

/// etcdctl against `endpoint` with `extra` flags; its exit status and output.
fn etcdctl(endpoint: &str, extra: &[String], args: &[&str]) -> (bool, String) {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", endpoint, "--dial-timeout", "3s"])
        .args(["--command-timeout", "10s"])
        .args(extra)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run etcdctl ({e}): install it with `apt-get install etcd-client`")
        });
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), said)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etcd_endpoint_serves_tls_to_clients_with_a_certificate_only() {
    let certs = tempfile::tempdir().unwrap();
    certificates(certs.path());
    let path = |name: &str| certs.path().join(name).to_str().unwrap().to_owned();
    let read = |name: &str| std::fs::read(certs.path().join(name)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = RaftStore::open(RaftConfig::new(dir.path())).await.unwrap();

    // Unusable certificates are a typed error, before anything listens.
    let bad = EtcdApi::new(store.clone())
        .tls(Tls {
            cert: b"not a certificate".to_vec(),
            key: read("server.key"),
            client_ca: None,
        })
        .bind("127.0.0.1:0".parse().unwrap())
        .await;
    assert!(matches!(bad, Err(BindError::Tls(_))), "{bad:?}");

    let api = EtcdApi::new(store.clone())
        .tls(Tls {
            cert: read("server.crt"),
            key: read("server.key"),
            client_ca: Some(read("ca.crt")),
        })
        .bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let endpoint = format!("https://{}", api.addr());

    // Our etcd transport, with a client certificate: writes, watches, reads.
    let tls = TlsOptions::new()
        .ca_certificate(Certificate::from_pem(read("ca.crt")))
        .identity(Identity::from_pem(read("client.crt"), read("client.key")));
    let etcd = EtcdStore::connect(
        EtcdConfig::new([endpoint.clone()])
            .with_tls(tls)
            .with_connect_timeout(Duration::from_secs(5)),
    )
    .await
    .unwrap();
    put_watch_get(&etcd).await;
    let k = Key::new("tls/k").unwrap();

    // A transport that trusts the server but has no certificate of its own gets
    // nowhere.
    let anonymous = EtcdStore::connect(
        EtcdConfig::new([endpoint.clone()])
            .with_tls(TlsOptions::new().ca_certificate(Certificate::from_pem(read("ca.crt"))))
            .with_connect_timeout(Duration::from_secs(2)),
    )
    .await;
    if let Ok(anonymous) = anonymous {
        let got = tokio::time::timeout(
            Duration::from_secs(5),
            anonymous.get(&k, ReadOptions::new()),
        )
        .await;
        assert!(
            !matches!(got, Ok(Ok(_))),
            "read without a client certificate: {got:?}"
        );
    }

    let endpoint2 = endpoint.clone();
    let plain = format!("http://{}", api.addr());
    let (ca, cert, key) = (path("ca.crt"), path("client.crt"), path("client.key"));
    tokio::task::spawn_blocking(move || {
        let full = [
            format!("--cacert={ca}"),
            format!("--cert={cert}"),
            format!("--key={key}"),
        ];
        let (ok, said) = etcdctl(&endpoint2, &full, &["get", "tls/k"]);
        assert!(ok && said == "tls/k\nsecret\n", "{said}");
        let (ok, said) = etcdctl(&endpoint2, &full, &["put", "tls/k", "2"]);
        assert!(ok, "{said}");
        let (ok, said) = etcdctl(&endpoint2, &full[..1], &["get", "tls/k"]);
        assert!(!ok, "etcdctl without a client certificate got in: {said}");
        let (ok, said) = etcdctl(&plain, &[], &["get", "tls/k"]);
        assert!(!ok, "etcdctl in plain text got in: {said}");
    })
    .await
    .unwrap();
    api.stop().await;
    store.shutdown().await;
}

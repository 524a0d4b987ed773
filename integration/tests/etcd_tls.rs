//! `datasync-etcd` over TLS, against an etcd serving clients over TLS with a
//! certificate from a test CA (made with the `openssl` CLI).
#![cfg(feature = "tls")]
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::time::Duration;

use datasync_etcd::{EtcdConfig, EtcdStore};
use datasync_integration::EtcdServer;
use datasync_integration::testkit::{certificates, put_watch_get};
use etcd_client::{Certificate, TlsOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_and_watches_over_tls_and_refuses_an_unknown_server() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let etcd = EtcdServer::start_tls(
        &dir.path().join("server.crt"),
        &dir.path().join("server.key"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let ca = std::fs::read(dir.path().join("ca.crt")).unwrap();
    let tls = TlsOptions::new().ca_certificate(Certificate::from_pem(ca));
    let store = EtcdStore::connect(
        EtcdConfig::new([etcd.endpoint()])
            .with_tls(tls)
            .with_wait_for_server(Duration::from_secs(30)),
    )
    .await
    .unwrap();
    put_watch_get(&store).await;

    // A client that does not trust the test CA must not get through.
    let untrusting = EtcdStore::connect(
        EtcdConfig::new([etcd.endpoint()])
            .with_tls(TlsOptions::new())
            .with_connect_timeout(Duration::from_secs(2)),
    )
    .await;
    assert!(
        untrusting.is_err(),
        "connected without trusting the server's CA"
    );
}

//! The etcd harness starts a real server, serves, and leaves nothing behind.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use datasync_integration::EtcdServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_starts_serves_and_is_killed_on_drop() {
    let etcd = EtcdServer::start().await.unwrap_or_else(|e| panic!("{e}"));
    let mut c = etcd.client().await.unwrap();
    c.put("k", "v", None).await.unwrap();
    let got = c.get("k", None).await.unwrap();
    assert_eq!(got.kvs()[0].value(), b"v");
    let pid = etcd.pid();
    drop(etcd);
    // Drop killed and reaped it: the process is gone, not a zombie.
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "etcd {pid} survived drop"
    );
}

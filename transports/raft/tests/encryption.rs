//! What crosses the network between members, and between a remote client and a member,
//! is encrypted: a relay in the middle records every byte, and neither the values nor
//! the keys written appear in it, while the writes go through.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use datasync::{Consistency, Key, PutOptions, ReadOptions, Value, Writer};
use datasync_raft::testing::{test_secret, wait_until};
use datasync_raft::{ClusterConfig, RaftConfig, RaftStore, RemoteConfig, RemoteStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A loopback relay to `upstream` that keeps a copy of every byte, both ways.
struct Relay {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl Relay {
    async fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let tap = seen.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(copy(cr, sw, tap.clone()));
                tokio::spawn(copy(sr, cw, tap.clone()));
            }
        });
        Relay { addr, seen }
    }

    fn seen(&self) -> Vec<u8> {
        self.seen.lock().unwrap().clone()
    }
}

async fn copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    tap: Arc<Mutex<Vec<u8>>>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        tap.lock().unwrap().extend_from_slice(&buf[..n]);
    }
    let _ = to.shutdown().await;
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A value no encoding of ours would produce by chance, and long enough to show.
fn secret_value(tag: &str) -> Value {
    Value::from(format!("plaintext-{tag}-").repeat(200))
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_and_client_traffic_carries_no_value_or_key_in_clear() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let leader = RaftStore::open(
        RaftConfig::new(d1.path()).cluster(1, ClusterConfig::new(any, test_secret())),
    )
    .await
    .unwrap();
    // Node 2 is reached by the others only through a relay (its advertised address).
    let listen2 = free_addr();
    let relay2 = Relay::start(listen2).await;
    let follower = RaftStore::open(
        RaftConfig::new(d2.path()).cluster(
            2,
            ClusterConfig::new(listen2, test_secret())
                .advertise(relay2.addr.to_string())
                .join([leader.cluster_addr().unwrap()]),
        ),
    )
    .await
    .unwrap();
    wait_until("two voters", || leader.members().voters.len() == 2).await;

    // Replicated from the leader to node 2 through the relay.
    let (k1, v1) = (Key::new("wire/member-key").unwrap(), secret_value("member"));
    leader
        .put(&k1, v1.clone(), PutOptions::new())
        .await
        .unwrap();
    let got = follower
        .get(
            &k1,
            ReadOptions::new().consistency(Consistency::Linearizable),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.value, v1);

    // A remote client's write and read, through a relay to the leader.
    let relay1 = Relay::start(leader.cluster_addr().unwrap().parse().unwrap()).await;
    let remote = RemoteStore::connect(RemoteConfig::new([relay1.addr.to_string()], test_secret()))
        .await
        .unwrap();
    let (k2, v2) = (Key::new("wire/client-key").unwrap(), secret_value("client"));
    remote
        .put(&k2, v2.clone(), PutOptions::new())
        .await
        .unwrap();
    let got = remote.get(&k2, ReadOptions::new()).await.unwrap().unwrap();
    assert_eq!(got.value, v2);
    // Node 2's copy of k2 crossed relay 2 as well.
    let got = follower
        .get(
            &k2,
            ReadOptions::new().consistency(Consistency::Linearizable),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.value, v2);

    for (name, relay, k, v) in [("member", &relay2, &k1, &v1), ("client", &relay1, &k2, &v2)] {
        let seen = relay.seen();
        assert!(
            seen.len() > v.as_bytes().len(),
            "{name} traffic: only {} bytes crossed the relay",
            seen.len()
        );
        assert!(
            !contains(&seen, &v.as_bytes()[..32]),
            "{name} traffic carries the value in clear"
        );
        assert!(
            !contains(&seen, k.as_str().as_bytes()),
            "{name} traffic carries the key in clear"
        );
    }
    // Node 2 also received k2 (replication) through its relay, encrypted too.
    assert!(!contains(&relay2.seen(), &v2.as_bytes()[..32]));
    drop(remote);
    follower.shutdown().await;
    leader.shutdown().await;
}

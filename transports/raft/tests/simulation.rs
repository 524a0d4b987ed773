//! Seeded simulation of raft clusters (issue 18, `docs/SIMULATION.md`): every member and
//! client of a cluster runs on one thread under turmoil's simulated time and network,
//! with the production code unchanged behind the `Net` seam and inline blocking work.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use datasync::{Key, PutOptions, ReadOptions, Writer};
use datasync_raft::testing::{Listener, Net, Socket, set_inline, test_secret};
use datasync_raft::{ClusterConfig, RaftConfig, RaftStore, RemoteConfig, RemoteStore};

/// turmoil's simulated TCP.
#[derive(Debug)]
struct SimNet;

#[async_trait::async_trait]
impl Net for SimNet {
    async fn connect(&self, addr: &str) -> io::Result<Socket> {
        Ok(Box::new(turmoil::net::TcpStream::connect(addr).await?))
    }

    async fn bind(&self, addr: SocketAddr) -> io::Result<Box<dyn Listener>> {
        Ok(Box::new(SimListener(
            turmoil::net::TcpListener::bind(addr).await?,
        )))
    }
}

struct SimListener(turmoil::net::TcpListener);

impl std::fmt::Debug for SimListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SimListener")
    }
}

#[async_trait::async_trait]
impl Listener for SimListener {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }

    async fn accept(&self) -> io::Result<(Socket, SocketAddr)> {
        let (s, peer) = self.0.accept().await?;
        Ok((Box::new(s), peer))
    }
}

const PORT: u16 = 7400;

fn addr(id: u64) -> String {
    format!("n{id}:{PORT}")
}

/// Member `id`'s config: node 1 bootstraps, the others join through it.
fn member(id: u64, dir: &std::path::Path) -> RaftConfig {
    let listen = SocketAddr::from(([0, 0, 0, 0], PORT));
    let mut c = ClusterConfig::new(listen, test_secret())
        .advertise(addr(id))
        .net(Arc::new(SimNet));
    if id > 1 {
        c = c.join([addr(1)]);
    }
    RaftConfig::new(dir).cluster(id, c)
}

#[test]
fn a_simulated_cluster_elects_and_serves_a_write() {
    set_inline(true);
    fastrand::seed(1);
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut sim = turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(120))
        .rng_seed(1)
        .build();
    for id in 1..=3u64 {
        let dir = dirs[id as usize - 1].path().to_owned();
        sim.host(format!("n{id}"), move || {
            let dir = dir.clone();
            async move {
                let _store = RaftStore::open(member(id, &dir)).await?;
                std::future::pending::<()>().await;
                Ok(())
            }
        });
    }
    sim.client("client", async {
        let remote = RemoteStore::connect(
            RemoteConfig::new((1..=3).map(addr), test_secret()).net(Arc::new(SimNet)),
        )
        .await?;
        let k = Key::new("sim/a")?;
        loop {
            let members = remote.members().await?;
            if members.voters.len() == 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let rev = remote.put(&k, "1".into(), PutOptions::new()).await?;
        let got = remote.get(&k, ReadOptions::new()).await?.unwrap();
        assert_eq!((got.value.as_bytes(), got.revision), (&b"1"[..], rev));
        Ok(())
    });
    sim.run().unwrap();
    set_inline(false);
}

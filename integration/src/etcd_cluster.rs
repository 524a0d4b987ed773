//! A real 3-member (or n-member) etcd cluster on loopback, for the cluster benchmark.
//! Each member has its own free ports and temp data dir; all are killed on drop
//! (each a [`Process`]).

use std::time::Duration;

use tempfile::TempDir;

use datasync::testing::process::Process;

use crate::etcd::{etcd_binary, io, member_command};
use crate::{HarnessError, free_port};

/// An etcd cluster whose members are processes of this test or benchmark.
#[derive(Debug)]
pub struct EtcdCluster {
    /// Dropped (killed) before the dirs.
    members: Vec<(Process, String)>,
    _dirs: Vec<TempDir>,
}

impl EtcdCluster {
    /// Starts `n` members and waits until the cluster has a leader (up to 60 s).
    pub async fn start(n: usize) -> Result<EtcdCluster, HarnessError> {
        let binary = etcd_binary()?;
        let mut ports = Vec::new();
        for _ in 0..n {
            ports.push((free_port().map_err(io)?, free_port().map_err(io)?));
        }
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect();
        let initial = initial.join(",");
        // Dirs are declared first so that, on an error, they drop after the members.
        let mut dirs = Vec::new();
        let mut members = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let dir = tempfile::tempdir().map_err(io)?;
            let endpoint = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let name = format!("m{i}");
            let command = member_command(
                &binary,
                dir.path(),
                &endpoint,
                &peer_url,
                None,
                &name,
                &initial,
            );
            let log = dir.path().join("etcd.log");
            members.push((
                Process::spawn("etcd", Some(log), command).map_err(io)?,
                endpoint,
            ));
            dirs.push(dir);
        }
        let cluster = EtcdCluster {
            members,
            _dirs: dirs,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while cluster.leader().await.is_none() {
            if tokio::time::Instant::now() > deadline {
                return Err(HarnessError::NotReady {
                    binary: "etcd",
                    reason: "the cluster elected no leader in 60 s".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(cluster)
    }

    /// The members' client URLs.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|(_, e)| e.clone()).collect()
    }

    /// The index of the member that leads now, if the members agree on one.
    pub async fn leader(&self) -> Option<usize> {
        let mut leader = None;
        let mut ids = Vec::new();
        for (_, endpoint) in &self.members {
            let mut c = etcd_client::Client::connect([endpoint], None).await.ok()?;
            let s = c.status().await.ok()?;
            leader = Some(s.leader());
            ids.push(s.header()?.member_id());
        }
        let leader = leader.filter(|l| *l != 0)?;
        ids.iter().position(|id| *id == leader)
    }

    /// A client connected to member `i` only.
    pub async fn client(&self, i: usize) -> Result<etcd_client::Client, etcd_client::Error> {
        etcd_client::Client::connect([&self.members[i].1], None).await
    }
}

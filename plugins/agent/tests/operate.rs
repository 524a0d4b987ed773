//! Operating a running agent and a `serve` node as an operator does: `/metrics` read by
//! an outside parser (Python's `prometheus_client`) while writes load the store,
//! `/readyz`, `datasync status`, `datasync resync`, a plugin asking for its own resync.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use datasync::{Key, PutOptions, Writer};
use datasync_integration::free_port;
use serde_json::Value as Json;

mod common;
use common::{Running, get, ok};

const BIN: &str = env!("CARGO_BIN_EXE_datasync");

/// Parses Prometheus text with Python's `prometheus_client` (the reference parser):
/// family name → (type, samples as (name, labels, value)).
fn parse(text: &str) -> Families {
    const SCRIPT: &str = "import json, sys\n\
        from prometheus_client.parser import text_string_to_metric_families\n\
        out = {}\n\
        for f in text_string_to_metric_families(sys.stdin.read()):\n\
        \x20   out[f.name] = [f.type, [[s.name, s.labels, s.value] for s in f.samples]]\n\
        json.dump(out, sys.stdout)\n";
    let mut child = Command::new("python3")
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("python3 not found ({e}): install python3 (./test.sh does)"));
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("No module named"),
        "Python's prometheus_client is missing: pip install prometheus-client (./test.sh does)"
    );
    assert!(
        out.status.success(),
        "the parser refused /metrics: {err}\n{text}"
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

type Families = BTreeMap<String, (String, Vec<(String, BTreeMap<String, String>, f64)>)>;

/// The value of sample `name` with `labels` (a subset) in family `family`.
fn sample(m: &Families, family: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (_, samples) = m
        .get(family)
        .unwrap_or_else(|| panic!("no family {family}: {:?}", m.keys()));
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(v))
        })
        .unwrap_or_else(|| panic!("no sample {name}{labels:?} in {samples:?}"))
        .2
}

fn kind(m: &Families, family: &str) -> String {
    m.get(family)
        .unwrap_or_else(|| panic!("no family {family}: {:?}", m.keys()))
        .0
        .clone()
}

fn until(url: &str, code: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (c, body) = get(url);
        if c == code {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{url} never answered {code}: {c} {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn cli(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

/// Checks what every raft store's metrics must show after exactly `writes` client
/// writes, all answered; `durable`: the writer has made a durable commit (it does once
/// a second under writes).
fn check_store_metrics(m: &Families, writes: f64, durable: bool) {
    for (family, t) in [
        ("etcd_disk_wal_fsync_duration_seconds", "histogram"),
        ("etcd_disk_backend_commit_duration_seconds", "histogram"),
        ("datasync_raft_apply_duration_seconds", "histogram"),
        ("datasync_raft_proposal_batch_size", "histogram"),
        ("datasync_raft_proposal_duration_seconds", "histogram"),
        ("datasync_raft_client_writes_committed", "counter"),
        ("etcd_server_proposals_applied_total", "gauge"),
        ("etcd_server_proposals_failed", "counter"),
        ("etcd_server_leader_changes_seen", "counter"),
        ("etcd_server_has_leader", "gauge"),
        ("etcd_server_is_leader", "gauge"),
        ("etcd_server_proposals_pending", "gauge"),
        ("etcd_debugging_mvcc_watcher_total", "gauge"),
        ("etcd_debugging_mvcc_events", "counter"),
        ("etcd_mvcc_db_total_size_in_bytes", "gauge"),
        ("datasync_raft_term", "gauge"),
        ("datasync_raft_writer_up", "gauge"),
    ] {
        assert_eq!(kind(m, family), t, "{family}");
    }
    let wal = "etcd_disk_wal_fsync_duration_seconds";
    assert!(sample(m, wal, &format!("{wal}_count"), &[]) >= 1.0);
    // etcd's buckets, so its dashboards apply: 1 ms doubling to 8.192 s.
    assert_eq!(
        sample(m, wal, &format!("{wal}_bucket"), &[("le", "+Inf")]),
        sample(m, wal, &format!("{wal}_count"), &[])
    );
    sample(m, wal, &format!("{wal}_bucket"), &[("le", "0.001")]);
    sample(m, wal, &format!("{wal}_bucket"), &[("le", "8.192")]);
    let commit = "etcd_disk_backend_commit_duration_seconds";
    if durable {
        assert!(sample(m, commit, &format!("{commit}_count"), &[]) >= 1.0);
    }
    let committed = sample(
        m,
        "datasync_raft_client_writes_committed",
        "datasync_raft_client_writes_committed_total",
        &[],
    );
    assert_eq!(committed, writes, "each write counted once");
    let failed = sample(
        m,
        "etcd_server_proposals_failed",
        "etcd_server_proposals_failed_total",
        &[],
    );
    assert_eq!(failed, 0.0);
    let pending = "etcd_server_proposals_pending";
    assert_eq!(
        sample(m, pending, pending, &[]),
        0.0,
        "every write was answered"
    );
    let batch = "datasync_raft_proposal_batch_size";
    assert_eq!(sample(m, batch, &format!("{batch}_sum"), &[]), writes);
    // One proposal's time per entry proposed, direct or batched.
    let proposal = "datasync_raft_proposal_duration_seconds";
    assert_eq!(
        sample(m, proposal, &format!("{proposal}_count"), &[]),
        sample(m, batch, &format!("{batch}_count"), &[]),
        "each proposal timed once"
    );
    assert!(sample(m, proposal, &format!("{proposal}_sum"), &[]) > 0.0);
    let applied = "etcd_server_proposals_applied_total";
    let last = "datasync_raft_last_log_index";
    assert!(sample(m, applied, applied, &[]) >= 1.0);
    assert!(sample(m, applied, applied, &[]) <= sample(m, last, last, &[]));
    assert_eq!(
        sample(m, "etcd_server_has_leader", "etcd_server_has_leader", &[]),
        1.0
    );
    assert_eq!(
        sample(m, "etcd_server_is_leader", "etcd_server_is_leader", &[]),
        1.0
    );
    assert!(
        sample(
            m,
            "etcd_server_leader_changes_seen",
            "etcd_server_leader_changes_seen_total",
            &[]
        ) >= 1.0
    );
    assert_eq!(
        sample(m, "datasync_raft_writer_up", "datasync_raft_writer_up", &[]),
        1.0
    );
    assert!(
        sample(
            m,
            "etcd_mvcc_db_total_size_in_bytes",
            "etcd_mvcc_db_total_size_in_bytes",
            &[]
        ) > 0.0
    );
}

/// Writes `n` keys under `files/load/`, 32 at a time, through `w`.
async fn load(w: &dyn Writer, n: usize) {
    let mut pending = futures_util::stream::FuturesUnordered::new();
    for i in 0..n {
        let key = Key::new(format!("files/load-{i}")).unwrap();
        pending.push(async move { w.put(&key, format!("v{i}").into(), PutOptions::new()).await });
        if pending.len() >= 32 {
            futures_util::StreamExt::next(&mut pending)
                .await
                .unwrap()
                .unwrap();
        }
    }
    while let Some(r) = futures_util::StreamExt::next(&mut pending).await {
        r.unwrap();
    }
}

/// The agent as a process on the embedded store, loaded through its local endpoint:
/// `/metrics` parses (also mid-load) and shows the store's commit path, raft and
/// watches under etcd's names, the coordinator's resyncs by reason and the plugins;
/// `datasync status` and `datasync resync` work against it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_reads_metrics_status_and_asks_for_a_resync() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let addr = format!("127.0.0.1:{}", free_port().unwrap());
    let base = format!("http://{addr}");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\nkind = \"raft\"\ndir = {:?}\n[http]\nlisten = \"{addr}\"\n\
             [plugins.file-mirror]\ndir = {:?}\n",
            data.display().to_string(),
            dir.path().join("mirror").display().to_string(),
        ),
    )
    .unwrap();
    let agent = Running::agent(BIN, &config);
    until(&format!("{base}/readyz"), 200);

    const WRITES: usize = 2000;
    let remote = datasync_raft::RemoteStore::connect_local(&data)
        .await
        .unwrap();
    let writing = tokio::spawn(async move {
        load(&remote, WRITES).await;
        // The writer commits durably at most once a second: one write a second later
        // makes sure the backend commit histogram has a sample.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        remote
            .put(
                &Key::new("files/late").unwrap(),
                "l".into(),
                PutOptions::new(),
            )
            .await
            .unwrap();
    });
    // Scraped and parsed while the writes run.
    let mut scrapes = 0;
    while !writing.is_finished() {
        let (code, text) = tokio::task::spawn_blocking({
            let url = format!("{base}/metrics");
            move || get(&url)
        })
        .await
        .unwrap();
        assert_eq!(code, 200);
        parse(&text);
        scrapes += 1;
    }
    writing.await.unwrap();
    assert!(scrapes >= 1);

    let metrics_url = format!("{base}/metrics");
    let plugin = [("plugin", "file-mirror")];
    // Every change reached the plugin: one by one, or (a queue that overflowed under
    // the load) through an overflow resync.
    let deadline = Instant::now() + Duration::from_secs(30);
    let m = loop {
        let m = parse(&get(&metrics_url).1);
        let at = sample(
            &m,
            "datasync_plugin_revision",
            "datasync_plugin_revision",
            &plugin,
        );
        let store = sample(
            &m,
            "etcd_debugging_mvcc_current_revision",
            "etcd_debugging_mvcc_current_revision",
            &[],
        );
        if at >= store && store >= WRITES as f64 {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "the plugin is at r{at}, the store at r{store}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    check_store_metrics(&m, WRITES as f64 + 1.0, true);
    let one = |family: &str, name: &str| sample(&m, family, name, &[]);
    assert!(
        one(
            "etcd_debugging_mvcc_watcher_total",
            "etcd_debugging_mvcc_watcher_total"
        ) >= 1.0
    );
    let events = one(
        "etcd_debugging_mvcc_events",
        "etcd_debugging_mvcc_events_total",
    );
    let overflows = one("datasync_watch_overflows", "datasync_watch_overflows_total");
    assert_eq!(kind(&m, "datasync_plugin_changes"), "counter");
    let changes = sample(
        &m,
        "datasync_plugin_changes",
        "datasync_plugin_changes_total",
        &plugin,
    );
    let overflow_passes: f64 = m["datasync_source_resyncs"]
        .1
        .iter()
        .filter(|(_, l, _)| l.get("reason").map(String::as_str) == Some("overflow"))
        .map(|(_, _, v)| *v)
        .sum();
    // Each change was queued for the watch, or its queue overflowed and a resync
    // (counted by reason) replaced what it held.
    assert_eq!(
        overflow_passes > 0.0,
        overflows > 0.0,
        "{overflow_passes} {overflows}"
    );
    assert!(events >= changes && changes >= 1.0, "{events} {changes}");
    assert!(
        overflows > 0.0 || changes >= WRITES as f64,
        "{changes} {overflows}"
    );
    assert_eq!(
        sample(
            &m,
            "datasync_plugin_ready",
            "datasync_plugin_ready",
            &plugin
        ),
        1.0
    );
    let initial = [("source", ""), ("reason", "initial")];
    assert_eq!(
        sample(
            &m,
            "datasync_source_resyncs",
            "datasync_source_resyncs_total",
            &initial
        ),
        1.0
    );

    // `datasync status` against the agent, and against the store it holds.
    let text = ok(cli(&["status", "--agent", &base]));
    assert!(text.contains("store\traft (node 1)"), "{text}");
    assert!(text.contains("leader\t1 (term"), "{text}");
    assert!(text.contains("ready\tyes"), "{text}");
    assert!(text.contains("plugin\tfile-mirror: ready"), "{text}");
    assert!(text.contains("member\t1 voter"), "{text}");
    let json: Json =
        serde_json::from_str(&ok(cli(&["status", "--agent", &base, "--output", "json"]))).unwrap();
    assert!(
        json["store"]["revision"].as_u64().unwrap() >= WRITES as u64,
        "{json}"
    );
    assert!(json["store"]["db_bytes"].as_u64().unwrap() > 0, "{json}");
    let text = ok(cli(&["--store", data.to_str().unwrap(), "status"]));
    assert!(text.contains("store\traft-remote"), "{text}");
    assert!(text.contains("member\t1 voter"), "{text}");

    // `datasync resync`: a pass with reason Requested; an unknown plugin is refused.
    let before: Json = serde_json::from_str(&get(&format!("{base}/status")).1).unwrap();
    let resyncs = before["plugins"][0]["resyncs"].as_u64().unwrap();
    ok(cli(&["resync", "file-mirror", "--agent", &base]));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s: Json = serde_json::from_str(&get(&format!("{base}/status")).1).unwrap();
        if s["sources"][0]["last_resync"] == "requested"
            && s["plugins"][0]["resyncs"].as_u64() == Some(resyncs + 1)
        {
            break;
        }
        assert!(Instant::now() < deadline, "no requested pass: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let m = parse(&get(&metrics_url).1);
    let requested = [("source", ""), ("reason", "requested")];
    assert_eq!(
        sample(
            &m,
            "datasync_source_resyncs",
            "datasync_source_resyncs_total",
            &requested
        ),
        1.0
    );
    let out = cli(&["resync", "no-such-plugin", "--agent", &base]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("404") && err.contains("no-such-plugin"),
        "{err}"
    );
    let out = cli(&["status", "--agent", "http://127.0.0.1:1"]);
    assert_eq!(out.status.code(), Some(1));
    agent.stop();
}

/// `datasync serve --http`: a node's readiness, status and metrics without an agent.
#[test]
fn a_serve_node_serves_its_status_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "a secret for the test node, long enough\n").unwrap();
    let listen = format!("127.0.0.1:{}", free_port().unwrap());
    let http = format!("127.0.0.1:{}", free_port().unwrap());
    let mut cmd = Command::new(BIN);
    cmd.arg("--secret-file").arg(&secret).arg("serve");
    cmd.args(["--id", "1", "--listen", &listen, "--http", &http, "--dir"]);
    cmd.arg(dir.path().join("n1"));
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let node = Running::spawn(cmd);
    let base = format!("http://{http}");
    until(&format!("{base}/readyz"), 200);
    let store = format!("raft://{listen}");
    for i in 0..5 {
        let secret: &Path = &secret;
        ok(Command::new(BIN)
            .args(["--store", &store, "--secret-file"])
            .arg(secret)
            .args(["put", &format!("k{i}"), "v"])
            .output()
            .unwrap());
    }
    let m = parse(&get(&format!("{base}/metrics")).1);
    check_store_metrics(&m, 5.0, false);
    assert!(
        !m.contains_key("datasync_plugin_changes"),
        "no plugins here"
    );
    let s: Json = serde_json::from_str(&get(&format!("{base}/status")).1).unwrap();
    assert_eq!(s["store"]["leader"], 1, "{s}");
    assert_eq!(s["ready"], true, "{s}");
    assert_eq!(get(&format!("{base}/healthz")).0, 200);
    node.stop();
}

/// A plugin asks for its own resync through its context: the coordinator runs a pass
/// with reason Requested.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_asks_for_its_own_resync() {
    use std::sync::{Arc, Mutex};

    use datasync::coordinator::{Plugin, PluginContext, PluginSpec};
    use datasync::{Event, Prefix};
    use datasync_agent::{Agent, AgentConfig};

    struct Asker(PluginContext, Arc<Mutex<Vec<String>>>);
    #[async_trait::async_trait]
    impl Plugin for Asker {
        async fn handle(&self, event: Event) {
            let line = match &event {
                Event::Resync(r) => format!("resync {}", r.reason.as_str()),
                Event::Change(_) => {
                    assert!(self.0.request_resync(), "attached to the coordinator");
                    "change".to_owned()
                }
                _ => "other".into(),
            };
            self.1.lock().unwrap().push(line);
            event.into_done().ok();
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[store]\nkind = \"raft\"\ndir = {:?}\n",
        dir.path().join("data").display().to_string()
    );
    let config = AgentConfig::parse(&text, "agent.toml", std::iter::empty()).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let agent = Agent::start_with(config, {
        let seen = seen.clone();
        move |ctx| {
            assert!(
                !ctx.request_resync(),
                "not attached before the coordinator runs"
            );
            vec![PluginSpec::new(
                "asker",
                vec![Prefix::new("cfg/").unwrap()],
                Arc::new(Asker(ctx.clone(), seen)),
            )]
        }
    })
    .await
    .unwrap();
    agent.ready().await;
    agent
        .store()
        .writer()
        .put(&Key::new("cfg/a").unwrap(), "1".into(), PutOptions::new())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.lock().unwrap().len() < 3 {
        assert!(Instant::now() < deadline, "{:?}", seen.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        seen.lock().unwrap()[..3],
        ["resync initial", "change", "resync requested"]
    );
    let status = agent.status();
    assert_eq!(
        status.sources[0].last_reason,
        Some(datasync::ResyncReason::Requested)
    );
    agent.shutdown().await;
}

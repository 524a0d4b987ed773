//! The agent and the CLI as separate processes, on a real nats-server: a put through
//! the CLI reaches the file-mirror plugin's directory, `/readyz`, `/status` and
//! `/metrics` say so, a route through a missing interface is refused by the netconfig
//! pair, a delete removes the file, SIGTERM shuts the agent down cleanly.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use datasync_integration::{NatsServer, free_port};

mod common;
use common::{Running, agent_log_tail, cli};
// Linked in, so that its registration is part of the in-process agent below.
use datasync_file_mirror as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_datasync");

/// `GET path` on `addr`: status code and body.
async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut conn = tokio::net::TcpStream::connect(addr).await.ok()?;
    conn.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut text = String::new();
    conn.read_to_string(&mut text).await.ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n")?.1.to_owned();
    Some((code, body))
}

async fn eventually<F: Fn() -> bool>(what: &str, f: F) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The agent's `/status`.
async fn fetch_status(addr: &str) -> serde_json::Value {
    serde_json::from_str(&http_get(addr, "/status").await.unwrap().1).unwrap()
}

/// Plugin `name`'s entry in a `/status`.
fn plugin_named<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["plugins"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .unwrap_or_else(|| panic!("no plugin {name} in {status}"))
}

/// Polls `/status` until `holds` for up to 20 s; else fails saying `what`, with the
/// last status and the tail of the agent's log (its config is `config`).
async fn until_status(
    addr: &str,
    config: &Path,
    what: &str,
    holds: impl Fn(&serde_json::Value) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = fetch_status(addr).await;
        if holds(&s) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {s}\n{}",
            agent_log_tail(config, 80)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_put_reaches_the_mirror_and_sigterm_stops_the_agent() {
    let nats = NatsServer::start().await.unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let mirror = dir.path().join("mirror");
    let addr = format!("127.0.0.1:{}", free_port().unwrap());
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\nkind = \"nats\"\nservers = [\"{}\"]\n[http]\nlisten = \"{addr}\"\n\
             [plugins.file-mirror]\ndir = {:?}\n",
            nats.url(),
            mirror.display().to_string()
        ),
    )
    .unwrap();
    // A file the mirror did not write: it stays (file-mirror's own tests cover what
    // it removes).
    std::fs::create_dir_all(&mirror).unwrap();
    std::fs::write(mirror.join("foreign"), "theirs").unwrap();

    let mut agent = Running::agent(BIN, &config);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some((200, body)) = http_get(&addr, "/readyz").await {
            assert_eq!(body, "ready\n");
            break;
        }
        assert!(agent.0.exited().is_none(), "the agent exited");
        assert!(Instant::now() < deadline, "/readyz never said ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(http_get(&addr, "/healthz").await.unwrap().0, 200);
    assert_eq!(
        std::fs::read_to_string(mirror.join("foreign")).unwrap(),
        "theirs",
        "the resync leaves files it did not write"
    );

    let store = nats.url();
    let put = cli(&store, &["put", "files/etc/motd", "hello"]);
    assert!(put.status.success(), "{put:?}");
    let rev: u64 = String::from_utf8(put.stdout)
        .unwrap()
        .trim()
        .trim_start_matches('r')
        .parse()
        .unwrap();
    let motd = mirror.join("etc/motd");
    eventually("the file appears", || {
        std::fs::read_to_string(&motd).is_ok_and(|t| t == "hello")
    })
    .await;

    // The status is recorded once the plugin has answered, just after the file appears.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let (code, body) = http_get(&addr, "/status").await.unwrap();
        assert_eq!(code, 200);
        let status: serde_json::Value = serde_json::from_str(&body).unwrap();
        if status["plugins"][0]["changes"] == 1 {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the change never showed in /status: {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let plugin = &status["plugins"][0];
    assert_eq!(status["ready"], true);
    assert_eq!(plugin["name"], "file-mirror");
    assert_eq!(plugin["state"], "ready");
    assert_eq!(plugin["changes"], 1);
    assert_eq!(plugin["revision"], rev);
    let (_, metrics) = http_get(&addr, "/metrics").await.unwrap();
    // The NATS client's connections: the first, no reconnect.
    assert!(
        metrics.contains("datasync_nats_connects_total 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("datasync_plugin_changes_total{plugin=\"file-mirror\"} 1")
            && metrics.contains("datasync_plugin_resyncs_total{plugin=\"file-mirror\"} 1")
            && metrics.contains("datasync_plugin_answer_seconds_total{plugin=\"file-mirror\"}"),
        "{metrics}"
    );
    assert!(plugin["answer_seconds"].as_f64().unwrap() > 0.0);

    // A key the plugin cannot mirror is refused through Done, and shows in /status.
    // The plugin is then resynced (a pass after its retry backoff): the test waits for
    // that pass, so later writes reach the plugins as changes, not inside that resync.
    let bad = cli(&store, &["put", "files/a//b", "x"]);
    assert!(bad.status.success());
    until_status(&addr, &config, "the refusal never showed in /status", |s| {
        let mirror = plugin_named(s, "file-mirror");
        mirror["failures"] == 1
            && mirror["state"] == "ready"
            && mirror["last_error"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("empty path segment"))
    })
    .await;

    // The netconfig pair is linked in too: a route through a missing interface is
    // refused through Done, and says so in /status; one through a known one is not.
    assert!(
        cli(&store, &["put", "net/if/eth0", r#"{"mtu":1500}"#, "--json"])
            .status
            .success()
    );
    assert!(
        cli(&store, &["put", "net/rt/ok", r#"{"via":"eth0"}"#, "--json"])
            .status
            .success()
    );
    assert!(
        cli(
            &store,
            &["put", "net/rt/bad", r#"{"via":"eth9"}"#, "--json"]
        )
        .status
        .success()
    );
    until_status(
        &addr,
        &config,
        "the route's refusal never showed in /status",
        |s| {
            let (ifaces, routes) = (plugin_named(s, "interfaces"), plugin_named(s, "routes"));
            ifaces["changes"] == 1
            && ifaces["failures"] == 0
            && routes["changes"] == 2
            && routes["failures"] == 1
            // Resynced after the refusal: a value written before that pass would come
            // inside it, not as the change the next steps expect.
            && routes["state"] == "ready"
            && routes["last_error"]["error"]
                .as_str()
                .is_some_and(|e| e.contains(r#"net/rt/bad: interface "eth9" does not exist"#))
        },
    )
    .await;

    // Values are protobuf messages; the CLI converts JSON through the model registry.
    let got = cli(&store, &["get", "net/if/eth0", "--json"]);
    assert_eq!(
        String::from_utf8_lossy(&got.stdout).trim(),
        r#"{"mtu":1500}"#
    );
    let raw = cli(&store, &["--output", "raw", "get", "net/if/eth0"]);
    assert_eq!(
        raw.stdout,
        [0x08, 0xdc, 0x0b],
        "the message's bytes: field 1, 1500"
    );
    for (args, says) in [
        (
            &["put", "net/if/x", r#"{"mtu":1,"speed":2}"#, "--json"][..],
            "unknown field",
        ),
        (
            &["put", "net/if/x", r#"{"mtu":"big"}"#, "--json"][..],
            "invalid type",
        ),
        (&["put", "net/if/x", "not json", "--json"][..], "not JSON"),
        (&["put", "net/if/x", "{}", "--json"][..], "missing field"),
        (
            &["put", "files/x", "{}", "--json"][..],
            "no model is registered",
        ),
    ] {
        let out = cli(&store, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(says),
            "{out:?}"
        );
    }
    let resyncs_before = plugin_named(&fetch_status(&addr).await, "interfaces")["resyncs"]
        .as_u64()
        .unwrap();
    // A value that is no message is an error for that value only: the change fails
    // through Done, the resync that follows skips it, the others apply.
    assert!(
        cli(&store, &["put", "net/if/junk", "not a message"])
            .status
            .success()
    );
    assert!(
        cli(&store, &["put", "net/if/eth1", r#"{"mtu":9000}"#, "--json"])
            .status
            .success()
    );
    until_status(&addr, &config, "the bad value held up the plugin", |s| {
        let ifaces = plugin_named(s, "interfaces");
        ifaces["state"] == "ready"
            && ifaces["failures"] == 1
            && ifaces["resyncs"].as_u64() > Some(resyncs_before)
            && ifaces["last_error"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("net/if/junk"))
    })
    .await;
    let junk = cli(&store, &["get", "net/if/junk", "--json"]);
    assert_eq!(junk.status.code(), Some(5), "{junk:?}");
    // eth1 was applied: a route through it is installed, not refused.
    assert!(
        cli(
            &store,
            &["put", "net/rt/via1", r#"{"via":"eth1"}"#, "--json"]
        )
        .status
        .success()
    );
    until_status(&addr, &config, "the route through eth1 was refused", |s| {
        let routes = plugin_named(s, "routes");
        routes["state"] == "ready" && routes["changes"] == 3 && routes["failures"] == 1
    })
    .await;

    let del = cli(&store, &["del", "files/etc/motd"]);
    assert!(del.status.success(), "{del:?}");
    eventually("the file is removed", || !motd.exists()).await;

    // SIGTERM: a clean, prompt exit.
    agent.stop();
    assert!(
        http_get(&addr, "/healthz").await.is_none(),
        "the endpoint is closed"
    );
}

#[test]
fn a_bad_config_names_the_file_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "[store]\nkind = \"raft\"\ndirectory = \"x\"\n").unwrap();
    let out = Command::new(BIN)
        .args(["agent", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains(&config.display().to_string()) && err.contains("directory"),
        "{err}"
    );
}

#[test]
fn cli_exit_codes_a_script_can_rely_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("raft:{}", dir.path().join("data").display());
    let code = |args: &[&str]| cli(&store, args).status.code();
    assert_eq!(code(&["put", "k", "v"]), Some(0));
    assert_eq!(code(&["get", "k"]), Some(0));
    assert_eq!(code(&["get", "missing"]), Some(3));
    assert_eq!(code(&["cas", "k", "w", "--expect", "999"]), Some(4));
    assert_eq!(code(&["cas", "k", "w", "--expect", "1"]), Some(0));
    assert_eq!(code(&["cas", "new", "n", "--absent"]), Some(0));
    assert_eq!(code(&["get", ""]), Some(2), "an empty key is bad usage");
    assert_eq!(
        code(&["put", "a\u{9b}b", "v"]),
        Some(2),
        "a C1 control in a key"
    );
    assert_eq!(
        code(&["put", "a\u{202e}b", "v"]),
        Some(2),
        "a bidi override in a key"
    );
    assert_eq!(code(&["put", "k"]), Some(2), "bad usage");
    let out = cli(&store, &["--output", "json", "ls", ""]);
    let listing: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listing["values"].as_array().unwrap().len(), 2);
    assert!(Path::new(&dir.path().join("data")).exists());
}

/// `--store` with a scheme the CLI does not know is bad usage, never a directory
/// named after the URL; the forms it knows take several endpoints.
#[test]
fn unknown_store_schemes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for store in [
        "nast://h:4222",
        "https://h:2379",
        "etcd://",
        "nats://h:4222?buket=x",
        "etcd://h",
        "nats://h:4222/path",
    ] {
        let out = Command::new(BIN)
            .current_dir(dir.path())
            .args(["--store", store, "put", "k", "v"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{store}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("store") || err.contains("endpoint"),
            "{store}: {err}"
        );
    }
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "nothing is created: {left:?}");
}

/// Text output cannot drive the terminal or forge lines; JSON output is exact.
#[test]
fn text_output_escapes_what_a_value_holds() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("raft:{}", dir.path().join("data").display());
    let hostile = "\u{1b}]0;owned\u{7}x\nforged\tline\u{9b}2J\u{202e}";
    assert!(cli(&store, &["put", "k", hostile]).status.success());
    let get = String::from_utf8(cli(&store, &["get", "k"]).stdout).unwrap();
    assert_eq!(
        get, "\\u{1b}]0;owned\\u{7}x\nforged\tline\\u{9b}2J\\u{202e}\n",
        "one value: only what drives a terminal is escaped"
    );
    let ls = String::from_utf8(cli(&store, &["ls", ""]).stdout).unwrap();
    assert_eq!(
        ls, "k\t\\u{1b}]0;owned\\u{7}x\\nforged\\tline\\u{9b}2J\\u{202e}\n",
        "one line per key"
    );
    let json = cli(&store, &["--output", "json", "get", "k"]).stdout;
    let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(v["value"], hostile);
}

/// In process, on the zero-setup default (the embedded raft store): a run-time plugin
/// gets its settings and its events, the endpoint reports it, shutdown closes the
/// plugin and releases the store, which reopens with the same state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_agent_runs_on_the_embedded_store_and_shuts_down_cleanly() {
    use std::sync::{Arc, Mutex};

    use datasync::coordinator::{Plugin, PluginSpec};
    use datasync::{Event, Key, Prefix, PutOptions, ReadOptions};
    use datasync_agent::{Agent, AgentConfig};

    #[derive(Default)]
    struct Seen {
        events: Mutex<Vec<String>>,
    }
    struct Recorder(Arc<Seen>, String);
    #[async_trait::async_trait]
    impl Plugin for Recorder {
        async fn handle(&self, event: Event) {
            let line = match &event {
                Event::Resync(r) => format!("resync:{}:{}", r.len(), self.1),
                Event::Change(c) => format!("change:{}", c.changes[0].key),
                _ => "other".into(),
            };
            self.0.events.lock().unwrap().push(line);
            event.into_done().ok();
        }
        async fn close(&self) {
            self.0.events.lock().unwrap().push("close".into());
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port().unwrap());
    let text = format!(
        "[store]\nkind = \"raft\"\ndir = {:?}\n[http]\nlisten = \"{addr}\"\n\
         [plugins.recorder]\ngreeting = \"hi\"\n[plugins.file-mirror]\ndir = {:?}\n",
        dir.path().join("data").display().to_string(),
        dir.path().join("mirror").display().to_string(),
    );
    let seen = Arc::new(Seen::default());
    // The writer the plugins get (measured for /metrics).
    let plugin_writer: Arc<Mutex<Option<Arc<dyn datasync::Writer>>>> = Arc::default();
    let slot = plugin_writer.clone();
    let start = |seen: Arc<Seen>| {
        let config = AgentConfig::parse(&text, "agent.toml", std::iter::empty()).unwrap();
        let slot = slot.clone();
        Agent::start_with(config, move |ctx| {
            *slot.lock().unwrap() = Some(ctx.writer.clone());
            let greeting = ctx.settings_for("recorder")["greeting"]
                .as_str()
                .unwrap_or("?")
                .to_owned();
            vec![PluginSpec::new(
                "recorder",
                vec![Prefix::new("cfg/").unwrap()],
                Arc::new(Recorder(seen, greeting)),
            )]
        })
    };
    let agent = start(seen.clone()).await.unwrap();
    agent.ready().await;
    let names: Vec<_> = agent
        .status()
        .plugins
        .iter()
        .map(|p| p.name.clone())
        .collect();
    assert_eq!(
        names,
        ["file-mirror", "recorder"],
        "linked and run-time plugins, by name"
    );
    let writer = agent.store().writer();
    writer
        .put(&Key::new("cfg/a").unwrap(), "1".into(), PutOptions::new())
        .await
        .unwrap();
    eventually("the change arrives", || {
        seen.events.lock().unwrap().len() == 2
    })
    .await;
    // A plugin's requests show in /metrics, by operation and result.
    let pw = plugin_writer.lock().unwrap().clone().unwrap();
    pw.put(&Key::new("other/b").unwrap(), "2".into(), PutOptions::new())
        .await
        .unwrap();
    let huge = PutOptions::new().ttl(std::time::Duration::MAX);
    assert!(
        pw.put(&Key::new("other/c").unwrap(), "3".into(), huge)
            .await
            .is_err()
    );
    let (_, metrics) = http_get(&agent.http_addr().unwrap().to_string(), "/metrics")
        .await
        .unwrap();
    for line in [
        "datasync_store_requests_total{op=\"put\",result=\"ok\"} 1\n",
        "datasync_store_requests_total{op=\"put\",result=\"invalid_ttl\"} 1\n",
        "datasync_store_request_duration_seconds_count{op=\"put\"} 2\n",
    ] {
        assert!(metrics.contains(line), "no {line:?} in\n{metrics}");
    }
    drop(pw);
    *plugin_writer.lock().unwrap() = None;
    assert_eq!(
        http_get(&agent.http_addr().unwrap().to_string(), "/readyz")
            .await
            .unwrap()
            .0,
        200
    );
    // Every store handle must go for the embedded store's files to close.
    drop(writer);
    agent.shutdown().await;
    assert_eq!(
        *seen.events.lock().unwrap(),
        ["resync:0:hi", "change:cfg/a", "close"]
    );

    // The store was released: a new agent opens it and resyncs what was written.
    let again = Arc::new(Seen::default());
    let agent = start(again.clone()).await.unwrap();
    agent.ready().await;
    assert_eq!(again.events.lock().unwrap()[0], "resync:1:hi");
    let got = agent
        .store()
        .writer()
        .get(&Key::new("cfg/a").unwrap(), ReadOptions::new())
        .await
        .unwrap();
    assert_eq!(got.unwrap().value, "1".into());
    agent.shutdown().await;
}

/// The store stops under a running agent: readiness and liveness fail with the reason,
/// and the agent's run ends with an error (the binary exits 1), not idle and ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_stops_under_the_agent_fails_readiness_and_the_run() {
    use datasync_agent::{Agent, AgentConfig, AgentError};

    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port().unwrap());
    let text = format!(
        "[store]\nkind = \"raft\"\ndir = {:?}\n[http]\nlisten = \"{addr}\"\n\
         [plugins.file-mirror]\ndir = {:?}\n",
        dir.path().join("data").display().to_string(),
        dir.path().join("mirror").display().to_string(),
    );
    let config = AgentConfig::parse(&text, "agent.toml", std::iter::empty()).unwrap();
    let agent = Agent::start(config).await.unwrap();
    agent.ready().await;
    assert_eq!(http_get(&addr, "/readyz").await.unwrap().0, 200);
    let status: serde_json::Value =
        serde_json::from_str(&http_get(&addr, "/status").await.unwrap().1).unwrap();
    assert_eq!(status["sources"][0]["passes"], 1, "{status}");

    // The store goes away under the agent (as a fatal raft error would take it).
    agent.store().shutdown().await;
    let why = tokio::time::timeout(Duration::from_secs(10), agent.stopped())
        .await
        .expect("the coordinator notices");
    assert!(why.contains("stopped"), "{why}");
    let (code, body) = http_get(&addr, "/readyz").await.unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("store stopped: the store was shut down"),
        "{body}"
    );
    let (code, body) = http_get(&addr, "/healthz").await.unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("store stopped"), "{body}");
    let (_, metrics) = http_get(&addr, "/metrics").await.unwrap();
    assert!(metrics.contains("datasync_coordinator_up 0"), "{metrics}");
    let run = tokio::time::timeout(Duration::from_secs(10), agent.run_until_signal())
        .await
        .expect("the run ends without a signal");
    assert!(matches!(run, Err(AgentError::Stopped(_))), "{run:?}");
}

/// Waits until `GET path` answers `code`, for up to 30 s; returns the body.
async fn until_http(addr: &str, path: &str, code: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((c, body)) = http_get(addr, path).await
            && c == code
        {
            return body;
        }
        assert!(Instant::now() < deadline, "{path} never answered {code}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The agent as a process on NATS: with the server unreachable at start it exits 1
/// saying why; with the server gone under it `/readyz` says so (503) and it does not
/// exit; with the server back it resyncs and is ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_through_a_store_outage() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().unwrap();
    let addr = format!("127.0.0.1:{}", free_port().unwrap());
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\nkind = \"nats\"\nservers = [\"nats://127.0.0.1:{port}\"]\n\
             [http]\nlisten = \"{addr}\"\n[plugins.file-mirror]\ndir = {:?}\n",
            dir.path().join("mirror").display().to_string()
        ),
    )
    .unwrap();
    let agent = || {
        let mut c = Command::new(BIN);
        c.args(["agent", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    };

    // Unreachable at start: a clear error and exit code 1.
    let out = agent().spawn().unwrap().wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot connect to the store"), "{err}");

    // Up, then an outage, then back on the same port and data.
    let mut nats = NatsServer::start_on(Some(port), &[])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let running = Running::spawn(agent());
    until_http(&addr, "/readyz", 200).await;
    nats.kill();
    let body = until_http(&addr, "/readyz", 503).await;
    assert!(body.contains("interrupted"), "{body}");
    assert_eq!(
        http_get(&addr, "/healthz").await.unwrap().0,
        200,
        "alive, waiting"
    );
    nats.start_again().await.unwrap_or_else(|e| panic!("{e}"));
    until_http(&addr, "/readyz", 200).await;
    let put = cli(nats.url(), &["put", "files/back", "again"]);
    assert!(put.status.success(), "{put:?}");
    eventually("the mirror follows again", || {
        std::fs::read_to_string(dir.path().join("mirror/back")).is_ok_and(|t| t == "again")
    })
    .await;
    // The outage shows as a reconnect of the NATS client.
    let (_, metrics) = http_get(&addr, "/metrics").await.unwrap();
    let connects = metrics
        .lines()
        .find_map(|l| l.strip_prefix("datasync_nats_connects_total "))
        .and_then(|n| n.parse::<u64>().ok());
    assert!(connects.is_some_and(|n| n >= 2), "{connects:?}\n{metrics}");
    running.stop();
}

//! Secure connections from the CLI's store URLs and the agent's config, against real
//! servers the tests start: an etcd serving TLS that asks every client for a
//! certificate, with auth enabled through `etcdctl`; nats-servers with TLS, client
//! verification and a user and password, with a token, and with an NKey. The right
//! credentials work (the agent mirrors a CLI write); wrong ones fail at once with an
//! error that says so.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Running, cli, ok};
use datasync_integration::NatsServer;
use datasync_integration::nats::ClientAuth;
use datasync_integration::testkit::certificates;

const BIN: &str = env!("CARGO_BIN_EXE_datasync");

/// The stderr of a command that must have failed with exit code 1.
fn failed(out: Output) -> String {
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected a failure: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr).unwrap()
}

/// `datasync` run with a deadline: a connection that retried wrong credentials
/// forever would hang here.
fn cli_within(store: &str, args: &[&str]) -> Output {
    let started = Instant::now();
    let out = cli(store, args);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{args:?} on {store} took {:?}",
        started.elapsed()
    );
    out
}

/// An agent on `config` with `env` set, mirroring into `mirror`; asserts that a CLI
/// write through `store` reaches the mirror, and that its `/metrics` has `metric`.
async fn agent_mirrors(config: &str, env: &[(&str, &str)], store: &str, dir: &Path, metric: &str) {
    let mirror = dir.join("mirror");
    let file = dir.join("agent.toml");
    let http = format!("127.0.0.1:{}", datasync_integration::free_port().unwrap());
    std::fs::write(
        &file,
        format!(
            "{config}\n[http]\nlisten = \"{http}\"\n[plugins.file-mirror]\ndir = {:?}\n",
            mirror.display().to_string()
        ),
    )
    .unwrap();
    let mut c = Command::new(BIN);
    c.args(["agent", "--config"])
        .arg(&file)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut agent = Running::spawn(c);
    ok(cli_within(store, &["put", "files/secure", "mirrored"]));
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_to_string(mirror.join("secure"))
        .ok()
        .as_deref()
        != Some("mirrored")
    {
        assert!(agent.0.exited().is_none(), "the agent exited");
        assert!(
            Instant::now() < deadline,
            "the write never reached the mirror"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, metrics) = common::get(&format!("http://{http}/metrics"));
    assert_eq!(code, 200);
    assert!(metrics.contains(metric), "no {metric:?} in\n{metrics}");
    agent.stop();
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_mutual_tls_with_auth() {
    use datasync_integration::EtcdServer;
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let f = |n: &str| path(&dir.path().join(n));
    let etcd = EtcdServer::start_mutual_tls(
        &dir.path().join("server.crt"),
        &dir.path().join("server.key"),
        &dir.path().join("ca.crt"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // Users, a role and auth, set up with etcd's own client, as an operator would.
    let etcdctl = |args: &[&str]| {
        let out = Command::new("etcdctl")
            .args(["--endpoints", etcd.endpoint(), "--dial-timeout", "2s"])
            .args(["--cacert", &f("ca.crt"), "--cert", &f("client.crt")])
            .args(["--key", &f("client.key")])
            .args(args)
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run etcdctl ({e}): install it with `apt-get install etcd-client`")
            });
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !etcdctl(&["endpoint", "health"]).0 {
        assert!(Instant::now() < deadline, "etcd never became healthy");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for args in [
        &["user", "add", "root:rootpw", "--interactive=false"][..],
        &["user", "add", "limited:limitedpw", "--interactive=false"],
        &["role", "add", "sec"],
        &[
            "role",
            "grant-permission",
            "sec",
            "--prefix=true",
            "readwrite",
            "sec/",
        ],
        &["user", "grant-role", "limited", "sec"],
        &["auth", "enable"],
    ] {
        let (done, err) = etcdctl(args);
        assert!(done, "etcdctl {args:?}: {err}");
    }
    std::fs::write(dir.path().join("pw"), "rootpw\n").unwrap();

    let host = etcd.endpoint().trim_start_matches("https://").to_owned();
    let tls = format!(
        "ca={}&cert={}&key={}",
        f("ca.crt"),
        f("client.crt"),
        f("client.key")
    );
    let root = format!("etcd://root@{host}?{tls}&password_file={}", f("pw"));
    ok(cli_within(&root, &["put", "sec/a", "v1"]));
    assert_eq!(ok(cli_within(&root, &["get", "sec/a"])), "v1\n");

    // A wrong password, a user without the permission, no client certificate, a
    // server this client does not trust: each fails at once, saying why.
    let wrong = format!("etcd://root:nope@{host}?{tls}");
    let err = failed(cli_within(&wrong, &["get", "sec/a"]));
    assert!(err.contains("not authenticated"), "{err}");
    assert!(err.contains("authentication failed"), "{err}");
    let limited = format!("etcd://limited:limitedpw@{host}?{tls}");
    ok(cli_within(&limited, &["put", "sec/b", "v2"]));
    let err = failed(cli_within(&limited, &["put", "other/b", "v2"]));
    assert!(err.contains("permission denied"), "{err}");
    // Under TLS 1.3 the server refuses a missing client certificate after the client
    // has finished its handshake: the client sees the alert, or (a race) only the
    // connection closing under its first request.
    let no_cert = format!("etcd://root:rootpw@{host}?ca={}", f("ca.crt"));
    let err = failed(cli_within(&no_cert, &["get", "sec/a"]));
    assert!(
        err.contains("not authenticated: ") && err.contains("BadCertificate")
            || err.contains("store unavailable: ")
                && (err.contains("broken pipe") || err.contains("connection closed")),
        "{err}"
    );
    let other_ca = tempfile::tempdir().unwrap();
    certificates(other_ca.path());
    let untrusted = format!(
        "etcd://root:rootpw@{host}?ca={}&cert={}&key={}",
        path(&other_ca.path().join("ca.crt")),
        f("client.crt"),
        f("client.key")
    );
    let err = failed(cli_within(&untrusted, &["get", "sec/a"]));
    assert!(err.contains("not authenticated"), "{err}");
    assert!(err.contains("invalid peer certificate"), "{err}");

    // The agent, from its config file and a password in its environment.
    let config = format!(
        "[store]\nkind = \"etcd\"\nendpoints = [\"{}\"]\n[store.tls]\nca_file = {:?}\n\
         cert_file = {:?}\nkey_file = {:?}\n[store.auth]\nuser = \"root\"\n",
        etcd.endpoint(),
        f("ca.crt"),
        f("client.crt"),
        f("client.key")
    );
    agent_mirrors(
        &config,
        &[("DATASYNC__STORE__AUTH__PASSWORD", "rootpw")],
        &root,
        dir.path(),
        "datasync_etcd_watch_streams_opened_total 1\n",
    )
    .await;
    // The same agent with a wrong password stops at once, saying why.
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, &config).unwrap();
    let out = Command::new(BIN)
        .args(["agent", "--config"])
        .arg(&file)
        .env("DATASYNC__STORE__AUTH__PASSWORD", "nope")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not authenticated"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_over_mutual_tls_with_a_password() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let f = |n: &str| path(&dir.path().join(n));
    let file = |n: &str| dir.path().join(n);
    let (cert, key, ca) = (f("server.crt"), f("server.key"), f("ca.crt"));
    let nats = NatsServer::start_secured(
        &[
            "--tls",
            "--tlscert",
            &cert,
            "--tlskey",
            &key,
            "--tlscacert",
            &ca,
            "--tlsverify",
            "--user",
            "agent",
            "--pass",
            "s3cret",
        ],
        ClientAuth {
            roots: Some(file("ca.crt")),
            cert: Some((file("client.crt"), file("client.key"))),
            user: Some(("agent".into(), "s3cret".into())),
            ..ClientAuth::default()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let host = nats.url().trim_start_matches("nats://").to_owned();
    let tls = format!(
        "ca={}&cert={}&key={}",
        f("ca.crt"),
        f("client.crt"),
        f("client.key")
    );
    std::fs::write(file("pw"), "s3cret\n").unwrap();
    let good = format!("tls://{host}?{tls}&user=agent&password_file={}", f("pw"));
    ok(cli_within(&good, &["put", "sec/a", "v1"]));
    assert_eq!(ok(cli_within(&good, &["get", "sec/a"])), "v1\n");

    let wrong = format!("tls://agent:nope@{host}?{tls}");
    let err = failed(cli_within(&wrong, &["get", "sec/a"]));
    assert!(err.contains("not authenticated"), "{err}");
    let no_cert = format!("tls://agent:s3cret@{host}?ca={}", f("ca.crt"));
    let err = failed(cli_within(&no_cert, &["get", "sec/a"]));
    assert!(err.contains("not authenticated"), "{err}");
    assert!(err.contains("Certificate"), "{err}");
    let missing = format!("tls://agent:s3cret@{host}?ca={}", f("missing-ca.pem"));
    let err = failed(cli_within(&missing, &["get", "sec/a"]));
    assert!(err.contains("missing-ca.pem"), "{err}");
    assert!(!err.contains("s3cret"), "{err}");
    // A CA file that holds no certificate (here: a key) is named too.
    let not_ca = format!("tls://agent:s3cret@{host}?ca={}", f("client.key"));
    let err = failed(cli_within(&not_ca, &["get", "sec/a"]));
    assert!(
        err.contains("client.key") && err.contains("no PEM CERTIFICATE"),
        "{err}"
    );
    let plain = format!("nats://agent:s3cret@{host}");
    let err = failed(cli_within(&plain, &["get", "sec/a"]));
    assert!(err.contains("not authenticated"), "{err}");
    assert!(err.contains("invalid peer certificate"), "{err}");

    let config = format!(
        "[store]\nkind = \"nats\"\nservers = [\"{}\"]\n[store.tls]\nca_file = {:?}\n\
         cert_file = {:?}\nkey_file = {:?}\n[store.auth]\nuser = \"agent\"\n",
        nats.url(),
        f("ca.crt"),
        f("client.crt"),
        f("client.key")
    );
    let pw = f("pw");
    agent_mirrors(
        &config,
        &[("DATASYNC__STORE__AUTH__PASSWORD_FILE", pw.as_str())],
        &good,
        dir.path(),
        "datasync_nats_connects_total 1\n",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_with_a_token_or_an_nkey() {
    let dir = tempfile::tempdir().unwrap();
    let token = NatsServer::start_secured(
        &["--auth", "t0ken-of-sufficient-length"],
        ClientAuth {
            token: Some("t0ken-of-sufficient-length".into()),
            ..ClientAuth::default()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "t0ken-of-sufficient-length\n").unwrap();
    let store = format!("{}?token_file={}", token.url(), path(&token_file));
    ok(cli_within(&store, &["put", "sec/t", "1"]));
    let inline = token
        .url()
        .replace("nats://", "nats://t0ken-of-sufficient-length@");
    assert_eq!(ok(cli_within(&inline, &["get", "sec/t"])), "1\n");
    let wrong = token.url().replace("nats://", "nats://other-token@");
    let err = failed(cli_within(&wrong, &["get", "sec/t"]));
    assert!(err.contains("not authenticated"), "{err}");

    // An NKey user, from a server config file (nats-server has no flag for it).
    let user = nkeys::KeyPair::new_user();
    let conf: PathBuf = dir.path().join("nkey.conf");
    std::fs::write(
        &conf,
        format!(
            "authorization {{ users = [ {{ nkey: \"{}\" }} ] }}\n",
            user.public_key()
        ),
    )
    .unwrap();
    let seed = user.seed().unwrap();
    let nkey = NatsServer::start_secured(
        &["-c", &path(&conf)],
        ClientAuth {
            nkey: Some(seed.clone()),
            ..ClientAuth::default()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let seed_file = dir.path().join("user.nk");
    std::fs::write(&seed_file, format!("{seed}\n")).unwrap();
    let store = format!("{}?nkey={}", nkey.url(), path(&seed_file));
    ok(cli_within(&store, &["put", "sec/n", "1"]));
    assert_eq!(ok(cli_within(&store, &["get", "sec/n"])), "1\n");
    let stranger = dir.path().join("stranger.nk");
    std::fs::write(&stranger, nkeys::KeyPair::new_user().seed().unwrap()).unwrap();
    let err = failed(cli_within(
        &format!("{}?nkey={}", nkey.url(), path(&stranger)),
        &["get", "sec/n"],
    ));
    assert!(err.contains("not authenticated"), "{err}");
    let err = failed(cli_within(
        &format!(
            "{}?nkey={}",
            nkey.url(),
            path(&dir.path().join("missing.nk"))
        ),
        &["get", "sec/n"],
    ));
    assert!(err.contains("missing.nk"), "{err}");
}

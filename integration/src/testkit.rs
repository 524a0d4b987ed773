//! Helpers shared by the transport tests (they panic: a failed helper is a failed test).

use std::path::Path;
use std::process::Command;

use datasync::testing::next_event;
use datasync::{Event, Key, Mirror, Prefix, ReadOptions, Watch, Writer};

/// A key; panics if invalid.
pub fn key(s: &str) -> Key {
    Key::new(s).unwrap_or_else(|e| panic!("bad test key {s:?}: {e}"))
}

/// A prefix; panics if invalid.
pub fn prefix(s: &str) -> Prefix {
    Prefix::new(s).unwrap_or_else(|e| panic!("bad test prefix {s:?}: {e}"))
}

/// The next event (transient errors skipped); panics on end, error or timeout.
pub async fn next(w: &mut Watch) -> Event {
    next_event(w).await.unwrap_or_else(|f| panic!("{f}"))
}

/// Panics unless the mirror's values under `p` equal the store's.
pub async fn assert_same<S: Writer>(store: &S, mirror: &Mirror, p: &str) {
    let listing = store
        .list(&prefix(p), ReadOptions::new())
        .await
        .unwrap_or_else(|e| panic!("list {p}: {e}"));
    let want: Vec<_> = listing
        .values
        .iter()
        .map(|kv| (kv.key.clone(), kv.value.clone()))
        .collect();
    let got: Vec<_> = mirror
        .values("")
        .filter(|(k, _, _)| k.as_str().starts_with(p))
        .map(|(k, v, _)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(got, want, "consumer state differs from the store under {p}");
}

/// Puts `tls/k` = `secret` through `store`, sees it as the first change of a watch of
/// `tls/` at the put's revision, and reads it back: a client that got through works.
pub async fn put_watch_get<S: Writer + datasync::Watcher>(store: &S) {
    let k = key("tls/k");
    let r = store
        .put(&k, "secret".into(), datasync::PutOptions::new())
        .await
        .expect("a put");
    let mut w = store
        .watch("tls", &[prefix("tls/")], datasync::WatchOptions::default())
        .await
        .expect("a watch");
    let ev = next_event(&mut w).await.expect("the watch's first event");
    assert_eq!(ev.revision(), r);
    ev.into_done().ok();
    let got = store
        .get(&k, ReadOptions::new())
        .await
        .expect("a read")
        .expect("the key");
    assert_eq!(got.value.as_bytes(), b"secret");
}

/// Runs `openssl` with `args` in `dir`; fails clearly if it is not installed.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `openssl` ({e}): install it with `apt-get install openssl`")
        });
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes, in `dir`, a test CA (`ca.crt`, `ca.key`), a server certificate it signed
/// for 127.0.0.1 (`server.crt`, `server.key`) and a client certificate it signed
/// (`client.crt`, `client.key`, CN `datasync-client`), with the `openssl` CLI.
pub fn certificates(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec![
        "req",
        "-x509",
        "-days",
        "2",
        "-subj",
        "/CN=datasync test CA",
    ];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(dir, &ca);
    sign(
        dir,
        "server",
        "/CN=127.0.0.1",
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    );
    sign(
        dir,
        "client",
        "/CN=datasync-client",
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n\
         extendedKeyUsage=clientAuth\n",
    );
}

/// A key and a certificate for `subject` with extensions `ext`, signed by the test CA
/// in `dir`: `NAME.key`, `NAME.crt`.
fn sign(dir: &Path, name: &str, subject: &str, ext: &str) {
    let (key, csr, crt, extfile) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.crt"),
        format!("{name}.ext"),
    );
    let mut req = vec!["req", "-subj", subject];
    req.extend([
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ]);
    req.extend(["-keyout", &key, "-out", &csr]);
    openssl(dir, &req);
    std::fs::write(dir.join(&extfile), ext)
        .unwrap_or_else(|e| panic!("write {}: {e}", dir.display()));
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &crt,
            "-extfile",
            &extfile,
        ],
    );
}

//! The CLI (the real binary) with values of any bytes: written from a file or standard
//! input, read back exactly (`--output raw`, and JSON with base64 for non-UTF-8),
//! listings of keys only and limited, and the exit codes in `--help`.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use base64::Engine;

const BIN: &str = env!("CARGO_BIN_EXE_datasync");

fn cli(data: &Path, args: &[&str]) -> Output {
    cli_with(data, args, None)
}

fn cli_with(data: &Path, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(BIN)
        .arg("--store")
        .arg(data)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(bytes) = stdin {
        input.write_all(bytes).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn ok(out: Output) -> Vec<u8> {
    assert!(out.status.success(), "{out:?}");
    out.stdout
}

fn json(out: Output) -> serde_json::Value {
    serde_json::from_slice(&ok(out)).unwrap()
}

#[test]
fn any_bytes_go_in_and_come_out_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Not UTF-8, with NUL, a lone continuation byte and a trailing newline.
    let bytes: Vec<u8> = (0..=255u8).rev().chain([0, 0x80, b'\n']).collect();
    let file = dir.path().join("blob");
    std::fs::write(&file, &bytes).unwrap();

    ok(cli(
        &data,
        &["put", "bin/file", "--file", file.to_str().unwrap()],
    ));
    ok(cli_with(&data, &["put", "bin/stdin", "-"], Some(&bytes)));
    ok(cli_with(&data, &["put", "bin/empty", "-"], Some(b"")));
    for key in ["bin/file", "bin/stdin"] {
        assert_eq!(
            ok(cli(&data, &["--output", "raw", "get", key])),
            bytes,
            "{key}"
        );
        let v = json(cli(&data, &["--output", "json", "get", key]));
        assert!(v.get("value").is_none(), "not UTF-8: no string value: {v}");
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(v["value_base64"].as_str().unwrap())
            .unwrap();
        assert_eq!(decoded, bytes, "{key}");
    }
    assert_eq!(
        ok(cli(&data, &["--output", "raw", "get", "bin/empty"])),
        b""
    );
    // A UTF-8 value stays a string in JSON; `-` is standard input, not the value "-".
    ok(cli_with(&data, &["put", "dash", "-"], Some(b"from stdin")));
    assert_eq!(
        ok(cli(&data, &["--output", "raw", "get", "dash"])),
        b"from stdin"
    );
    ok(cli(&data, &["put", "txt", "héllo"]));
    assert_eq!(
        json(cli(&data, &["--output", "json", "get", "txt"]))["value"],
        "héllo"
    );
    assert_eq!(
        ok(cli(&data, &["--output", "raw", "get", "txt"])),
        "héllo".as_bytes()
    );
    // The watch's JSON is exact too: its resync holds the values, and a change its
    // previous and current ones (a process holding the store takes the CLI's writes).
    let printed = dir.path().join("watch.json");
    let mut watch = Command::new(BIN)
        .arg("--store")
        .arg(&data)
        .args(["--output", "json", "watch", "bin/", "--count", "3"])
        .stdout(std::fs::File::create(&printed).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !std::fs::read_to_string(&printed)
        .unwrap()
        .contains("resync")
    {
        assert!(std::time::Instant::now() < deadline, "no resync");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    ok(cli(&data, &["put", "bin/file", "plain"]));
    ok(cli(&data, &["del", "bin/file"]));
    assert!(watch.wait().unwrap().success());
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&printed)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let values = lines[0]["resync"]["values"].as_array().unwrap();
    assert_eq!(values.len(), 3, "{lines:?}");
    assert!(
        values.iter().any(|v| v["value_base64"].is_string()),
        "{lines:?}"
    );
    let (put, del) = (&lines[1]["change"], &lines[2]["change"]);
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(put["prev_base64"].as_str().unwrap())
        .unwrap();
    assert_eq!(decoded, bytes, "the put's previous value: {put}");
    assert_eq!(put["value"], "plain");
    assert_eq!(del["prev"], "plain");
    assert!(del["value"].is_null(), "{del}");

    // Endless input is refused, not read into memory; so is a directory.
    let zero = cli(&data, &["put", "z", "--file", "/dev/zero"]);
    assert_eq!(zero.status.code(), Some(2), "{zero:?}");
    assert!(
        String::from_utf8_lossy(&zero.stderr).contains("larger than"),
        "{zero:?}"
    );
    let dir_as_file = cli(&data, &["put", "z", "--file", dir.path().to_str().unwrap()]);
    assert_eq!(dir_as_file.status.code(), Some(2), "{dir_as_file:?}");
    assert_eq!(
        cli(&data, &["get", "z"]).status.code(),
        Some(3),
        "nothing written"
    );

    // Bad usage: no value, two sources, a file that is not there, raw for a listing.
    let code = |args: &[&str]| cli(&data, args).status.code();
    assert_eq!(code(&["put", "k"]), Some(2));
    assert_eq!(
        code(&["put", "k", "v", "--file", file.to_str().unwrap()]),
        Some(2)
    );
    let missing = cli(&data, &["put", "k", "--file", "/no/such/file"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("/no/such/file"),
        "{missing:?}"
    );
    assert_eq!(code(&["--output", "raw", "ls", ""]), Some(2));
    assert_eq!(
        code(&["get", "k"]),
        Some(3),
        "none of the refused puts wrote"
    );
}

#[test]
fn listings_of_keys_only_and_limited() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for k in ["l/a", "l/b", "l/c"] {
        ok(cli(&data, &["put", k, "value"]));
    }
    let keys = String::from_utf8(ok(cli(&data, &["ls", "l/", "--keys-only"]))).unwrap();
    assert_eq!(keys, "l/a\nl/b\nl/c\n");
    let first = String::from_utf8(ok(cli(&data, &["ls", "l/", "--limit", "2"]))).unwrap();
    assert_eq!(first, "l/a\tvalue\nl/b\tvalue\n");
    let j = json(cli(
        &data,
        &[
            "--output",
            "json",
            "ls",
            "l/",
            "--limit",
            "2",
            "--keys-only",
        ],
    ));
    assert_eq!(j["more"], true);
    let values = j["values"].as_array().unwrap();
    assert_eq!(values.len(), 2);
    assert!(
        values[0].get("value").is_none() && values[0]["key"] == "l/a",
        "{j}"
    );
    let all = json(cli(&data, &["--output", "json", "ls", "l/"]));
    assert_eq!(all["more"], false);
    assert_eq!(all["values"].as_array().unwrap().len(), 3);
}

#[test]
fn durations_read_as_people_write_them() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for ttl in ["90", "1h 30m", "500ms", "2days"] {
        ok(cli(&data, &["put", "t", "v", "--ttl", ttl]));
    }
    for bad in ["soon", "1.5.2s", "-1s", ""] {
        let out = cli(&data, &["put", "t", "v", &format!("--ttl={bad}")]);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("duration"),
            "{out:?}"
        );
    }
    // Zero, or longer than the store's ten years: bad usage, never a panic or a wrap.
    for bad in ["0", "0s", "20years", "18446744073709551615"] {
        let out = cli(&data, &["put", "t", "v", "--ttl", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}: {out:?}");
    }
}

/// A reader that goes away (`datasync watch … | head -1`) ends the command quietly with
/// 141, as for tools killed by SIGPIPE; before, `println!` panicked.
#[test]
fn a_closed_pipe_is_no_panic() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    ok(cli(&data, &["put", "p/a", "v"]));
    let mut child = Command::new(BIN)
        .arg("--store")
        .arg(&data)
        .args(["watch", "p/"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(141), "{out:?}");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "{out:?}"
    );
}

#[test]
fn help_states_the_exit_codes() {
    let help = Command::new(BIN).arg("--help").output().unwrap();
    let text = String::from_utf8(help.stdout).unwrap();
    for code in [
        "0 done",
        "2 bad usage",
        "3 the key does not exist",
        "4 the compare-and-swap",
        "1 the store",
        "141",
    ] {
        assert!(text.contains(code), "{code:?} missing from --help:\n{text}");
    }
}

#!/usr/bin/env bash
# The project's test command (README, .ci/run). On a fresh Debian machine with the Rust
# toolchain it installs what is missing, then runs every check and every test.
set -euo pipefail
cd "$(dirname "$0")"

say() { printf '\n==> %s\n' "$*"; }

apt_updated=0
need_apt() { # need_apt <command> <debian package>
  command -v "$1" >/dev/null 2>&1 && return 0
  say "installing $2 (for $1)"
  if [ "$apt_updated" = 0 ]; then apt-get update -qq; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
  command -v "$1" >/dev/null 2>&1 || { echo "error: $2 installed but $1 not found" >&2; exit 1; }
}

need_component() { # need_component <cargo subcommand> <rustup component>
  cargo "$1" --version >/dev/null 2>&1 && return 0
  say "installing rustup component $2"
  rustup component add "$2" || {
    echo "error: cargo $1 is missing and 'rustup component add $2' failed" >&2
    exit 1
  }
}

command -v cargo >/dev/null 2>&1 || { echo "error: cargo not found: install the Rust toolchain (rustup)" >&2; exit 1; }
need_component fmt rustfmt
need_component clippy clippy
need_apt cc gcc
need_apt protoc protobuf-compiler   # etcd-client's build (integration crate)
need_apt etcd etcd-server           # real etcd for the integration tests and benchmarks
need_apt openssl openssl             # test certificates for the etcd TLS test

say "cargo fmt --check"
cargo fmt --all -- --check

say "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --all-features -- -D warnings

say "cargo doc (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --all-features --quiet

say "cargo test (unit, conformance, doc tests)"
cargo test --workspace --all-features

say "examples"
cargo run --quiet -p datasync-examples --bin local >/dev/null
echo "example local: ok"

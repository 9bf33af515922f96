#!/usr/bin/env bash
# test.sh — run every check warren has: formatting, lints, then the whole test
# suite against a real RabbitMQ broker and the real example plugins.
#
#   scripts/test.sh                  everything
#   scripts/test.sh -- FILTER        extra arguments go to `cargo test --workspace`
#   scripts/test.sh -p warren        (e.g. a package, a test filter, `-- --nocapture`)
#
# Works on a fresh Debian/Ubuntu machine with no standard input. It installs
# rabbitmq-server and curl with apt (as root, or through sudo), starts a private
# broker that does not touch a system one, builds the plugins (installing the
# wasm32-wasip2 target) and stops the broker again on exit if it started it.
#
# Env: CARGO_TARGET_DIR          build output (default $HOME/.cache/warren/target)
#      WARREN_TEST_BROKER_PORT   AMQP port of the test broker (default 5682;
#                                management API = port + 10000)
#      WARREN_TEST_BROKER_TLS_PORT  its AMQP-over-TLS port (default AMQP port + 1)
#      WARREN_TEST_BROKER_DIR    its state directory (default <repo>/.broker/test)
#      WARREN_PLUGIN_DIR         where plugins are built (default <repo>/plugins/dist)
#      WARREN_CHAOS_BASE_PORT    first port of the chaos run's cluster (default 5811;
#                                see scripts/chaos.sh)
#      WARREN_TEST_CHAOS=0       skip the chaos run (e.g. with a test filter)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/warren/target}
export WARREN_PLUGIN_DIR=${WARREN_PLUGIN_DIR:-$repo/plugins/dist}
export BROKER_PORT=${WARREN_TEST_BROKER_PORT:-5682}
export BROKER_TLS_PORT=${WARREN_TEST_BROKER_TLS_PORT:-$((BROKER_PORT + 1))}
export BROKER_DIR=${WARREN_TEST_BROKER_DIR:-$repo/.broker/test}
broker=$repo/scripts/broker.sh

t_start=$SECONDS
step_no=0
step() {
  step_no=$((step_no + 1))
  printf '\n==> [%d/7] %s   (%ds elapsed)\n' "$step_no" "$*" "$((SECONDS - t_start))" >&2
}
die() { printf '\ntest.sh: error: %s\n' "$*" >&2; exit 1; }
as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo -- "$@"
  else die "need root to run: $* (no sudo found)"; fi
}
installed() {  # every named Debian package is installed?
  local p
  for p in "$@"; do
    [ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null)" = "ii " ] || return 1
  done
}

# --- prerequisites --------------------------------------------------------
step "checking prerequisites"
if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH=$HOME/.cargo/bin:$PATH
fi
command -v cargo >/dev/null ||
  die "cargo not found: install Rust 1.95 or newer with rustup (https://rustup.rs)"
cargo fmt --version >/dev/null 2>&1 ||
  die "rustfmt is missing: rustup component add rustfmt"
cargo clippy --version >/dev/null 2>&1 ||
  die "clippy is missing: rustup component add clippy"
# Crates with build scripts and the final link need a C toolchain.
if ! command -v cc >/dev/null; then
  echo "installing a C toolchain (gcc, libc6-dev) for linking" >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends gcc libc6-dev ||
    { as_root apt-get update -q &&
      as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends gcc libc6-dev; }
fi
[ -f "$repo/scripts/build-plugins.sh" ] ||
  die "scripts/build-plugins.sh is missing: it builds the plugins the tests load"
echo "cargo $(cargo --version | cut -d' ' -f2), target dir $CARGO_TARGET_DIR" >&2

# --- static checks ----------------------------------------------------------
step "cargo fmt --all --check"
cargo fmt --all --check || die "formatting differs: run 'cargo fmt --all'"

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings || die "clippy found problems"

# --- plugins ----------------------------------------------------------------
step "building plugins into $WARREN_PLUGIN_DIR"
bash "$repo/scripts/build-plugins.sh" || die "building the plugins failed"

# --- broker -----------------------------------------------------------------
step "RabbitMQ test broker on port $BROKER_PORT, TLS on $BROKER_TLS_PORT ($BROKER_DIR)"
if installed rabbitmq-server curl openssl; then
  echo "rabbitmq-server, curl and openssl already installed" >&2
else
  as_root "$broker" install || die "installing rabbitmq-server failed"
fi
started_broker=0
# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
  local rc=$?
  if [ "$started_broker" = 1 ]; then
    echo >&2; echo "==> stopping the test broker" >&2
    "$broker" stop || true
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP  # run the EXIT trap on signals too
if "$broker" status >/dev/null 2>&1; then
  echo "reusing the running test broker" >&2
else
  started_broker=1
fi
broker_url=$("$broker" start) || die "the test broker did not start (logs: $BROKER_DIR/log)"
export WARREN_TEST_BROKER_URL=$broker_url
export WARREN_TEST_MGMT_URL=http://127.0.0.1:$((BROKER_PORT + 10000))
# The throwaway CA that signed the broker's certificate; client.pem/client.key beside it.
WARREN_TEST_TLS_URL=$("$broker" tls-url) || die "no TLS URL for the test broker"
export WARREN_TEST_TLS_URL WARREN_TEST_TLS_CA=$BROKER_DIR/tls/ca.pem
echo "WARREN_TEST_BROKER_URL=$WARREN_TEST_BROKER_URL" >&2
echo "WARREN_TEST_MGMT_URL=$WARREN_TEST_MGMT_URL (guest/guest)" >&2
echo "WARREN_TEST_TLS_URL=$WARREN_TEST_TLS_URL (CA: $WARREN_TEST_TLS_CA)" >&2

# --- tests ------------------------------------------------------------------
step "cargo test --workspace --no-fail-fast $*"
# --no-fail-fast: one failing test binary must not keep the others from
# running (and from reporting). cargo lists the failed binaries at the end;
# the output is kept to repeat that list as one line.
test_log=$(mktemp "${TMPDIR:-/tmp}/warren-test.XXXXXX")
rc=0
cargo test --workspace --no-fail-fast "$@" 2>&1 | tee "$test_log" || rc=$?

# --- fault injection -------------------------------------------------------
# The short chaos run: replicas on a three-node cluster through kills, node
# losses, a cluster restart, closed connections and reloads; a failover
# regression loses or strands messages and fails here. It runs after the tests
# (and even when they failed) so both verdicts are reported.
chaos_rc=0
if [ "${WARREN_TEST_CHAOS:-1}" != 0 ]; then
  step "scripts/chaos.sh --short (fault injection on a local three-node cluster)"
  # In the background with the signal passed on, so that stopping this script
  # stops the chaos run's replicas and cluster too (a foreground command
  # would hold off this script's traps until it ended by itself).
  bash "$repo/scripts/chaos.sh" --short &
  chaos_pid=$!
  trap 'kill -TERM "$chaos_pid" 2>/dev/null; wait "$chaos_pid"; exit 130' INT TERM HUP
  wait "$chaos_pid" || chaos_rc=$?
  trap 'exit 130' INT TERM HUP
else
  step "chaos run skipped (WARREN_TEST_CHAOS=0)"
fi
echo >&2
if [ "$rc" = 0 ] && [ "$chaos_rc" != 0 ]; then
  echo "test.sh: the chaos run failed (exit $chaos_rc) after $((SECONDS - t_start))s; its logs: ${WARREN_CHAOS_DIR:-$repo/.broker/chaos}" >&2
  rm -f "$test_log"
  exit "$chaos_rc"
fi
if [ "$rc" = 0 ]; then
  echo "test.sh: all checks passed in $((SECONDS - t_start))s" >&2
else
  # cargo ends with "error: test failed, to rerun pass `-p pkg --test t`" for
  # one failed binary, or "error: N targets failed:" and one "`-p pkg --test t`"
  # per line for several.
  failed=$(awk '/to rerun pass `/ {sub(/.*to rerun pass /, ""); gsub(/[` ]+/, " "); printf "%s;", $0; next}
    /targets? failed:$/ {on=1; next} on && /^ +`/ {gsub(/[` ]+/, " "); printf "%s;", $0; next} on {on=0}' "$test_log" | tr ';' '\n' | awk 'NF && !seen[$0]++ {printf "%s;", $0}' |
    sed -e 's/^ *//' -e 's/ *; */; /g' -e 's/; $//')
  echo "test.sh: cargo test failed (exit $rc) after $((SECONDS - t_start))s; failed test binaries: ${failed:-see the output above}; broker logs: $BROKER_DIR/log" >&2
  if [ "$chaos_rc" != 0 ]; then echo "test.sh: the chaos run failed too (exit $chaos_rc)" >&2; fi
fi
rm -f "$test_log"
exit "$rc"

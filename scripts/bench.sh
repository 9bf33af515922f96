#!/usr/bin/env bash
# bench.sh — measure warren against raw AMQP baselines on a local RabbitMQ, in
# one run, and print one table (also written to bench/results/latest.{json,md}).
#
#   scripts/bench.sh                                  every scenario, defaults
#   scripts/bench.sh --duration 5 -s throughput -s rpc
#   scripts/bench.sh --no-peers                       skip the pika/Celery venv
#
# Arguments other than --no-peers and --keep-broker go to `warren-bench run`
# (see `warren-bench run --help`: --duration, --messages, --prefetch, --rounds,
# --queue-type, --scenario/-s, ...).
#
# It builds warren and warren-bench in release mode, builds the plugins, starts
# a private broker for benchmarks (port 5702, state in .broker/bench; a running
# one is reused and left running) and, for the peers and polyglot scenarios,
# installs pika and celery into a venv (PyPI) and amqplib for the Node peer
# (npm, bench/peers/node/package.json); a peer whose install fails is skipped
# with a note.
#
# Env: CARGO_TARGET_DIR          build output (default $HOME/.cache/warren/target)
#      WARREN_BENCH_BROKER_PORT  AMQP port of the benchmark broker (default 5702)
#      WARREN_BENCH_BROKER_DIR   its state directory (default <repo>/.broker/bench)
#      WARREN_BENCH_VENV         Python venv for peers (default $HOME/.cache/warren/bench-venv)
#      WARREN_BENCH_NODE_DIR     npm install of the Node peer (default $HOME/.cache/warren/bench-node)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/warren/target}
export BROKER_PORT=${WARREN_BENCH_BROKER_PORT:-5702}
export BROKER_DIR=${WARREN_BENCH_BROKER_DIR:-$repo/.broker/bench}
venv=${WARREN_BENCH_VENV:-$HOME/.cache/warren/bench-venv}
node_dir=${WARREN_BENCH_NODE_DIR:-$HOME/.cache/warren/bench-node}
broker=$repo/scripts/broker.sh

log() { echo "bench.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }
as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo -- "$@"
  else die "need root to run: $* (no sudo found)"; fi
}

peers=1 keep_broker=0 args=()
for a in "$@"; do
  case $a in
    --no-peers) peers=0 ;;
    --keep-broker) keep_broker=1 ;;
    *) args+=("$a") ;;
  esac
done

if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH=$HOME/.cargo/bin:$PATH
fi
command -v cargo >/dev/null || die "cargo not found: install Rust 1.95 or newer with rustup"

log "building warren and warren-bench (release; the first build takes a while)"
cargo build --release -q -p warren -p warren-bench || die "release build failed"

log "building plugins"
bash "$repo/scripts/build-plugins.sh" >/dev/null || die "building the plugins failed"

if [ "$(dpkg-query -W -f='${db:Status-Abbrev}\n' rabbitmq-server curl 2>/dev/null)" != $'ii \nii ' ]; then
  as_root "$broker" install || die "installing rabbitmq-server failed"
fi
started_broker=0
# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
  local rc=$?
  if [ "$started_broker" = 1 ] && [ "$keep_broker" = 0 ]; then
    log "stopping the benchmark broker"
    "$broker" stop || true
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
"$broker" status >/dev/null 2>&1 || started_broker=1
broker_url=$("$broker" start) || die "the benchmark broker did not start (logs: $BROKER_DIR/log)"

python_args=()
if [ "$peers" = 1 ]; then
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import pika, celery' 2>/dev/null; then
    python_args=(--python "$venv/bin/python")
  else
    log "installing pika and celery into $venv (for the peers scenario)"
    if { command -v python3 >/dev/null || as_root apt-get install -y -q python3 python3-venv >/dev/null; } &&
       { python3 -m venv --clear "$venv" 2>/dev/null ||
         { as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv >/dev/null &&
           python3 -m venv --clear "$venv"; }; } &&
       "$venv/bin/pip" install -q --disable-pip-version-check 'pika>=1.3,<2' 'celery>=5.3,<6'; then
      python_args=(--python "$venv/bin/python")
    else
      log "could not install pika/celery: the peers scenario will be skipped"
    fi
  fi
fi

node_args=()
if [ "$peers" = 1 ]; then
  node_pkg=$repo/bench/peers/node/package.json
  if [ -f "$node_dir/node_modules/amqplib/package.json" ] && cmp -s "$node_pkg" "$node_dir/package.json"; then
    node_args=(--node-modules "$node_dir/node_modules")
  elif ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    log "node/npm not found: the Node peer of the polyglot scenario will be skipped"
  else
    log "installing amqplib into $node_dir (for the polyglot scenario's Node peer)"
    if rm -rf "$node_dir" && mkdir -p "$node_dir" && cp "$node_pkg" "$node_dir/" &&
       (cd "$node_dir" && npm install --ignore-scripts --no-audit --no-fund --loglevel=error >&2); then
      node_args=(--node-modules "$node_dir/node_modules")
    else
      log "could not install amqplib from npm: the Node peer of the polyglot scenario will be skipped"
    fi
  fi
fi

log "running (broker $broker_url)"
"$CARGO_TARGET_DIR/release/warren-bench" run \
  --broker-url "$broker_url" \
  --warren-bin "$CARGO_TARGET_DIR/release/warren" \
  --plugin-dir "${WARREN_PLUGIN_DIR:-$repo/plugins/dist}" \
  --work-dir "${TMPDIR:-/tmp}/warren-bench" \
  --out-dir "$repo/bench/results" \
  --command-line "scripts/bench.sh${*:+ $*}" \
  "${python_args[@]}" "${node_args[@]}" "${args[@]}"

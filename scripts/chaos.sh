#!/usr/bin/env bash
# chaos.sh — the fault-injection run: warren replicas on a local RabbitMQ cluster,
# messages flowing, faults injected one after another, every message accounted for.
#
#   scripts/chaos.sh                 the full run (RELIABILITY.md): 3 nodes, 3 replicas,
#                                    20 replica SIGKILLs, 5 SIGTERMs, 5+5 leader node
#                                    stops/kills, 2 cluster restarts, 10 close_all, 50 reloads
#   scripts/chaos.sh --short         the run scripts/test.sh does (about 3 minutes)
#   scripts/chaos.sh --replica-kills 5 --reloads 0 ...   any count (chaos --help)
#
# Script options (the rest go to the harness, tests/src/bin/chaos):
#   --release    run warren's release build (default: the debug build the tests use)
#   --no-build   use what is built (scripts/test.sh has just built it)
#
# It builds warren, the harness and the Rust plugins (the probe plugin is the one
# used), then runs the harness, which starts the cluster with scripts/broker.sh
# cluster (state in $WARREN_CHAOS_DIR/cluster), runs `warren run` processes, injects
# the faults and prints one table. Exit status: 0 all accounted for, 1 something was
# lost or failed, 2 the run could not be made. The cluster is stopped at the end
# (and on Ctrl-C); its state is removed after a run that passed, kept for the logs
# after one that did not.
#
# Env: CARGO_TARGET_DIR        build output (default $HOME/.cache/warren/target)
#      WARREN_PLUGIN_DIR       built plugins (default <repo>/plugins/dist)
#      WARREN_CHAOS_BASE_PORT  node 1's AMQP port (default 5811; node I uses base+I-1,
#                              management +10000, distribution +20000, epmd base+1000)
#      WARREN_CHAOS_DIR        state and logs (default <repo>/.broker/chaos)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/warren/target}
export WARREN_PLUGIN_DIR=${WARREN_PLUGIN_DIR:-$repo/plugins/dist}
base=${WARREN_CHAOS_BASE_PORT:-5811}
dir=${WARREN_CHAOS_DIR:-$repo/.broker/chaos}

log() { echo "chaos.sh: $*" >&2; }
die() { log "error: $*"; exit 2; }

profile=debug build=1 args=()
for a in "$@"; do
  case $a in
    --release) profile=release ;;
    --no-build) build=0 ;;
    *) args+=("$a") ;;
  esac
done

if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH=$HOME/.cargo/bin:$PATH
fi
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || [ -x /usr/sbin/rabbitmq-server ] ||
  die "rabbitmq-server is not installed: run 'scripts/broker.sh install' (as root)"

if [ "$build" = 1 ]; then
  flag=()
  [ "$profile" = release ] && flag=(--release)
  log "building warren ($profile) and the chaos harness"
  cargo build "${flag[@]}" -p warren --bin warren || die "building warren failed"
  cargo build -p warren-tests --bin chaos || die "building the chaos harness failed"
  log "building the Rust plugins into $WARREN_PLUGIN_DIR"
  WARREN_PLUGIN_LANGUAGES=rust bash "$repo/scripts/build-plugins.sh" >/dev/null ||
    die "building the plugins failed"
fi
warren=$CARGO_TARGET_DIR/$profile/warren
chaos=$CARGO_TARGET_DIR/debug/chaos
[ -x "$warren" ] || die "$warren is not built (run without --no-build)"
[ -x "$chaos" ] || die "$chaos is not built (run without --no-build)"

# The harness stops its replicas and the cluster itself, on SIGTERM and SIGINT
# too (they are passed on to it). This covers a harness that could not: its
# replicas (found by their config files) and the cluster are stopped here.
child=
# shellcheck disable=SC2317  # invoked by the trap
cleanup() {
  local rc=$?
  if [ -n "$child" ] && kill -0 "$child" 2>/dev/null; then
    kill -TERM "$child" 2>/dev/null || true
    wait "$child" 2>/dev/null || true
  fi
  if [ "$rc" != 0 ]; then
    pkill -KILL -f -- "--config $dir/run/replica-" 2>/dev/null || true
    if [ -d "$dir/cluster" ]; then
      log "making sure the cluster in $dir/cluster is stopped"
      BROKER_PORT=$base BROKER_DIR=$dir/cluster "$repo/scripts/broker.sh" cluster stop >/dev/null 2>&1 || true
    fi
  fi
  exit "$rc"
}
trap cleanup EXIT
# A signal is passed on to the harness, which then stops what it started and
# exits; the script exits with its status.
forward() { [ -n "$child" ] && kill "-$1" "$child" 2>/dev/null || true; }
trap 'forward TERM' TERM
trap 'forward INT' INT
trap 'forward HUP' HUP

# In the background, so that the traps run while it does (bash runs a trap
# only between commands, and a foreground command holds it).
"$chaos" --warren "$warren" --plugin "$WARREN_PLUGIN_DIR/probe.wasm" \
  --dir "$dir" --base-port "$base" "${args[@]}" &
child=$!
rc=0
# `wait` returns early (status > 128) when a trapped signal arrives: wait
# again until the harness itself has exited.
while :; do
  wait "$child" && rc=0 || rc=$?
  kill -0 "$child" 2>/dev/null || break
done
child=
exit "$rc"

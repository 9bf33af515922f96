#!/usr/bin/env bash
# demo.sh — see warren work end to end, from nothing, with one command.
#
#   scripts/demo.sh           run the demo, then stop warren and the broker
#   scripts/demo.sh --keep    leave warren and the broker running afterwards
#
# Steps: install and start RabbitMQ (private, in .broker/demo), build the
# example plugins and warren, start `warren run --config examples/warren.toml`,
# wait for /healthz/ready, then run scripts/demo/client.py — a plain pika
# client — through the three example pipelines (RPC, thumbnails, notifications),
# a webhook POSTed by the notify plugin to a local receiver the demo starts
# (scripts/demo/receiver.py on 127.0.0.1:8025), a request to a host its
# pipeline does not allow, and a poison message. Exits non-zero if any step did
# not produce its result.
#
# Works on a fresh Debian/Ubuntu machine; installs rabbitmq-server, curl and
# (if missing) python3-venv with apt (as root, or through sudo), the
# wasm32-wasip2 Rust target, and pika into $HOME/.cache/warren/demo-venv.
#
# Env: BROKER_PORT       AMQP port (default 5672; management API = port + 10000)
#      BROKER_DIR        broker state (default <repo>/.broker/demo)
#      CARGO_TARGET_DIR  build output (default $HOME/.cache/warren/target)
#      RUST_LOG          warren's log filter (default info)
set -euo pipefail

keep=0
for arg in "$@"; do
  case $arg in
    --keep) keep=1 ;;
    -h | --help) sed -n '2,/^set /{/^#/p}' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "demo.sh: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
  esac
done

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/warren/target}
export BROKER_PORT=${BROKER_PORT:-5672}
export BROKER_DIR=${BROKER_DIR:-$repo/.broker/demo}
# examples/warren.toml names its plugins ../plugins/dist/*.wasm: build them there.
export WARREN_PLUGIN_DIR=$repo/plugins/dist
config=$repo/examples/warren.toml
ops=127.0.0.1:9090          # [ops] listen in examples/warren.toml
receiver=127.0.0.1:8025     # the notify pipeline's webhook.url in examples/warren.toml
mgmt=http://127.0.0.1:$((BROKER_PORT + 10000))
demo_dir=$repo/.cache/demo  # warren's log and pid file
venv=$HOME/.cache/warren/demo-venv
broker=$repo/scripts/broker.sh

t_start=$SECONDS
step_no=0
step() {
  step_no=$((step_no + 1))
  printf '\n==> [%d/7] %s   (%ds elapsed)\n' "$step_no" "$*" "$((SECONDS - t_start))"
}
die() { printf '\ndemo.sh: error: %s\n' "$*" >&2; exit 1; }
as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo -- "$@"
  else die "need root to run: $* (no sudo found)"; fi
}
apt_install() {
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" ||
    { as_root apt-get update -q &&
      as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"; }
}
installed() {
  local p
  for p in "$@"; do
    [ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null)" = "ii " ] || return 1
  done
}
port_busy() { (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null; }
# Alive and not a zombie (kill -0 succeeds on zombies, which a slow PID 1 may leave).
alive() {
  local s
  [[ ${1:-} =~ ^[0-9]+$ ]] && read -r s 2>/dev/null <"/proc/$1/stat" || return 1
  s=${s##*) }; [[ $s != [ZX]* ]]
}

# --- cleanup: stop what this script started, unless --keep ----------------
started_broker=0 warren_pid= receiver_pid=
cleanup() {
  local rc=$?
  trap - EXIT INT TERM HUP
  if [ "$keep" = 1 ] && [ "$rc" = 0 ]; then exit 0; fi
  if alive "$receiver_pid"; then
    kill -TERM "$receiver_pid" 2>/dev/null || true
  fi
  if alive "$warren_pid"; then
    echo "==> stopping warren (pid $warren_pid)"
    kill -TERM "$warren_pid" 2>/dev/null || true
    for _ in $(seq 150); do alive "$warren_pid" || break; sleep 0.1; done
    if alive "$warren_pid"; then kill -KILL "$warren_pid" 2>/dev/null || true; fi
    rm -f "$demo_dir/warren.pid"
  fi
  if [ "$started_broker" = 1 ]; then
    echo "==> stopping the broker"
    "$broker" stop || true
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# --- 1. prerequisites -------------------------------------------------------
step "checking prerequisites"
if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH=$HOME/.cargo/bin:$PATH
fi
command -v cargo >/dev/null ||
  die "cargo not found: install Rust 1.95 or newer with rustup (https://rustup.rs)"
command -v cc >/dev/null || apt_install gcc libc6-dev
command -v python3 >/dev/null || apt_install python3 python3-venv
old_pid=$(cat "$demo_dir/warren.pid" 2>/dev/null || true)
if alive "$old_pid" && grep -qa warren "/proc/$old_pid/cmdline" 2>/dev/null; then
  die "warren from an earlier 'demo.sh --keep' is still running (pid $old_pid): kill $old_pid first"
fi
! port_busy "$ops" ||
  die "$ops (warren's ops endpoint in examples/warren.toml) is already in use by another program"
! port_busy "$receiver" ||
  die "$receiver (the webhook receiver the notify pipeline POSTs to) is already in use by another program"
echo "cargo $(cargo --version | cut -d' ' -f2), $(python3 --version), target dir $CARGO_TARGET_DIR"

# --- 2. broker --------------------------------------------------------------
step "RabbitMQ on port $BROKER_PORT ($BROKER_DIR)"
if installed rabbitmq-server curl; then
  echo "rabbitmq-server and curl already installed"
else
  as_root "$broker" install || die "installing rabbitmq-server failed"
fi
if "$broker" status >/dev/null 2>&1; then
  echo "reusing the running demo broker"
else
  if port_busy "127.0.0.1:$BROKER_PORT"; then
    die "port $BROKER_PORT is taken (another RabbitMQ?): run with BROKER_PORT=5673 $0"
  fi
  started_broker=1
fi
broker_url=$("$broker" start) || die "the broker did not start (logs: $BROKER_DIR/log)"
echo "broker: $broker_url   management UI: $mgmt (guest/guest)"

# --- 3. plugins -------------------------------------------------------------
step "building the example plugins into plugins/dist"
[ -f scripts/build-plugins.sh ] || die "scripts/build-plugins.sh is missing"
# The demo's plugins are all Rust: skipping the JS, Python and C toolchains
# saves a fresh machine minutes (scripts/build-plugins.sh builds them all).
WARREN_PLUGIN_LANGUAGES=rust bash scripts/build-plugins.sh || die "building the plugins failed"
for p in fib thumbnail notify; do
  [ -s "plugins/dist/$p.wasm" ] || die "plugins/dist/$p.wasm was not built"
done

# --- 4. warren --------------------------------------------------------------
step "building warren (cargo build -p warren)"
cargo build -p warren || die "building warren failed"
warren=$CARGO_TARGET_DIR/debug/warren
"$warren" check --config "$config" || die "warren check rejected $config"

# --- 5. run it --------------------------------------------------------------
step "starting the webhook receiver on $receiver and warren run --config examples/warren.toml"
mkdir -p "$demo_dir"
hooks=$demo_dir/webhooks.jsonl
: >"$hooks"
setsid python3 scripts/demo/receiver.py "${receiver##*:}" "$hooks" </dev/null >>"$demo_dir/receiver.log" 2>&1 &
receiver_pid=$!
echo "$receiver_pid" >"$demo_dir/receiver.pid"
for _ in $(seq 100); do  # 10 s
  port_busy "$receiver" && break
  alive "$receiver_pid" || die "the webhook receiver exited (log: $demo_dir/receiver.log)"
  sleep 0.1
done
port_busy "$receiver" || die "the webhook receiver did not listen on $receiver within 10 s"
echo "receiver pid $receiver_pid, POSTs recorded in $hooks"
log=$demo_dir/warren.log
: >"$log"
# setsid: with --keep warren must outlive this script and its terminal.
WARREN_BROKER_URL=$broker_url RUST_LOG=${RUST_LOG:-info} \
  setsid "$warren" run --config "$config" </dev/null >>"$log" 2>&1 &
warren_pid=$!
echo "$warren_pid" >"$demo_dir/warren.pid"
echo "warren pid $warren_pid, log $log"
ready=
for _ in $(seq 600); do  # 60 s
  alive "$warren_pid" || { tail -n 40 "$log" >&2; die "warren exited during startup (log above: $log)"; }
  if ready=$(curl -fsS --max-time 2 "http://$ops/healthz/ready" 2>/dev/null); then break; fi
  ready=
  sleep 0.1
done
if [ -z "$ready" ]; then
  curl -sS --max-time 2 "http://$ops/healthz/ready" >&2 || true
  tail -n 40 "$log" >&2
  die "warren was not ready within 60 s (log: $log)"
fi
echo "ready: $ready"

# --- 6. the client ----------------------------------------------------------
step "demo client (Python, pika): scripts/demo/client.py"
if ! "$venv/bin/python" -c 'import pika' 2>/dev/null; then
  echo "creating $venv with pika"
  if ! python3 -m venv --clear "$venv" 2>/dev/null; then
    apt_install python3-venv  # Debian splits ensurepip out of python3
    python3 -m venv --clear "$venv" || die "cannot create a Python virtualenv at $venv"
  fi
  "$venv/bin/pip" install -q --disable-pip-version-check 'pika>=1.3,<2' ||
    die "installing pika from PyPI failed"
fi
client_rc=0
"$venv/bin/python" scripts/demo/client.py --url "$broker_url" --timeout 30 --webhook-log "$hooks" || client_rc=$?

# --- 7. what warren counted -------------------------------------------------
step "metrics: http://$ops/metrics"
metrics=$(curl -fsS --max-time 5 "http://$ops/metrics" || true)
if [ -n "$metrics" ]; then
  grep '^warren_messages_total' <<<"$metrics" || echo "(no warren_messages_total lines yet)"
  grep -E '^warren_http_(requests|denied)_total' <<<"$metrics" || echo "(no warren_http_* lines yet)"
else
  echo "could not read http://$ops/metrics"
fi

echo
if [ "$client_rc" != 0 ]; then
  echo "last lines of warren's log ($log):" >&2
  tail -n 30 "$log" >&2
  die "the demo client reported failures (see above)"
fi
echo "demo.sh: the demo passed in $((SECONDS - t_start))s"
if [ "$keep" = 0 ]; then
  echo "(scripts/demo.sh --keep leaves warren and the broker running to explore)"
  exit 0
fi
cat <<EOF

--keep: warren (pid $warren_pid), the webhook receiver (pid $receiver_pid, writing
$hooks) and the broker are still running.
  curl -s http://$ops/metrics | grep ^warren_     Prometheus metrics
  curl -s http://$ops/healthz/ready               readiness (JSON)
  $mgmt                           RabbitMQ management UI (guest/guest)
  $log           warren's log
  $venv/bin/python scripts/demo/client.py --url '$broker_url'
      runs the demo client again (RabbitMQ tutorial 6's rpc_client.py works too)
Stop them with:
  kill $warren_pid $receiver_pid
  BROKER_PORT=$BROKER_PORT BROKER_DIR=$BROKER_DIR scripts/broker.sh stop
EOF

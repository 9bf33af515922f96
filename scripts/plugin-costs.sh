#!/usr/bin/env bash
# plugin-costs.sh - what a plugin costs in each language, measured with the
# warren CLI alone (no broker, no tests): component size, build time (source to
# component), host compile time (component to native code, a cache miss),
# cached load time (a cache hit) and the time of one message (instantiate +
# handle). Prints a Markdown table; docs/plugin-costs.md has a measured one.
#
#   scripts/plugin-costs.sh              release-build warren, build plugins, measure
#   scripts/plugin-costs.sh --runs 10    invocations per plugin (default 5)
#
# The plugins measured are the examples: fib (Rust, for comparison), js_router,
# py_classifier and c_checksum, each on an input that takes its normal path.
# "first message" is `warren invoke`'s elapsed_ms: the first instance in a fresh
# process, which includes mapping the component's memory image; a long-running
# warren reuses its pooled slots, so this is an upper bound per message.
#
# Env: WARREN_BIN        measure this warren binary instead of building one
#      CARGO_TARGET_DIR  build output (default $HOME/.cache/warren/target)
#      WARREN_PLUGIN_DIR where the plugins are (default <repo>/plugins/dist)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/warren/target}
DIST=${WARREN_PLUGIN_DIR:-$ROOT/plugins/dist}
RUNS=5

log() { echo "plugin-costs: $*" >&2; }
die() { log "error: $*"; exit 1; }

while [ $# -gt 0 ]; do
  case $1 in
    --runs) RUNS=$2; shift 2 ;;
    *) die "unknown argument $1 (see the header of $0)" ;;
  esac
done
[ "$RUNS" -ge 1 ] 2>/dev/null || die "--runs needs a positive number"

now() { date +%s%N; }
ms_since() { echo $((($(now) - $1) / 1000000)); }
median() { sort -n | awk '{v[NR] = $1} END {if (NR % 2) print v[(NR + 1) / 2]; else printf "%.2f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }

if [ -n "${WARREN_BIN:-}" ]; then
  WARREN=$WARREN_BIN
else
  # Debug builds instantiate several times slower: measure what production runs.
  log "building warren (release)"
  (cd "$ROOT" && cargo build --release -q -p warren) || die "cargo build --release -p warren failed"
  WARREN=$CARGO_TARGET_DIR/release/warren
fi
log "building the plugins (installs missing toolchains)"
bash "$ROOT/scripts/build-plugins.sh" >/dev/null || die "scripts/build-plugins.sh failed"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# Source-to-component time: rebuild one language's plugins into an empty folder
# (the toolchain is installed by now, so this is the build alone).
build_ms() {
  local lang=$1 t
  t=$(now)
  if [ "$lang" = rust ]; then
    # cargo builds the Rust plugins as one workspace; time a cold build of the
    # one crate measured, with a target dir of its own.
    (cd "$ROOT/plugins" && CARGO_TARGET_DIR="$WORK/rust-target" \
       cargo build -q --release --target wasm32-wasip2 -p fib) >&2 || return 1
  else
    WARREN_PLUGIN_LANGUAGES=$lang WARREN_PLUGIN_DIR="$WORK/build-$lang" \
      bash "$ROOT/scripts/build-plugins.sh" >/dev/null 2>&1 || return 1
  fi
  ms_since "$t"
}

# `warren check` prints "loaded in N ms, cache miss|hit" per pipeline.
check_ms() {  # check_ms CONFIG EXPECTED_CACHE_LABEL
  local out
  out=$("$WARREN" check --config "$1" 2>/dev/null) || return 1
  grep -q "cache $2" <<<"$out" || { log "expected a cache $2: $out"; return 1; }
  sed -n 's/.*loaded in \([0-9]*\) ms.*/\1/p' <<<"$out"
}

measure() {  # measure NAME LANG INVOKE_ARGS...
  local name=$1 lang=$2 wasm=$DIST/$1.wasm cfg size build compile cached first i
  shift 2
  if [ ! -f "$wasm" ]; then
    printf '| %s | %s | (not built: toolchain skipped) | | | | |\n' "$lang" "$name"
    return
  fi
  log "$lang: $name"
  size=$(wc -c <"$wasm")
  build=$(build_ms "$lang") || build="failed"
  cfg=$WORK/$name.toml
  printf '[runtime]\ncache_dir = "%s"\n[[pipeline]]\nname = "cost"\nqueue = "cost"\nplugin = "%s"\n' \
    "$WORK/compiled-$name" "$wasm" >"$cfg"
  compile=$(check_ms "$cfg" miss) || die "warren check failed for $name"
  cached=$(for i in 1 2 3; do check_ms "$cfg" hit || exit 1; done | median) || die "cached load failed for $name"
  first=$(for ((i = 0; i < RUNS; i++)); do
      "$WARREN" invoke "$wasm" "$@" 2>/dev/null | sed -n 's/.*"elapsed_ms": \([0-9.]*\).*/\1/p'
    done | median)
  [ -n "$first" ] || die "warren invoke $name produced no elapsed_ms"
  awk -v l="$lang" -v n="$name" -v s="$size" -v b="$build" -v c="$compile" -v h="$cached" -v f="$first" '
    function dur(ms) { return ms >= 1000 ? sprintf("%.1f s", ms / 1000) : (ms < 1 ? "<1 ms" : sprintf("%d ms", ms)) }
    BEGIN {
      printf "| %s | %s | %s | %s | %s | %s | %.2f ms |\n", l, n,
        (s >= 1e6 ? sprintf("%.1f MB", s / 1e6) : sprintf("%d KB", s / 1e3)),
        (b ~ /^[0-9]+$/ ? dur(b) : b), dur(c), dur(h), f
    }'
}

ticket='{"id":"T-1","subject":"Refund please","body":"I was charged twice for my subscription"}'
event='{"event":"deploy.failed","severity":"error","service":"api","summary":"rollout failed","fields":{"sha":"abc"}}'

echo "warren $("$WARREN" --version | cut -d' ' -f2), $(basename "$(dirname "$WARREN")") build;" \
  "$(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); $(date -u +%Y-%m-%d); $RUNS runs per message median"
echo
echo "| language | plugin | size | build | host compile | cached load | first message |"
echo "|---|---|---|---|---|---|---|"
measure fib rust --body 30 --reply-to caller
measure js_router js --body "$event"
measure py_classifier python --body "$ticket"
measure c_checksum c --body hello

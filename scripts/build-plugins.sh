#!/usr/bin/env bash
# build-plugins.sh - build every bundled plugin into a WebAssembly component in
# plugins/dist/<name>.wasm and print one line per plugin (name, size).
#
#   scripts/build-plugins.sh
#
# Env: WARREN_PLUGIN_DIR          output folder (default <repo>/plugins/dist)
#      WARREN_PLUGINS_TARGET_DIR  cargo target dir (default ~/.cache/warren/plugins-target,
#                                 outside the repo so fresh clones reuse the build)
#      FORCE_FALLBACK, GUEST_TOOLCHAIN_STATE: passed to guest-toolchain.sh.
# Each language has a build_<lang> function that puts its components in $OUT and
# prints their paths, one per line.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLCHAIN="$ROOT/scripts/guest-toolchain.sh"
OUT=${WARREN_PLUGIN_DIR:-$ROOT/plugins/dist}
TARGET_DIR=${WARREN_PLUGINS_TARGET_DIR:-$HOME/.cache/warren/plugins-target}
COMPONENT_HDR=0061736d0d000100
LANGUAGES=(rust)

log() { echo "build-plugins: $*" >&2; }
die() { log "error: $*"; exit 1; }

# True when guest-toolchain.sh's recorded mode still holds, so the costly `ensure`
# (rustup, maybe apt) runs only on a fresh machine or after a change of mode.
rust_toolchain_ready() {
  local state=${GUEST_TOOLCHAIN_STATE:-${CARGO_HOME:-$HOME/.cargo}/guest-toolchain} mode
  mode=$(cat "$state/mode" 2>/dev/null) || return 1
  case $mode in
    fast)
      [ "${FORCE_FALLBACK:-0}" != 1 ] || return 1
      # From plugins/ so a rust-toolchain.toml there would pick the same toolchain.
      (cd "$ROOT/plugins" && rustup target list --installed 2>/dev/null) | grep -qx wasm32-wasip2 ;;
    fallback*) [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/wasm-component-ld" ] ;;
    *) return 1 ;;
  esac
}

build_rust() {
  if ! rust_toolchain_ready; then
    log "setting up the Rust guest toolchain"
    (cd "$ROOT/plugins" && "$TOOLCHAIN" ensure) </dev/null || die "guest-toolchain.sh ensure failed"
  fi
  # A workspace root builds every member; cargo's JSON lists each one's .wasm.
  CARGO_TARGET_DIR="$TARGET_DIR" "$TOOLCHAIN" build "$ROOT/plugins" "$OUT" </dev/null \
    || die "building the Rust plugins failed"
}

main() {
  [ $# = 0 ] || die "no arguments expected (configure with WARREN_PLUGIN_DIR, WARREN_PLUGINS_TARGET_DIR)"
  mkdir -p "$OUT"
  local start=$SECONDS lang files f hdr count=0
  for lang in "${LANGUAGES[@]}"; do
    files=$("build_$lang")
    [ -n "$files" ] || die "$lang: no components built"
    while IFS= read -r f; do
      hdr=$(head -c 8 "$f" | od -An -tx1 | tr -d ' \n')
      [ "$hdr" = "$COMPONENT_HDR" ] || die "$f is not a WebAssembly component (header $hdr)"
      printf '%-12s %-6s %9d bytes  %s\n' "$(basename "$f" .wasm)" "$lang" "$(wc -c <"$f")" "$f"
      count=$((count + 1))
    done <<<"$files"
  done
  log "$count plugins in $OUT ($((SECONDS - start))s)"
}

main "$@"

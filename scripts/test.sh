#!/usr/bin/env bash
# Runs lb's whole test suite on a fresh machine: installs what the tests need and is missing
# (Debian's `prometheus` package for promtool and the Prometheus server, `haproxy` and `nginx`
# to put in front of lb, `systemd` for systemd-socket-activate, `chromium` to load the status
# page, npm packages for the Node.js tests), checks formatting and lints, runs every test, then
# the chaos soak.
#
# The closing line counts every test binary: a binary that crashed or did not compile counts as a
# failure, a test that could not run here (e.g. no IPv6) counts as skipped, not passed, and the
# whole run is bounded by LB_TEST_TIMEOUT seconds (default 1200) so a hang fails instead of
# stalling CI.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
command -v prlimit >/dev/null 2>&1 && command -v unshare >/dev/null 2>&1 || missing+=(util-linux)
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || missing+=(libnginx-mod-stream)
command -v systemd-socket-activate >/dev/null 2>&1 || missing+=(systemd)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing ${missing[*]} (apt-get)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

echo "==> npm packages for the Node.js tests"
npm ci --prefix examples/node --no-audit --no-fund --loglevel=error

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --all-targets --quiet -- -D warnings

# The in-place upgrade test replaces lb's binary with a build whose version differs: the same
# sources with LB_VERSION set, built first (cargo then rebuilds the plain one for the tests;
# only lb itself compiles twice).
echo "==> the next lb build (for the in-place upgrade test)"
LB_VERSION="$(cargo pkgid | sed 's/.*[#@]//')+next" cargo build --quiet --bin lb
mkdir -p target/lb-next
cp target/debug/lb target/lb-next/lb
export LB_NEXT_BIN="$PWD/target/lb-next/lb"

# The release binary (the soak's, and what the .deb test packages) and cargo-deb, before the
# tests that use them.
echo "==> the release build and cargo-deb"
cargo build --release --quiet --bin lb
command -v cargo-deb >/dev/null 2>&1 || cargo install cargo-deb --locked --quiet

echo "==> cargo test"
log=$(mktemp)
skips=$(mktemp)
trap 'rm -f "$log" "$skips"' EXIT
export LB_TEST_SKIP_LOG="$skips"
limit=${LB_TEST_TIMEOUT:-1200}
status=0
# `timeout` signals its whole process group, so test binaries and the lb processes they started
# go too.
timeout --kill-after=10 "$limit" cargo test --all-targets --no-fail-fast 2>&1 | tee "$log" || status=$?
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
  echo "error: the test run did not finish within ${limit}s" | tee -a "$log"
fi
doc_status=0
timeout --kill-after=10 300 cargo test --doc 2>&1 | tee -a "$log" || doc_status=$?
[ "$status" -ne 0 ] || status=$doc_status

# The chaos soak (benches/soak.py): the release binary under mixed load and random faults, with
# every invariant checked; once with the built-in worker behind PROXY headers, once with a Node
# cluster app.
# LB_SOAK_SECONDS sets the length of each (0 skips them).
soak_seconds=${LB_SOAK_SECONDS:-75}
soak_passed=0
soak_failed=0
if [ "$soak_seconds" != 0 ]; then
  echo "==> chaos soak (${soak_seconds}s each)"
  if cargo build --release --quiet --bin lb 2>&1 | tee -a "$log"; then
    for worker in builtin cluster; do
      if timeout --kill-after=10 $((soak_seconds * 2 + 120)) \
        python3 benches/soak.py --worker "$worker" --seconds "$soak_seconds" --progress 30 \
          $( [ "$worker" = builtin ] && echo --proxy ) \
          --seed "${LB_SOAK_SEED:-$(date +%j)}"; then
        soak_passed=$((soak_passed + 1))
      else
        soak_failed=$((soak_failed + 1))
        status=1
      fi
    done
  else
    soak_failed=1
    status=1
  fi
fi

if [ -s "$skips" ]; then
  echo "==> skipped"
  sed 's/^/  /' "$skips"
fi
# One closing line with the totals over every test binary. cargo names each target that failed
# (`to rerun pass ...`, or one line per target under `error: N targets failed:`); one that failed
# with no `test result: FAILED` line crashed or was killed: one failure each. A compile error is
# one failure. A non-zero exit with nothing counted as failed is one failure too.
awk -v skipped="$(wc -l <"$skips")" -v status="$status" -v soak_passed="$soak_passed" \
  -v soak_failed="$soak_failed" -f scripts/count-tests.awk "$log"
exit "$status"

#!/usr/bin/env bash
# Reproduces the README's performance table: builds lb and the load generator, installs the
# peers it compares against (nginx, HAProxy from Debian; npm packages), then runs
# benches/compare.py (all configurations, interleaved). Extra arguments go to compare.py,
# e.g. `benches/run.sh --rounds 5` or `benches/run.sh --only lb-sticky,direct`.
set -euo pipefail
cd "$(dirname "$0")/.."
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
missing=()
command -v nginx >/dev/null 2>&1 || missing+=(nginx)
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
if [ ${#missing[@]} -gt 0 ]; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
npm ci --prefix examples/node --no-audit --no-fund --loglevel=error
cargo build --release --bin lb --example loadgen
exec python3 benches/compare.py "$@"

#!/usr/bin/env bash
# socket.io's documented cluster app behind lb (with and without sid peeking) and behind its own
# primary: builds lb, installs the npm packages, runs benches/sticky.py (extra arguments go to it,
# e.g. `benches/sticky.sh --rounds 5`).
set -euo pipefail
cd "$(dirname "$0")/.."
npm ci --prefix examples/node --no-audit --no-fund --loglevel=error
cargo build --release --bin lb
exec python3 benches/sticky.py "$@"

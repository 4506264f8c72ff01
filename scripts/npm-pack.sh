#!/usr/bin/env bash
# Builds lb's npm packages from the release binary into target/npm/ (nothing is published):
#   target/npm/lb-sticky-<version>.tgz                 the `lb` command (a small Node wrapper)
#   target/npm/lb-sticky-linux-x64-gnu-<version>.tgz   the binary, for linux/x64/glibc
# The wrapper lists the platform package in optionalDependencies; npm installs it only where
# its os/cpu/libc fields match (no postinstall download: works offline, --ignore-scripts too).
#   npm install --save-dev ./target/npm/lb-sticky-*.tgz    then: npx lb -- node app.js
set -euo pipefail
cd "$(dirname "$0")/.."
# LB_NPM_BINARY: package this lb instead of building the release one; LB_NPM_OUT: where to.
version=$(cargo pkgid | sed 's/.*[#@]//')
bin=${LB_NPM_BINARY:-}
if [ -z "$bin" ]; then
  cargo build --release --quiet --bin lb
  bin=target/release/lb
fi
out=${LB_NPM_OUT:-target/npm}
rm -rf "$out"
mkdir -p "$out/wrapper/bin" "$out/linux-x64-gnu/bin"

cp npm/lb.js npm/resolve.js "$out/wrapper/bin/"
chmod 755 "$out/wrapper/bin/lb.js"
cp README.md "$out/wrapper/"
cat > "$out/wrapper/package.json" <<JSON
{
  "name": "lb-sticky",
  "version": "$version",
  "description": "lb: a sticky-session load balancer for Node.js apps (WebSocket, socket.io) that passes connections to workers, not bytes",
  "license": "MIT OR Apache-2.0",
  "bin": { "lb": "bin/lb.js" },
  "files": ["bin/", "README.md"],
  "engines": { "node": ">=16" },
  "os": ["linux"],
  "optionalDependencies": { "@lb-sticky/linux-x64-gnu": "$version" }
}
JSON

install -m 755 "$bin" "$out/linux-x64-gnu/bin/lb"
strip "$out/linux-x64-gnu/bin/lb" 2>/dev/null || true
cat > "$out/linux-x64-gnu/package.json" <<JSON
{
  "name": "@lb-sticky/linux-x64-gnu",
  "version": "$version",
  "description": "The lb binary for Linux x64 (glibc), used by the lb-sticky package",
  "license": "MIT OR Apache-2.0",
  "files": ["bin/lb"],
  "os": ["linux"],
  "cpu": ["x64"],
  "libc": ["glibc"]
}
JSON

(cd "$out" && npm pack --silent ./wrapper ./linux-x64-gnu >/dev/null)
ls -1 "$out"/*.tgz

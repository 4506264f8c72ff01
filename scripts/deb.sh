#!/usr/bin/env bash
# Builds lb's Debian package with `cargo deb` (installs cargo-deb if missing) into
# target/debian/: /usr/bin/lb, the man pages (lb(1) and one per subcommand), bash/zsh/fish
# completions, lb.service and lb.socket (installed, not enabled), /etc/lb/lb.toml.
#   sudo apt install ./target/debian/lb_*.deb
# LB_DEB_NO_BUILD=1 packages the release binary already in target/release/lb.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null 2>&1 || cargo install cargo-deb --locked --quiet
[ "${LB_DEB_NO_BUILD:-}" = 1 ] || cargo build --release --quiet --bin lb
lb=target/release/lb
assets=target/deb-assets
rm -rf "$assets"
mkdir -p "$assets/man" "$assets/completions"
"$lb" manpage --dir "$assets/man" >/dev/null
gzip -9n "$assets"/man/*.1
"$lb" completions bash > "$assets/completions/lb.bash"
"$lb" completions zsh > "$assets/completions/_lb"
"$lb" completions fish > "$assets/completions/lb.fish"
# The unit as shipped, with the binary where the package puts it.
sed 's|/usr/local/bin/lb|/usr/bin/lb|g' config/lb.service > "$assets/lb.service"
cargo deb --no-build --strip --quiet --output target/debian/
ls -1 target/debian/*.deb

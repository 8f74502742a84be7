#!/usr/bin/env bash
# Installs the cargo tools the packaging needs, when missing, with
# `cargo install --locked` (crates.io): cargo-deb for `make deb`.
#   scripts/install-tools.sh cargo-deb ...
set -euo pipefail
for tool in "$@"; do
  if ! command -v "$tool" >/dev/null 2>&1 && [ ! -x "${CARGO_HOME:-$HOME/.cargo}/bin/$tool" ]; then
    echo "install-tools: installing $tool (cargo install --locked)" >&2
    cargo install --locked --quiet "$tool"
  fi
done

#!/usr/bin/env bash
# Installs the build tools the packaging needs, when missing:
#   cargo-deb                       `cargo install --locked` (crates.io)
#   cargo-zigbuild                  with Zig, from the Python package index
#                                   (ziglang), in a venv of their own
#   scripts/install-tools.sh cargo-deb cargo-zigbuild
# Prints nothing on success; for cargo-zigbuild, put "$(scripts/install-tools.sh
# --zig-path)" first in PATH to find it and its zig.
set -euo pipefail

# Pinned: a new Zig or cargo-zigbuild must not change what `make build`
# makes without a commit saying so.
ZIGLANG_VERSION=0.17.1
CARGO_ZIGBUILD_VERSION=0.24.1
venv="${PACKUILON_TOOLS_VENV:-${XDG_DATA_HOME:-$HOME/.local/share}/packuilon/tools-venv}"

if [ "${1:-}" = "--zig-path" ]; then
  echo "$venv/bin"
  exit 0
fi

for tool in "$@"; do
  case "$tool" in
    cargo-zigbuild)
      if [ ! -x "$venv/bin/cargo-zigbuild" ] || ! "$venv/bin/python" -m ziglang version >/dev/null 2>&1; then
        echo "install-tools: installing cargo-zigbuild $CARGO_ZIGBUILD_VERSION and Zig $ZIGLANG_VERSION (pip, in $venv)" >&2
        python3 -m venv "$venv" || {
          echo "install-tools: 'python3 -m venv' failed: install python3-venv (Debian) or python3 (EL)" >&2
          exit 1
        }
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
          "ziglang==$ZIGLANG_VERSION" "cargo-zigbuild==$CARGO_ZIGBUILD_VERSION"
      fi
      ;;
    *)
      if ! command -v "$tool" >/dev/null 2>&1 && [ ! -x "${CARGO_HOME:-$HOME/.cargo}/bin/$tool" ]; then
        echo "install-tools: installing $tool (cargo install --locked)" >&2
        cargo install --locked --quiet "$tool"
      fi
      ;;
  esac
done

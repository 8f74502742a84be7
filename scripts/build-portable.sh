#!/usr/bin/env bash
# `make build`: the release binaries every package carries, built once:
# linked against glibc 2.28 (EL8) so the same files run on EL8, EL9 and
# Debian 12 (cargo-zigbuild links with Zig against that glibc's symbol
# versions), then stripped into target/portable/bin. The .deb, the RPM and
# `make dist` all take their binaries from there.
set -euo pipefail
cd "$(dirname "$0")/.."

GLIBC=2.28
TRIPLE=x86_64-unknown-linux-gnu
BINS=(cdb2rabbit rabbit2packer rename-old-images)

scripts/install-tools.sh cargo-zigbuild
PATH="$(scripts/install-tools.sh --zig-path):$PATH"
# cargo-zigbuild finds Zig as `python3 -m ziglang` of the venv above.
cargo zigbuild --release --workspace --exclude xtask --bins --target "$TRIPLE.$GLIBC" "$@"

out=target/portable/bin
mkdir -p "$out"
for b in "${BINS[@]}"; do
  # Written beside, then renamed: a package build never takes half a file.
  strip --strip-all -o "$out/.$b.tmp" "target/$TRIPLE/release/$b"
  mv -f "$out/.$b.tmp" "$out/$b"
done

# The promise, checked where it is made: no symbol newer than glibc $GLIBC.
newest=$(objdump -T "${BINS[@]/#/$out/}" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)
if [ "$(printf '%s\n%s\n' "$newest" "$GLIBC" | sort -V | tail -1)" != "$GLIBC" ]; then
  echo "build-portable: the binaries need glibc $newest, newer than $GLIBC" >&2
  exit 1
fi
echo "build-portable: ${BINS[*]} in $out (glibc >= $GLIBC; newest symbol GLIBC_$newest)" >&2

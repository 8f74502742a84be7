#!/usr/bin/env bash
# `make bench`: the benchmarks whose figures are in README.md. Each prints a
# markdown table. Needs the shared RabbitMQ (make services) and starts a
# private Keystone + Glance for the rotation benchmark.
#   scripts/bench.sh [cdb2rabbit|rabbit2packer|glance-rotate]...   (default: all)
# CDB2RABBIT_BENCH_BEFORE=REV (e.g. 21dad37, main before the #11 reshape of
# cdb2rabbit): the cdb2rabbit bench also measures that commit's cdb2rabbit, in
# the same run and against the same servers (built once, release, into
# target/bench-before/REV; its source is a `git archive` of REV).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${CDB2RABBIT_BENCH_BEFORE:-}" ] && [ -z "${CDB2RABBIT_BENCH_BEFORE_BIN:-}" ]; then
  rev=$(git rev-parse --short "$CDB2RABBIT_BENCH_BEFORE^{commit}")
  before="$PWD/target/bench-before/$rev"
  if [ ! -x "$before/release/cdb2rabbit" ]; then
    rm -rf "$before/src" && mkdir -p "$before/src"
    git archive "$rev" | tar -x -C "$before/src"
    echo "building cdb2rabbit of $rev (once) in $before" >&2
    (cd "$before/src" && CARGO_TARGET_DIR="$before" cargo build -q --release --locked -p cdb2rabbit --bin cdb2rabbit)
  fi
  export CDB2RABBIT_BENCH_BEFORE_BIN="$before/release/cdb2rabbit" CDB2RABBIT_BENCH_BEFORE_REV="$rev"
fi
benches=("$@")
[ ${#benches[@]} -gt 0 ] || benches=(cdb2rabbit rabbit2packer glance-rotate)

for b in "${benches[@]}"; do
  if [ "$b" = glance-rotate ] && [ -z "${PACKUILON_TEST_OPENRC:-}" ]; then
    os_state=$(mktemp -d /tmp/packuilon-bench-openstack.XXXXXX)
    trap 'scripts/openstack-down.sh "$os_state" >/dev/null 2>&1 || true; rm -rf "$os_state"' EXIT
    read -r kport gport < <(scripts/free-ports.sh 2)
    scripts/openstack-up.sh "$os_state" "$kport" "$gport" >&2
    export PACKUILON_TEST_OPENRC="$os_state/admin-openrc.sh"
  fi
  # rabbit2packer's status bench loads the page in headless Chromium; its
  # site bench starts a private PostgreSQL (Debian's postgresql).
  if [ "$b" = rabbit2packer ]; then scripts/install-packages.sh chromium chromium-driver postgresql; fi
  echo "== $b"
  cargo bench -q -p "$b"
done

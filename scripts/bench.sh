#!/usr/bin/env bash
# `make bench`: the benchmarks whose figures are in README.md. Each prints a
# markdown table. Needs the shared RabbitMQ (make services) and starts a
# private Keystone + Glance for the rotation benchmark.
#   scripts/bench.sh [cdb2rabbit|rabbit2packer|glance-rotate]...   (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
benches=("$@")
[ ${#benches[@]} -gt 0 ] || benches=(cdb2rabbit rabbit2packer glance-rotate)

for b in "${benches[@]}"; do
  if [ "$b" = glance-rotate ] && [ -z "${PACKUILON_TEST_OPENRC:-}" ]; then
    free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
    os_state=$(mktemp -d /tmp/packuilon-bench-openstack.XXXXXX)
    trap 'scripts/openstack-down.sh "$os_state" >/dev/null 2>&1 || true; rm -rf "$os_state"' EXIT
    scripts/openstack-up.sh "$os_state" "$(free_port)" "$(free_port)" >&2
    export PACKUILON_TEST_OPENRC="$os_state/admin-openrc.sh"
  fi
  # rabbit2packer's status bench loads the page in headless Chromium.
  if [ "$b" = rabbit2packer ]; then scripts/install-packages.sh chromium chromium-driver; fi
  echo "== $b"
  cargo bench -q -p "$b"
done

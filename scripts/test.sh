#!/usr/bin/env bash
# `make test` (what CI runs): installs and starts what the tests need, builds
# the binaries, runs every test, and stops what it started.
#   - RabbitMQ: the shared node on 127.0.0.1:5672 (left running, as a
#     developer's machine would have it); tests that restart a broker start
#     private nodes of their own.
#   - Keystone + Glance: one private deployment for this run, on free
#     loopback ports, state in a temp dir, stopped and removed at the end.
#     Tests find it through PACKUILON_TEST_OPENRC.
#   - Packer: Debian's packer (null builder; no cloud needed).
#   - The packages: `make deb rpm dist` (one portable build, glibc 2.28, for
#     all three; cargo-zigbuild and cargo-deb are installed when missing), named in PACKUILON_TEST_DEB, _RPM and _DIST.
#     tests/package.rs checks the .deb with lintian and installs, upgrades
#     and purges it here; tests/rpm.rs checks the RPM with rpm and rpmlint;
#     tests/syslog.rs starts its own rsyslogd.
#   - PostgreSQL: Debian's postgresql package; the site journal's tests start
#     private clusters (packuilon-testsupport's postgres module).
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS

scripts/install-packages.sh
# The packages' tests: lintian, man, systemd-analyze, dpkg-shlibdeps,
# rsyslogd; rpm, rpm2cpio, rpmlint, cpio, objdump; python3-venv for Zig.
scripts/install-packages.sh lintian man-db systemd dpkg-dev rsyslog rpm rpm2cpio rpmlint cpio binutils python3-venv
# Alerts, metrics and the status page: promtool (check metrics/rules), a
# real SMTP server (aiosmtpd), util-linux's setpriv (control commands
# refused to nobody), headless Chromium over WebDriver.
scripts/install-packages.sh prometheus python3-aiosmtpd util-linux chromium chromium-driver
# The shared site journal: Debian's PostgreSQL binaries (initdb, pg_ctl). Only
# the package: its own cluster is never started (policy-rc.d, see
# install-packages.sh); each test file starts a private cluster in a temp dir.
scripts/install-packages.sh postgresql
scripts/rabbitmq-up.sh

os_state=$(mktemp -d /tmp/packuilon-test-openstack.XXXXXX)
cleanup() {
  scripts/openstack-down.sh "$os_state" >/dev/null 2>&1 || true
  rm -rf "$os_state" "$os_state.up.log"
}
trap cleanup EXIT
read -r kport gport < <(scripts/free-ports.sh 2)
# Bring Keystone and Glance up in the background while cargo builds.
scripts/openstack-up.sh "$os_state" "$kport" "$gport" > "$os_state.up.log" 2>&1 &
os_pid=$!

cargo build --workspace --bins --tests
make -s deb rpm dist
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
export PACKUILON_TEST_DEB="$PWD/target/debian/packuilon_${version}_amd64.deb"
export PACKUILON_TEST_RPM="$PWD/target/rpm/packuilon-${version}-1.x86_64.rpm"
export PACKUILON_TEST_DIST="$PWD/target/dist/packuilon-${version}-x86_64-linux.tar.gz"

if ! wait "$os_pid"; then
  cat "$os_state.up.log" >&2
  echo "test: Keystone/Glance did not start" >&2
  exit 1
fi
rm -f "$os_state.up.log"
export PACKUILON_TEST_OPENRC="$os_state/admin-openrc.sh"

# Doc tests are skipped: there are none, and their empty "0 passed" lines
# would end the output. The last line sums every test binary's result.
log=$(mktemp /tmp/packuilon-test-log.XXXXXX)
status=0
cargo test --workspace --no-fail-fast --lib --bins --tests 2>&1 | tee "$log" || status=$?
summary=$(awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;/) p += $i; if ($(i+1) ~ /^failed;/) f += $i } }
               END { printf "%d passed, %d failed", p, f }' "$log")
rm -f "$log"
if [ "$status" != 0 ]; then
  # What Keystone and Glance said, so a failure against them can be read from CI's output.
  for f in "$os_state"/logs/*; do
    [ -f "$f" ] || continue
    echo "--- last lines of $(basename "$f") (errors and warnings)" >&2
    grep -aiE 'error|warn|traceback|exception|signal|respawn|closed' "$f" | tail -n 25 >&2 || true
  done
fi
echo "test: finished in $((SECONDS - t0)) s (exit $status)"
echo "tests: $summary"
exit $status

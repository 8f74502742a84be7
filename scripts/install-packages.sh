#!/usr/bin/env bash
# Installs the Debian packages Packuilon's tests and demo need, when missing:
# rabbitmq-server, packer, keystone, glance-api (and uwsgi to serve Keystone;
# socat and openssl for the TLS test of rename-old-images).
# Services are installed but never started by the package scripts: the
# project's own scripts start private instances on loopback.
set -euo pipefail

want=("$@")
[ ${#want[@]} -gt 0 ] || want=(rabbitmq-server packer keystone glance-api uwsgi uwsgi-plugin-python3 curl socat openssl)

missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "install-packages: need root to install: ${missing[*]}" >&2
  exit 1
fi

echo "install-packages: installing ${missing[*]}" >&2
# Package scripts must not start services (no systemd here, and tests run
# private instances): policy-rc.d exiting 101 forbids it.
restore_policy=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  restore_policy=1
fi
trap '[ -n "$restore_policy" ] && rm -f /usr/sbin/policy-rc.d' EXIT

# Keystone and Glance must not try to configure databases or endpoints.
debconf-set-selections <<'SEL'
keystone keystone/configure_db boolean false
keystone keystone/create-admin-tenant boolean false
keystone keystone/register-endpoint boolean false
glance-common glance/configure_db boolean false
glance-common glance/configure_rabbit boolean false
glance-common glance/configure_ksat boolean false
glance-api glance/configure_api-endpoint boolean false
SEL

export DEBIAN_FRONTEND=noninteractive
# Waits for another apt run (a second make target, a test) instead of failing.
apt=(apt-get -o DPkg::Lock::Timeout=600)
if ! "${apt[@]}" install -y --no-install-recommends "${missing[@]}"; then
  "${apt[@]}" update
  "${apt[@]}" install -y --no-install-recommends "${missing[@]}"
fi

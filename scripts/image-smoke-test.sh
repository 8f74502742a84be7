#!/bin/bash
# image-smoke-test.sh: an example TEST_COMMAND for rabbit2packer's test gate.
#
# Boots a server from the new image with the openstack CLI, waits for it to
# be ACTIVE and for a login prompt in its console log, and deletes the
# server whatever happens. Exit 0: the image boots; 1: it does not (the image
# is then renamed BROKEN_NAME and the live image is left alone); 2: this
# script is not set up (no openstack CLI, no flavor or network).
#
# rabbit2packer runs it through bash with PACKER_AUTH_FILE sourced (OS_*),
# and with PACKUILON_IMAGE_ID (the image to test, private, named
# STAGED_NAME meanwhile), PACKUILON_IMAGE_NAME (its live name),
# PACKUILON_IMAGE_KEY and PACKUILON_JOB. Its output goes into the build log.
#
# config.ini:
#   TEST_COMMAND = SMOKE_FLAVOR=m1.small SMOKE_NETWORK=private /usr/share/packuilon/image-smoke-test.sh
#   TEST_TIMEOUT = 30m
#
# Settings (environment):
#   SMOKE_FLAVOR     flavor to boot with (required)
#   SMOKE_NETWORK    network to attach (required)
#   SMOKE_LOGIN      what in the console log means "booted" (default: "login:")
#   SMOKE_BOOT_TIMEOUT  seconds to wait for ACTIVE and the prompt (default 900)
#   SMOKE_KEEP       set to keep a server that failed, for a look (default: delete)
set -uo pipefail

image=${PACKUILON_IMAGE_ID:-}
flavor=${SMOKE_FLAVOR:-}
network=${SMOKE_NETWORK:-}
login=${SMOKE_LOGIN:-login:}
timeout=${SMOKE_BOOT_TIMEOUT:-900}

say() { printf 'image-smoke-test: %s\n' "$*"; }
fail_setup() { say "$*"; exit 2; }

[ -n "$image" ] || fail_setup "PACKUILON_IMAGE_ID is not set (run by rabbit2packer as TEST_COMMAND)"
[ -n "$flavor" ] || fail_setup "SMOKE_FLAVOR is not set (the flavor to boot the image with)"
[ -n "$network" ] || fail_setup "SMOKE_NETWORK is not set (the network to attach the server to)"
case "$timeout" in '' | *[!0-9]*) fail_setup "SMOKE_BOOT_TIMEOUT must be a number of seconds, got '$timeout'" ;; esac
command -v openstack >/dev/null || fail_setup "the openstack CLI is not installed (python3-openstackclient)"

# A name that says what it is, unique per job and image.
server="packuilon-smoke-${PACKUILON_JOB:-0}-${image:0:8}"
server_id=""
cleanup() {
  if [ -n "$server_id" ]; then
    if [ -n "${SMOKE_KEEP:-}" ] && [ "${ok:-0}" != 1 ]; then
      say "SMOKE_KEEP: leaving server $server_id for a look"
    else
      openstack server delete --wait "$server_id" >/dev/null 2>&1 \
        || say "could not delete server $server_id; delete it by hand"
    fi
  fi
}
trap cleanup EXIT
# rabbit2packer interrupts the test's process group on a stop or TEST_TIMEOUT: clean up then too.
trap 'say "interrupted"; exit 1' INT TERM

say "booting $server from image $image (${PACKUILON_IMAGE_NAME:-?}), flavor $flavor, network $network"
server_id=$(openstack server create --image "$image" --flavor "$flavor" --network "$network" \
  -f value -c id "$server") || { say "server create failed"; exit 1; }
say "server $server_id created"

deadline=$((SECONDS + timeout))
status=""
while [ $SECONDS -lt $deadline ]; do
  status=$(openstack server show -f value -c status "$server_id" 2>/dev/null) || status="?"
  case "$status" in
    ACTIVE) break ;;
    ERROR)
      say "server went to ERROR:"
      openstack server show -f value -c fault "$server_id" 2>/dev/null | head -c 2000
      exit 1 ;;
  esac
  sleep 10
done
[ "$status" = ACTIVE ] || { say "server not ACTIVE after ${timeout}s (last status: $status)"; exit 1; }
say "server ACTIVE; waiting for \"$login\" in its console log"

while [ $SECONDS -lt $deadline ]; do
  if openstack console log show "$server_id" 2>/dev/null | grep -qF -- "$login"; then
    ok=1
    say "login prompt seen: image $image boots"
    exit 0
  fi
  sleep 15
done
say "no \"$login\" in the console log after ${timeout}s; its last lines:"
openstack console log show --lines 40 "$server_id" 2>/dev/null | tr -cd '\11\12\15\40-\176'
exit 1

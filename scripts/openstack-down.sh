#!/usr/bin/env bash
# Stops the private Keystone + Glance that scripts/openstack-up.sh started
# under STATE_DIR. Idempotent; state stays (the next openstack-up.sh reuses it).
#
#   scripts/openstack-down.sh STATE_DIR
#
# Only processes of STATE_DIR's pid files are signalled: each pid file holds
# a session/process-group leader (openstack-up.sh starts them with setsid), and
# a process counts only if it is in that group and its command line names
# STATE_DIR. TERM first; KILL after ~10 s.
set -euo pipefail

[ $# -eq 1 ] || { echo "usage: $0 STATE_DIR" >&2; exit 2; }
if [ ! -d "$1" ]; then
  echo "openstack-down: $1: no such directory, nothing to stop"
  exit 0
fi
DIR=$(cd "$1" && pwd)

# members PGID: live (non-zombie) processes of group PGID that belong to DIR.
members() {
  ps -e -o pid=,pgid=,stat=,args= 2>/dev/null |
    awk -v g="$1" -v d="$DIR/" '$2 == g && $3 !~ /^Z/ && index($0, d) { print $1 }'
}

# wait_gone PGID TENTHS: until no member is left, at most TENTHS/10 s.
wait_gone() {
  local i
  for ((i = 0; i < $2; i++)); do
    [ -z "$(members "$1")" ] && return 0
    sleep 0.1
  done
  [ -z "$(members "$1")" ]
}

stop_one() { # stop_one NAME PIDFILE
  local name=$1 pidf=$2 pid procs
  [ -f "$pidf" ] || { echo "openstack-down: $name: not running (no pid file)"; return 0; }
  pid=$(cat "$pidf")
  if ! [[ $pid =~ ^[0-9]+$ ]]; then
    rm -f "$pidf"
    echo "openstack-down: $name: bad pid file removed"
    return 0
  fi
  procs=$(members "$pid")
  if [ -z "$procs" ]; then
    rm -f "$pidf"
    echo "openstack-down: $name: not running"
    return 0
  fi
  # TERM the leader (uwsgi runs with --die-on-term, so its master stops the
  # workers); if the leader is gone, TERM whatever is left of its group.
  if grep -qx "$pid" <<<"$procs"; then
    kill -TERM "$pid" 2>/dev/null || true
  else
    # shellcheck disable=SC2086
    kill -TERM $procs 2>/dev/null || true
  fi
  if ! wait_gone "$pid" 100; then
    procs=$(members "$pid")
    echo "openstack-down: $name: still running after 10 s, sending KILL to $(echo $procs)" >&2
    # shellcheck disable=SC2086
    [ -z "$procs" ] || kill -KILL $procs 2>/dev/null || true
    wait_gone "$pid" 50 || { echo "openstack-down: $name: could not stop pid(s) $(members "$pid" | tr '\n' ' ')" >&2; return 1; }
  fi
  rm -f "$pidf"
  echo "openstack-down: $name: stopped"
}

rc=0
stop_one glance-api "$DIR/glance-api.pid" || rc=1
stop_one keystone "$DIR/keystone.pid" || rc=1
exit "$rc"

#!/usr/bin/env bash
# Brings up a private Keystone + Glance on 127.0.0.1, all state under STATE_DIR.
#
#   scripts/openstack-up.sh STATE_DIR [KEYSTONE_PORT] [GLANCE_PORT]   (5000 / 9292)
#
# Env: OS_ADMIN_PASSWORD (default admin-secret) - the Keystone admin password,
#      fixed when STATE_DIR is first initialised.
#
# First run initialises STATE_DIR (configs, sqlite DBs in WAL mode, fernet and
# credential keys, glance store dirs, keystone bootstrap, image service and
# endpoint in the catalog). Later runs reuse it and only start what is not
# running; if both services already answer it exits 0 at once.
# Ends with STATE_DIR/admin-openrc.sh. Stop with scripts/openstack-down.sh.
# Needs the Debian packages keystone glance-api uwsgi uwsgi-plugin-python3 curl
# (scripts/install-packages.sh).
set -euo pipefail

usage() { echo "usage: $0 STATE_DIR [KEYSTONE_PORT] [GLANCE_PORT]" >&2; exit 2; }
[ $# -ge 1 ] && [ $# -le 3 ] || usage

t0=$(date +%s.%N)
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PY=/usr/bin/python3   # the system python the OpenStack packages use (not a pyenv shim)

mkdir -p "$1"
DIR=$(cd "$1" && pwd)
LOGS=$DIR/logs
DEPLOY_ENV=$DIR/deployment.env
MARKER=$DIR/.initialised
K_PID=$DIR/keystone.pid
G_PID=$DIR/glance-api.pid
K_CONF=$DIR/keystone.conf
G_CONF=$DIR/glance-api.conf
K_LOG=$LOGS/keystone.log
K_OUT=$LOGS/keystone-uwsgi.log
G_LOG=$LOGS/glance-api.log
G_OUT=$LOGS/glance-api.out

elapsed() { awk -v a="$(date +%s.%N)" -v b="$t0" 'BEGIN{printf "%.1f", a-b}'; }
err() { echo "openstack-up: $*" >&2; }
# die MESSAGE [LOGFILE...]: message and the tail of each log on stderr.
die() {
  local msg=$1; shift
  err "ERROR: $msg"
  local f
  for f in "$@"; do
    if [ -s "$f" ]; then
      echo "----- last lines of $f -----" >&2
      tail -n 40 "$f" >&2
    fi
  done
  exit 1
}

for b in keystone-manage glance-manage glance-api uwsgi curl "$PY"; do
  command -v "$b" >/dev/null || die "$b not found (run scripts/install-packages.sh)"
done
[ -e /usr/lib/uwsgi/plugins/python3_plugin.so ] || die "uwsgi-plugin-python3 not installed (run scripts/install-packages.sh)"
[ -x /usr/bin/keystone-wsgi-public ] || die "/usr/bin/keystone-wsgi-public missing (package keystone)"

# ---- ports and password: from the arguments, or recorded in an existing deployment
if [ -f "$MARKER" ] && [ -f "$DEPLOY_ENV" ]; then
  # shellcheck source=/dev/null
  . "$DEPLOY_ENV"   # KEYSTONE_PORT GLANCE_PORT ADMIN_PASSWORD
  if [ $# -ge 2 ] && [ "$2" != "$KEYSTONE_PORT" ]; then
    die "$DIR was initialised for Keystone port $KEYSTONE_PORT, not $2 (use a new STATE_DIR)"
  fi
  if [ $# -ge 3 ] && [ "$3" != "$GLANCE_PORT" ]; then
    die "$DIR was initialised for Glance port $GLANCE_PORT, not $3 (use a new STATE_DIR)"
  fi
  if [ -n "${OS_ADMIN_PASSWORD:-}" ] && [ "$OS_ADMIN_PASSWORD" != "$ADMIN_PASSWORD" ]; then
    die "$DIR was bootstrapped with another admin password than OS_ADMIN_PASSWORD"
  fi
  fresh=""
else
  KEYSTONE_PORT=${2:-5000}
  GLANCE_PORT=${3:-9292}
  ADMIN_PASSWORD=${OS_ADMIN_PASSWORD:-admin-secret}
  fresh=1
fi
for p in "$KEYSTONE_PORT" "$GLANCE_PORT"; do
  [[ $p =~ ^[0-9]+$ ]] && [ "$p" -ge 1 ] && [ "$p" -le 65535 ] || die "bad port: $p"
done
[ "$KEYSTONE_PORT" != "$GLANCE_PORT" ] || die "Keystone and Glance need different ports"

K_URL=http://127.0.0.1:$KEYSTONE_PORT
G_URL=http://127.0.0.1:$GLANCE_PORT

# ---- helpers
# alive PIDFILE: the process of PIDFILE runs and belongs to this STATE_DIR.
alive() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$DIR/"
}
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

json_str() { # JSON string literal of $1
  local s=$1
  s=${s//\\/\\\\}; s=${s//\"/\\\"}
  printf '"%s"' "$s"
}
AUTH_BODY='{"auth":{"identity":{"methods":["password"],"password":{"user":{"name":"admin","domain":{"name":"Default"},"password":'"$(json_str "$ADMIN_PASSWORD")"'}}},"scope":{"project":{"name":"admin","domain":{"name":"Default"}}}}}'

# get_token: prints a project-scoped admin token, fails if Keystone does not issue one.
get_token() {
  local hdrs tok
  hdrs=$(curl -sS -m 5 -o /dev/null -D - -H 'Content-Type: application/json' \
           -d "$AUTH_BODY" "$K_URL/v3/auth/tokens" 2>/dev/null) || return 1
  tok=$(printf '%s\n' "$hdrs" | tr -d '\r' | sed -n 's/^[Xx]-[Ss]ubject-[Tt]oken: *//p')
  [ -n "$tok" ] || return 1
  printf '%s' "$tok"
}
glance_ok() { # glance_ok TOKEN
  [ "$(curl -sS -m 5 -o /dev/null -w '%{http_code}' -H "X-Auth-Token: $1" "$G_URL/v2/images" 2>/dev/null)" = 200 ]
}

# wait_for WHAT PIDFILE LOG... -- COMMAND...: polls COMMAND (every 0.2 s, ~60 s).
wait_for() {
  local what=$1 pidf=$2; shift 2
  local logs=()
  while [ "$1" != -- ]; do logs+=("$1"); shift; done
  shift
  local deadline=$(( $(date +%s) + 60 ))
  until "$@"; do
    alive "$pidf" || die "$what exited during start-up" "${logs[@]}"
    [ "$(date +%s)" -lt "$deadline" ] || die "$what not ready after 60 s" "${logs[@]}"
    sleep 0.2
  done
}
token_ready() { TOKEN=$(get_token); }
glance_ready() { glance_ok "$TOKEN" || { token_ready && glance_ok "$TOKEN"; }; }

write_openrc() (
  umask 077
  {
    echo "# OpenStack RC file for the private deployment in $DIR"
    echo "export OS_AUTH_URL=$K_URL/v3"
    echo "export OS_USERNAME=admin"
    printf 'export OS_PASSWORD=%q\n' "$ADMIN_PASSWORD"
    echo "export OS_PROJECT_NAME=admin"
    echo "export OS_USER_DOMAIN_NAME=Default"
    echo "export OS_PROJECT_DOMAIN_NAME=Default"
    echo "export OS_IDENTITY_API_VERSION=3"
    echo "export OS_REGION_NAME=RegionOne"
    echo "export OS_INTERFACE=public"
  } >"$DIR/admin-openrc.sh.tmp"
  mv -f "$DIR/admin-openrc.sh.tmp" "$DIR/admin-openrc.sh"
)

# ---- already up? (idempotent fast path)
if [ -z "$fresh" ] && alive "$K_PID" && alive "$G_PID"; then
  if TOKEN=$(get_token) && glance_ok "$TOKEN"; then
    write_openrc
    echo "openstack-up: already running: Keystone $K_URL/v3, Glance $G_URL ($(elapsed) s)"
    exit 0
  fi
fi

# On failure or interruption after this run started a process, stop the
# deployment (logs stay in $LOGS).
started=()
cleanup_on_error() {
  local rc=$?
  if [ "$rc" -ne 0 ] && [ ${#started[@]} -gt 0 ]; then
    err "stopping $DIR (this run had started: ${started[*]})"
    "$here/openstack-down.sh" "$DIR" >&2 || true
  fi
}
trap cleanup_on_error EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- initialise STATE_DIR
init_state() {
  # Leftovers of an interrupted initialisation: stop them, start over.
  "$here/openstack-down.sh" "$DIR" >/dev/null
  rm -rf "$DIR/fernet-keys" "$DIR/credential-keys" "$DIR/images" "$DIR/staging" \
         "$DIR/tasks" "$DIR/lock" "$DIR"/keystone.sqlite* "$DIR"/glance.sqlite* \
         "$K_CONF" "$G_CONF" "$DEPLOY_ENV" "$DIR/admin-openrc.sh"
  mkdir -p "$LOGS" "$DIR/images" "$DIR/staging" "$DIR/tasks" "$DIR/lock"
  ( umask 077
    {
      printf 'KEYSTONE_PORT=%q\n' "$KEYSTONE_PORT"
      printf 'GLANCE_PORT=%q\n' "$GLANCE_PORT"
      printf 'ADMIN_PASSWORD=%q\n' "$ADMIN_PASSWORD"
    } >"$DEPLOY_ENV" )

  # No inline comments in oslo config files; '$' must be doubled in values.
  local cfg_pw=${ADMIN_PASSWORD//\$/\$\$}
  cat >"$K_CONF" <<EOF
[DEFAULT]
log_file = $K_LOG
use_stderr = false

[database]
connection = sqlite:///$DIR/keystone.sqlite

[token]
provider = fernet

[fernet_tokens]
key_repository = $DIR/fernet-keys

[fernet_receipts]
key_repository = $DIR/fernet-keys

[credential]
key_repository = $DIR/credential-keys
EOF
  ( umask 077
    cat >"$G_CONF" <<EOF
[DEFAULT]
bind_host = 127.0.0.1
bind_port = $GLANCE_PORT
workers = 0
enabled_backends = fs:file
log_file = $G_LOG
use_stderr = false
enforce_secure_rbac = false

[database]
connection = sqlite:///$DIR/glance.sqlite

[glance_store]
default_backend = fs

[fs]
filesystem_store_datadir = $DIR/images/

[os_glance_staging_store]
filesystem_store_datadir = $DIR/staging/

[os_glance_tasks_store]
filesystem_store_datadir = $DIR/tasks/

[keystone_authtoken]
www_authenticate_uri = $K_URL/v3
auth_url = $K_URL/v3
auth_type = password
username = admin
password = $cfg_pw
user_domain_name = Default
project_name = admin
project_domain_name = Default
interface = public
region_name = RegionOne

[paste_deploy]
flavor = keystone
config_file = /etc/glance/glance-api-paste.ini

[oslo_policy]
enforce_new_defaults = false
enforce_scope = false

[oslo_concurrency]
lock_path = $DIR/lock
EOF
  )

  # Both schemas at once (each is a few seconds of Python), then WAL.
  keystone-manage --config-file "$K_CONF" db_sync >>"$LOGS/keystone-manage.out" 2>&1 &
  local kpid=$!
  glance-manage --config-file "$G_CONF" db_sync >>"$LOGS/glance-manage.out" 2>&1 &
  local gpid=$!
  wait "$kpid" || die "keystone-manage db_sync failed" "$LOGS/keystone-manage.out" "$K_LOG"
  wait "$gpid" || die "glance-manage db_sync failed" "$LOGS/glance-manage.out" "$G_LOG"
  local db
  for db in "$DIR/keystone.sqlite" "$DIR/glance.sqlite"; do
    [ "$("$PY" -c 'import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute("PRAGMA journal_mode=WAL").fetchone()[0])' "$db")" = wal ] \
      || die "could not switch $db to WAL"
  done

  local u g
  u=$(id -un); g=$(id -gn)
  keystone-manage --config-file "$K_CONF" fernet_setup --keystone-user "$u" --keystone-group "$g" \
    >>"$LOGS/keystone-manage.out" 2>&1 || die "keystone-manage fernet_setup failed" "$LOGS/keystone-manage.out" "$K_LOG"
  keystone-manage --config-file "$K_CONF" credential_setup --keystone-user "$u" --keystone-group "$g" \
    >>"$LOGS/keystone-manage.out" 2>&1 || die "keystone-manage credential_setup failed" "$LOGS/keystone-manage.out" "$K_LOG"
  keystone-manage --config-file "$K_CONF" bootstrap \
    --bootstrap-password "$ADMIN_PASSWORD" \
    --bootstrap-username admin --bootstrap-project-name admin --bootstrap-role-name admin \
    --bootstrap-service-name keystone --bootstrap-region-id RegionOne \
    --bootstrap-public-url "$K_URL/v3/" \
    >>"$LOGS/keystone-manage.out" 2>&1 || die "keystone-manage bootstrap failed" "$LOGS/keystone-manage.out" "$K_LOG"
}

# register_image_service: service "image" + public endpoint, unless present.
register_image_service() {
  local out sid
  json_field() { # json_field KEY... < JSON: prints the value, or nothing if absent
    "$PY" -c '
import json, sys
d = json.load(sys.stdin)
try:
    for k in sys.argv[1:]:
        d = d[int(k)] if isinstance(d, list) else d[k]
    print(d)
except (IndexError, KeyError):
    pass' "$@"
  }
  out=$(curl -sS -m 10 -f -H "X-Auth-Token: $TOKEN" "$K_URL/v3/services?type=image") \
    || die "listing Keystone services failed" "$K_LOG"
  sid=$(printf '%s' "$out" | json_field services 0 id)
  if [ -z "$sid" ]; then
    out=$(curl -sS -m 10 -f -H "X-Auth-Token: $TOKEN" -H 'Content-Type: application/json' \
          -d '{"service":{"type":"image","name":"glance","description":"OpenStack Image service","enabled":true}}' \
          "$K_URL/v3/services") || die "creating the image service failed" "$K_LOG"
    sid=$(printf '%s' "$out" | json_field service id)
  fi
  out=$(curl -sS -m 10 -f -H "X-Auth-Token: $TOKEN" "$K_URL/v3/endpoints?service_id=$sid&interface=public") \
    || die "listing Keystone endpoints failed" "$K_LOG"
  if [ -z "$(printf '%s' "$out" | json_field endpoints 0 id)" ]; then
    curl -sS -m 10 -f -o /dev/null -H "X-Auth-Token: $TOKEN" -H 'Content-Type: application/json' \
      -d '{"endpoint":{"service_id":"'"$sid"'","interface":"public","region_id":"RegionOne","url":"'"$G_URL"'","enabled":true}}' \
      "$K_URL/v3/endpoints" || die "creating the image endpoint failed" "$K_LOG"
  fi
}

# Ports taken by someone else: fail before spending seconds on initialisation.
if ! alive "$K_PID" && port_busy "$KEYSTONE_PORT"; then
  die "port 127.0.0.1:$KEYSTONE_PORT is taken by another process"
fi
if ! alive "$G_PID" && port_busy "$GLANCE_PORT"; then
  die "port 127.0.0.1:$GLANCE_PORT is taken by another process"
fi

if [ -n "$fresh" ] || [ ! -f "$MARKER" ]; then
  echo "openstack-up: initialising $DIR (Keystone :$KEYSTONE_PORT, Glance :$GLANCE_PORT)"
  init_state
fi
mkdir -p "$LOGS"

# ---- start what is not running (setsid: own session and process group, so
# the pid file's pid is also the group id openstack-down.sh signals).
# uwsgi: --die-on-term (else TERM means "reload"); 'Connection: close' because
# --http-socket answers HTTP/1.1 without it yet closes the connection after each
# response, so keep-alive clients (Glance's keystonemiddleware) fail with
# RemoteDisconnected on the reused connection.
if ! alive "$K_PID"; then
  port_busy "$KEYSTONE_PORT" && die "port 127.0.0.1:$KEYSTONE_PORT is taken by another process"
  echo "=== $(date -Is) start" >>"$K_OUT"
  setsid uwsgi --plugins python3 --http-socket "127.0.0.1:$KEYSTONE_PORT" \
    --wsgi-file /usr/bin/keystone-wsgi-public \
    --master --processes 2 --threads 1 --die-on-term --need-app \
    --buffer-size 65535 --add-header 'Connection: close' \
    --env "OS_KEYSTONE_CONFIG_FILES=$K_CONF" \
    </dev/null >>"$K_OUT" 2>&1 &
  echo $! >"$K_PID"
  started+=(keystone)
fi
if ! alive "$G_PID"; then
  port_busy "$GLANCE_PORT" && die "port 127.0.0.1:$GLANCE_PORT is taken by another process"
  echo "=== $(date -Is) start" >>"$G_OUT"
  setsid glance-api --config-file "$G_CONF" </dev/null >>"$G_OUT" 2>&1 &
  echo $! >"$G_PID"
  started+=(glance-api)
fi

TOKEN=""
wait_for "Keystone ($K_URL)" "$K_PID" "$K_OUT" "$K_LOG" -- token_ready
if [ ! -f "$MARKER" ]; then
  register_image_service
  touch "$MARKER"
fi
wait_for "Glance ($G_URL)" "$G_PID" "$G_OUT" "$G_LOG" -- glance_ready

write_openrc
trap - EXIT INT TERM
echo "openstack-up: Keystone $K_URL/v3 and Glance $G_URL ready in $(elapsed) s; credentials: $DIR/admin-openrc.sh"

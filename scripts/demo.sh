#!/usr/bin/env bash
# `make demo`: the whole Packuilon pipeline on loopback, from a profile
# change on a sample Aquilon site to the older image archived in Glance.
#
#   1. installs and starts what is missing (RabbitMQ, Packer, Keystone, Glance)
#   2. serves demo/site (an Aquilon broker's profiles) over HTTP on loopback
#   3. runs cdb2rabbit: the first run records the baseline
#   4. changes one CI profile and runs cdb2rabbit again: one message queued
#   5. rabbit2packer builds it (Packer's null builder; its shell step creates
#      the image "$NAME" in the loopback Glance, as the openstack builder would)
#   6. rename-old-images (inside rabbit2packer) archives the older image of
#      that name and moves its members to the new one
#   7. the test gate: with a TEST_COMMAND that fails, a rebuild's image is
#      renamed broken-... and the live image and its member are left alone
# Everything lives in one temp dir and is stopped at the end (DEMO_KEEP=1
# keeps the services and files for a look around).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "Installing and starting what is missing"
scripts/install-packages.sh
scripts/rabbitmq-up.sh

demo=$(mktemp -d /tmp/packuilon-demo.XXXXXX)
queue="packuilon-demo-$$"
http_pid=""; daemon_pid=""
cleanup() {
  [ -n "$daemon_pid" ] && kill "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null
  [ -n "$http_pid" ] && kill "$http_pid" 2>/dev/null
  if [ -z "${DEMO_KEEP:-}" ]; then
    scripts/openstack-down.sh "$demo/openstack" >/dev/null 2>&1 || true
    rabbitmqctl -q delete_queue "$queue" >/dev/null 2>&1 || true
    rm -rf "$demo"
  else
    echo "DEMO_KEEP: left $demo (stop with scripts/openstack-down.sh $demo/openstack)"
  fi
}
trap cleanup EXIT

read -r kport gport hport sport < <(scripts/free-ports.sh 4)
scripts/openstack-up.sh "$demo/openstack" "$kport" "$gport" > "$demo/openstack-up.log" 2>&1 &
os_up=$!
cargo build -q --workspace --bins
bin=$repo/target/debug
wait "$os_up" || { cat "$demo/openstack-up.log"; exit 1; }
rc=$demo/openstack/admin-openrc.sh
echo "Keystone on 127.0.0.1:$kport, Glance on 127.0.0.1:$gport (admin RC: $rc)"

say "Serving the sample Aquilon site on http://127.0.0.1:$hport/"
cp -r demo/site "$demo/site"
/usr/bin/python3 -m http.server --bind 127.0.0.1 --directory "$demo/site" "$hport" > "$demo/http.log" 2>&1 &
http_pid=$!
for _ in $(seq 300); do
  curl -fs -o /dev/null "http://127.0.0.1:$hport/profiles/profiles-info.xml" && break
  kill -0 "$http_pid" 2>/dev/null || { cat "$demo/http.log" >&2; echo "demo: the site's web server did not start" >&2; exit 1; }
  sleep 0.1
done
curl -fs -o /dev/null "http://127.0.0.1:$hport/profiles/profiles-info.xml" \
  || { echo "demo: the site's web server did not answer in 30 s" >&2; exit 1; }
grep -o ">[^<]*<" "$demo/site/profiles/profiles-info.xml" | tr -d '<>' | sed 's/^/  /'

mkdir -p "$demo/templates" "$demo/logs" "$demo/build-files" "$demo/state" "$demo/cache"
sed "s|@TEMPLATES@|$repo/templates|g" templates/demo/glance-null.json > "$demo/templates/glance-null.json"
cat > "$demo/template-map.json" <<EOF
{ "DEFAULT": ["$demo/templates/glance-null.json"] }
EOF
cat > "$demo/source-images.json" <<EOF
{ "sl7x-x86_64": "0b10e583-9e13-4878-9116-f4002846fa73", "sl6x-x86_64": "7eb100a3-680b-4544-99cc-950b8c4f6c74" }
EOF
cat > "$demo/config.ini" <<EOF
[global]
QUEUE = $queue
RABBIT_HOST = 127.0.0.1
RABBIT_PORT = 5672
RABBIT_USER = guest
RABBIT_PW = guest

[cdb2rabbit]
PROFILE_INFO_URL = http://127.0.0.1:$hport/profiles/profiles-info.xml
PROFILE_DIR_URL = http://127.0.0.1:$hport/profiles
PROFILE_MATCH = .ci.
CACHE_DIR = $demo/cache

[rabbit2packer]
THREAD_COUNT = 2
LOG_DIR = $demo/logs
BUILD_FILE_DIR = $demo/build-files
PACKER_AUTH_FILE = $rc
PACKER_ADMIN_AUTH_FILE = $rc
PACKER_TEMPLATE_MAP = $demo/template-map.json
IMAGES_CONFIG = $demo/source-images.json
STATE_DIR = $demo/state
STATUS_LISTEN = 127.0.0.1:$sport
EOF
export PACKER_UTILS_CONFIG=$demo/config.ini
echo "config: $PACKER_UTILS_CONFIG"

say "cdb2rabbit, first run: records the baseline, publishes nothing"
"$bin/cdb2rabbit" --log stderr

say "Glance already holds an image 'sl7x-x86_64 inventory', shared with project demo-consumers"
glance() { (set -a; . "$rc"; /usr/bin/python3 templates/demo/glance.py "$@"); }
old_id=$(glance create "sl7x-x86_64 inventory" | awk '{print $2}')
member=$(glance share "$old_id")
echo "  older image $old_id, member $member (accepted)"

say "A profile changes on the broker: inventory-sl-7x-x86-64.ci.example.org.json"
/usr/bin/python3 - "$demo/site/profiles" <<'EOF'
import json, sys, time, re
d = sys.argv[1]
name = "inventory-sl-7x-x86-64.ci.example.org.json"
p = json.load(open(f"{d}/{name}"))
p["software"]["packages"]["htop"] = {}
json.dump(p, open(f"{d}/{name}", "w"), indent=2)
idx = open(f"{d}/profiles-info.xml").read()
idx = re.sub(r"mtime='\d+'>" + re.escape(name), f"mtime='{int(time.time())}'>{name}", idx)
open(f"{d}/profiles-info.xml", "w").write(idx)
EOF

say "cdb2rabbit, second run: publishes the changed CI profile"
"$bin/cdb2rabbit" --log stderr
echo "What reached the queue:"
rabbitmqctl -q list_queues name messages durable | grep -E "^name|$queue" | sed 's/^/  /'

say "rabbit2packer consumes it and builds with Packer (null builder)"
"$bin/rabbit2packer" --log stderr > "$demo/rabbit2packer.log" 2>&1 &
daemon_pid=$!
deadline=$((SECONDS + 180))
until "$bin/rabbit2packer" history --json 2>/dev/null | grep -q '"state": *"\(succeeded\|failed\)"'; do
  if [ $SECONDS -gt $deadline ] || ! kill -0 "$daemon_pid" 2>/dev/null; then
    echo "rabbit2packer did not finish the build; its log:"; cat "$demo/rabbit2packer.log"; exit 1
  fi
  sleep 0.5
done
sed 's/^/  /' "$demo/rabbit2packer.log"

say "The build log (LOG_DIR/<image key>.<template>.<epoch>.log)"
ls -l "$demo/logs" | sed 's/^/  /'
log=$(ls "$demo"/logs/*.log | grep -E '\.[0-9]+\.log$' | head -1)
sed 's/^/  /' "$log"

say "rabbit2packer history"
"$bin/rabbit2packer" history

say "The status page is on http://127.0.0.1:$sport/ while the daemon runs; its API and metrics:"
curl -fs "http://127.0.0.1:$sport/api/images" | /usr/bin/python3 -c \
  'import json,sys; [print("  %s: %s, last success %s" % (i["image_key"], i["state"], i["last_success_at"])) for i in json.load(sys.stdin)["images"]]'
curl -fs "http://127.0.0.1:$sport/metrics" | grep -E '^packuilon_(builds_total|rotations_total)' | sed 's/^/  /'

say "Glance afterwards: the older image archived, its member moved to the new image"
glance list | sed 's/^/  /'
case "$(glance show "$old_id")" in
  archive-*) ;;
  *) echo "the older image $old_id was not archived"; exit 1 ;;
esac
say "The test gate: TEST_COMMAND runs on each new image before it goes live"
live_id=$("$bin/rabbit2packer" history --json | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["builds"][0]["images"][0]["id"])')
echo "  live image now: $live_id"
kill "$daemon_pid"; wait "$daemon_pid" || true; daemon_pid=""
cat >> "$demo/config.ini" <<'EOF'
# A smoke test that fails, as a broken image would (scripts/image-smoke-test.sh is a real one).
TEST_COMMAND = echo "smoke test of $PACKUILON_IMAGE_ID ($PACKUILON_IMAGE_NAME): no login prompt on the console"; exit 1
EOF
echo "  config.ini: TEST_COMMAND added; rabbit2packer restarted; a rebuild of inventory-sl7x-x86_64 queued"
"$bin/rabbit2packer" --log stderr > "$demo/rabbit2packer-gate.log" 2>&1 &
daemon_pid=$!
for _ in $(seq 300); do grep -q "Ready:" "$demo/rabbit2packer-gate.log" && break; sleep 0.1; done
"$bin/rabbit2packer" rebuild inventory-sl7x-x86_64 | sed 's/^/  /'
deadline=$((SECONDS + 180))
until "$bin/rabbit2packer" history --json 2>/dev/null | /usr/bin/python3 -c 'import json,sys; sys.exit(0 if len(json.load(sys.stdin)) >= 2 else 1)'; do
  if [ $SECONDS -gt $deadline ] || ! kill -0 "$daemon_pid" 2>/dev/null; then
    echo "rabbit2packer did not finish the rebuild; its log:"; cat "$demo/rabbit2packer-gate.log"; exit 1
  fi
  sleep 0.5
done
grep -E "test|Staged|renamed" "$demo/rabbit2packer-gate.log" | sed 's/^/  /'
"$bin/rabbit2packer" history -n 1
"$bin/rabbit2packer" history --json | grep -q '"outcome": "built, test failed"' \
  || { echo "the rebuild was not recorded as built, test failed"; exit 1; }

say "Glance afterwards: the new image is broken-... (private); the live image and its member are as they were"
glance list | sed 's/^/  /'
[ "$(glance show "$live_id")" = "sl7x-x86_64 inventory" ] || { echo "the live image $live_id lost its name"; exit 1; }
glance list | grep -q "^broken-sl7x-x86_64 inventory " || { echo "no broken-... image"; exit 1; }

echo
echo "Done: the changed profile was queued once, built once, and the older image archived with its member moved;"
echo "a rebuild that failed its test left the live image alone."

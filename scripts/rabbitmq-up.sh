#!/usr/bin/env bash
# Makes sure a RabbitMQ node answers on 127.0.0.1:5672 (the shared node the
# tests and the demo use, guest/guest): installs rabbitmq-server when
# missing, starts the default node when it is not answering, and waits until
# it has started. Idempotent and quick when the node is already up.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

if [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
  "$here/install-packages.sh" rabbitmq-server
fi

answering() { rabbitmqctl -q await_startup --timeout 1 >/dev/null 2>&1; }

if answering; then
  exit 0
fi

echo "rabbitmq-up: starting the default RabbitMQ node" >&2
t0=$SECONDS
rabbitmq-server -detached >/dev/null 2>&1 || true
# await_startup fails at once until the node has registered; loop on it.
deadline=$((SECONDS + 90))
until rabbitmqctl -q await_startup --timeout 60 >/dev/null 2>&1; do
  if [ $SECONDS -gt $deadline ]; then
    echo "rabbitmq-up: RabbitMQ did not start; see /var/log/rabbitmq/" >&2
    exit 1
  fi
  sleep 0.2
done
echo "rabbitmq-up: RabbitMQ ready in $((SECONDS - t0)) s" >&2

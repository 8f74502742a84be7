#!/usr/bin/env bash
# `make test`: installs and starts what the tests need (RabbitMQ, Packer,
# Keystone, Glance), builds the binaries, runs every test, stops the private
# Keystone and Glance it started.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-packages.sh
scripts/rabbitmq-up.sh

cargo build --workspace --bins
cargo test --workspace --no-fail-fast

# Packuilon: the commands an operator or CI runs. `make test` is what CI runs.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: build test bench demo services clean

## build: release binaries in target/release (cdb2rabbit, rabbit2packer, rename-old-images)
build:
	$(CARGO) build --release --workspace --bins

## services: install what is missing and start the shared RabbitMQ node
services:
	scripts/install-packages.sh
	scripts/rabbitmq-up.sh

## test: what CI runs: installs and starts what is missing, then every test
test:
	scripts/test.sh

## bench: the benchmarks whose figures are in README.md
bench: services
	scripts/bench.sh

## demo: the whole pipeline on loopback with a sample Aquilon site
demo: services
	scripts/demo.sh

clean:
	$(CARGO) clean

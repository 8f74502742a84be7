# Packuilon: the commands an operator or CI runs. `make test` is what CI runs.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: build test bench demo services install clean

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

## install: binaries to $(PREFIX)/bin, systemd units, and the example config
## files to /etc/packer-utils (never overwriting an operator's own)
PREFIX ?= /usr
DESTDIR ?=
SYSTEMD_DIR ?= /etc/systemd/system
install: build
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(SYSTEMD_DIR) $(DESTDIR)/etc/packer-utils $(DESTDIR)/usr/share/doc/packuilon
	install -m 0755 target/release/cdb2rabbit target/release/rabbit2packer target/release/rename-old-images $(DESTDIR)$(PREFIX)/bin/
	install -m 0644 systemd/*.service systemd/*.timer $(DESTDIR)$(SYSTEMD_DIR)/
	for f in config.ini template-map.json source-images.json; do \
	  [ -e $(DESTDIR)/etc/packer-utils/$$f ] || install -m 0640 config/$$f $(DESTDIR)/etc/packer-utils/$$f; \
	done
	install -m 0644 README.md $(DESTDIR)/usr/share/doc/packuilon/README.md
	@echo "Installed. Edit /etc/packer-utils/config.ini, then: systemctl daemon-reload && systemctl enable --now rabbit2packer.service cdb2rabbit.timer"

clean:
	$(CARGO) clean

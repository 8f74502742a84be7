# Packuilon: the commands an operator or CI runs. `make demo` then `make
# test` is what CI runs; every target works from a fresh clone, in any order.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: build assets deb test bench demo services install clean

## build: release binaries in target/release (cdb2rabbit, rabbit2packer, rename-old-images)
build:
	$(CARGO) build --release --workspace --exclude xtask --bins

## assets: man pages and bash completions in target/assets, generated from
## the binaries' own command-line definitions
assets:
	$(CARGO) run --release -q -p xtask -- assets target/assets
	gzip -9nf target/assets/man/*.1
	gzip -9nc debian/changelog > target/assets/changelog.gz

## deb: target/debian/packuilon_<version>_amd64.deb (installs cargo-deb when missing)
deb: build assets
	scripts/install-tools.sh cargo-deb
	$(CARGO) deb --no-build --strip --quiet

## services: install what is missing and start the shared RabbitMQ node
services:
	scripts/install-packages.sh
	scripts/rabbitmq-up.sh

## test: installs and starts what is missing, builds the package, then every test
test:
	scripts/test.sh

## bench: the benchmarks whose figures are in README.md
bench: services
	scripts/bench.sh

## demo: the whole pipeline on loopback with a sample Aquilon site
demo: services
	scripts/demo.sh

## install: from source, for hosts without the package: binaries to
## $(PREFIX)/bin, man pages, bash completions, systemd units, the example
## config files to /etc/packer-utils (never overwriting an operator's own),
## the packuilon user and the directories of the shipped config.
PREFIX ?= /usr
DESTDIR ?=
SYSTEMD_DIR ?= /etc/systemd/system
install: build assets
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/share/man/man1 \
	  $(DESTDIR)$(PREFIX)/share/bash-completion/completions $(DESTDIR)$(SYSTEMD_DIR) \
	  $(DESTDIR)/etc/packer-utils $(DESTDIR)$(PREFIX)/share/doc/packuilon
	install -m 0755 target/release/cdb2rabbit target/release/rabbit2packer target/release/rename-old-images $(DESTDIR)$(PREFIX)/bin/
	install -m 0644 target/assets/man/*.1.gz $(DESTDIR)$(PREFIX)/share/man/man1/
	install -m 0644 target/assets/completions/bash/* $(DESTDIR)$(PREFIX)/share/bash-completion/completions/
	install -m 0644 systemd/*.service systemd/*.timer $(DESTDIR)$(SYSTEMD_DIR)/
	install -m 0644 README.md $(DESTDIR)$(PREFIX)/share/doc/packuilon/README.md
	install -D -m 0644 config/prometheus-alerts.yml $(DESTDIR)$(PREFIX)/share/doc/packuilon/examples/prometheus-alerts.yml
	[ -e $(DESTDIR)/etc/packer-utils/config.ini ] || install -m 0640 config/config.ini $(DESTDIR)/etc/packer-utils/config.ini
	for f in template-map.json source-images.json; do \
	  [ -e $(DESTDIR)/etc/packer-utils/$$f ] || install -m 0644 config/$$f $(DESTDIR)/etc/packer-utils/$$f; \
	done
	@if [ -z "$(DESTDIR)" ]; then \
	  getent passwd packuilon >/dev/null || useradd --system --user-group --home-dir /var/lib/packuilon --no-create-home --shell /usr/sbin/nologin packuilon; \
	  for d in /var/lib/packuilon /var/lib/packuilon/build-files /var/cache/packuilon /var/cache/packuilon/profiles /var/log/packer-utils; do \
	    [ -d $$d ] || install -d -o packuilon -g packuilon -m 0750 $$d; \
	  done; \
	  if [ "$$(stat -c %U:%G /etc/packer-utils/config.ini)" = root:root ]; then chgrp packuilon /etc/packer-utils/config.ini; chmod 0640 /etc/packer-utils/config.ini; fi; \
	  echo "Installed. Edit /etc/packer-utils/config.ini, then: systemctl daemon-reload && systemctl enable --now rabbit2packer.service cdb2rabbit.timer"; \
	fi

clean:
	$(CARGO) clean

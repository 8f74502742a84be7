# Packuilon: the commands an operator or CI runs. `make demo` then `make
# test` is what CI runs; every target works from a fresh clone, in any order.
SHELL := /bin/bash
CARGO ?= cargo

VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
BIN := target/portable/bin

.PHONY: build assets deb rpm dist test bench demo services install clean

## build: the release binaries every package carries, in target/portable/bin:
## built for glibc 2.28 and later (EL8, EL9, Debian 12) with cargo-zigbuild
## (installed with Zig from PyPI when missing), stripped
build:
	scripts/build-portable.sh

## assets: man pages and bash completions in target/assets, generated from
## the binaries' own command-line definitions
assets:
	$(CARGO) run -q -p xtask -- assets target/assets
	gzip -9nf target/assets/man/*.1
	gzip -9nc debian/changelog > target/assets/changelog.gz

## deb: target/debian/packuilon_<version>_amd64.deb (installs cargo-deb when missing)
deb: build assets
	scripts/install-tools.sh cargo-deb
	$(CARGO) deb --no-build --quiet

## rpm: target/rpm/packuilon-<version>-1.x86_64.rpm for EL8/EL9, with
## rpmbuild from rpm/packuilon.spec (Debian's `rpm` package is installed
## when missing); packs the same binaries as the .deb, compiles nothing
rpm: build assets
	command -v rpmbuild >/dev/null || scripts/install-packages.sh rpm
	rm -rf target/rpmbuild && mkdir -p target/rpmbuild target/rpm
	rpmbuild -bb --quiet rpm/packuilon.spec \
	  --define "_sourcedir $(CURDIR)" --define "_topdir $(CURDIR)/target/rpmbuild" \
	  --define "_rpmdir $(CURDIR)/target/rpm" \
	  --define "_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm" \
	  --define "pkg_version $(VERSION)"
	@echo "rpm: target/rpm/packuilon-$(VERSION)-1.x86_64.rpm"

## dist: target/dist/packuilon-<version>-x86_64-linux.tar.gz, for hosts with
## neither dpkg nor rpm: binaries, units, config, man pages, completions, README
DIST := packuilon-$(VERSION)-x86_64-linux
dist: build assets
	rm -rf target/dist/$(DIST) && mkdir -p target/dist/$(DIST)/{bin,libexec,systemd,config,man/man1,completions/bash}
	cp -p libexec/cdp-hook scripts/image-smoke-test.sh target/dist/$(DIST)/libexec/
	cp -p $(BIN)/* target/dist/$(DIST)/bin/
	cp -p systemd/*.service systemd/*.timer target/dist/$(DIST)/systemd/
	cp -p config/config.ini config/template-map.json config/source-images.json config/prometheus-alerts.yml target/dist/$(DIST)/config/
	cp -p target/assets/man/*.1.gz target/dist/$(DIST)/man/man1/
	cp -p target/assets/completions/bash/* target/dist/$(DIST)/completions/bash/
	cp -p README.md LICENSE target/dist/$(DIST)/
	chmod 0640 target/dist/$(DIST)/config/config.ini
	tar -C target/dist --owner=0 --group=0 --numeric-owner --sort=name -czf target/dist/$(DIST).tar.gz $(DIST)
	rm -rf target/dist/$(DIST)
	@echo "dist: target/dist/$(DIST).tar.gz"

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
	install -d $(DESTDIR)$(PREFIX)/libexec/packuilon
	install -m 0755 libexec/cdp-hook $(DESTDIR)$(PREFIX)/libexec/packuilon/
	install -D -m 0755 scripts/image-smoke-test.sh $(DESTDIR)$(PREFIX)/share/packuilon/image-smoke-test.sh
	install -m 0755 $(BIN)/cdb2rabbit $(BIN)/rabbit2packer $(BIN)/rename-old-images $(DESTDIR)$(PREFIX)/bin/
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

# guestwarden: the two commands are `make demo` and `make test` (as root on Debian 12).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
DEBS := libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 qemu-utils \
        libvirt-dev pkg-config tini gcc python3-venv python3-dev python3-gi python3-dbus \
        dbus-daemon rpm python3-rpm systemd libmagic1 git tmux groff-base man-db
GUESTS ?= test
PYTEST_ARGS ?=
MINUTES ?= 5

.PHONY: deps venv test lint demo soak bench clean

# System packages (Debian's apt) and the unprivileged accounts the tests use.
deps: .deps-stamp
.deps-stamp: Makefile
	@if ! dpkg -s $(DEBS) >/dev/null 2>&1; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(DEBS); \
	fi
	@# libvirt 9.0 reads this account from qemu.conf even when user = "root"
	@getent passwd libvirt-qemu >/dev/null || useradd --system --no-create-home --shell /usr/sbin/nologin libvirt-qemu
	@getent passwd gw-nobody >/dev/null || useradd --system --no-create-home --shell /usr/sbin/nologin gw-nobody
	@touch $@

# The project's venv: Debian's python3 with system site packages (dbus, gi bindings).
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml .deps-stamp
	@test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest $(PYTEST_ARGS)

demo: venv
	$(PY) -m testbed.demo --guests $(GUESTS)

soak: venv
	$(PY) -m testbed.soak --minutes $(MINUTES)

bench: venv
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) .deps-stamp build dist *.egg-info

# The two commands of the README: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: demo test test-fast lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/meshlayer demo

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

test: lint etcd-server
	$(BIN)/pytest -q

# Local shortcut: skip the slow end-to-end tests (CI runs everything).
test-fast: lint
	$(BIN)/pytest -q -m 'not slow'

# The etcd store's tests run a real etcd: Debian's etcd-server, installed when `etcd` is
# missing (CI runs as root). policy-rc.d forbids the package from starting a system etcd.
.PHONY: etcd-server
etcd-server:
	@command -v etcd >/dev/null 2>&1 || { \
	  sudo=; [ "$$(id -u)" = 0 ] || sudo=sudo; made=; \
	  if [ ! -e /usr/sbin/policy-rc.d ]; then \
	    printf '#!/bin/sh\nexit 101\n' | $$sudo tee /usr/sbin/policy-rc.d >/dev/null; \
	    $$sudo chmod 755 /usr/sbin/policy-rc.d; made=1; fi; \
	  $$sudo apt-get update -q && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install \
	    -y -q --no-install-recommends etcd-server; rc=$$?; \
	  [ -z "$$made" ] || $$sudo rm -f /usr/sbin/policy-rc.d; exit $$rc; }

bench: $(STAMP)
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build
	find src -name "*.so" -delete

# The two commands of the README: `make demo` and `make test`.
# The interpreter .venv is made from: the distribution's python3 when it is 3.11+ and has
# venv and the headers (Debian's is linked statically and optimized: the sidecar serves about
# 10 % more requests per core on it than on a shared-libpython build without PGO, see
# bench/RESULTS.md), else the first python3 on PATH. `make PY=python3.12 ...` chooses.
PY      ?= $(shell for p in /usr/bin/python3 python3; do $$p -c 'import sys, os, sysconfig, \
  ensurepip; sys.exit(sys.version_info < (3, 11) or not os.path.exists(os.path.join( \
  sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null && { echo $$p; exit; }; done; \
  echo python3)
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
NATIVE  := $(VENV)/.compiled
SOURCES := $(shell find src/meshlayer -name '*.py')
# PURE=1: run the sources as they are, nothing compiled (the extensions are removed).
PURE    ?=
PGO     ?= 0

.PHONY: demo test test-fast lint bench clean build

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Dependencies first, as a pure install: mypyc type-checks against them.
$(STAMP): $(BIN)/python pyproject.toml setup.py
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	rm -f $(NATIVE)
	touch $(STAMP)

# Which build imports: fails unless it is the one asked for ($(1): compiled or pure).
define check_build
@$(BIN)/python -c "import sys, meshlayer.proxy.exchange as m; \
  got = 'compiled' if m.__file__.endswith('.so') else 'pure'; \
  sys.exit(0 if got == '$(1)' else 'meshlayer: the $(1) build was asked for, ' + got + \
  ' is installed (compiling needs a C compiler and the Python headers; see: ' \
  'MESHLAYER_MYPYC=1 .venv/bin/pip install -v --no-deps -e .); make PURE=1 runs the sources')"
endef

# The proxy's hot path compiled with mypyc (setup.py lists the modules), again whenever
# a source changes: the extensions shadow the .py files, so a stale one would be what runs.
# The stamp's time is taken before compiling: a source saved meanwhile is newer.
# PGO=1: compiled twice around a training run of the request path (bench/hotpath.py), the
# second time with GCC's profile of it: about 5 % less CPU per request, twice the build
# time (bench/RESULTS.md). Not the default: `make test` would pass a minute more compiling.
$(NATIVE): $(STAMP) $(SOURCES)
	@touch $(NATIVE).new
ifeq ($(PGO),0)
	@echo "meshlayer: compiling the proxy's hot path with mypyc (about a minute)"
	MESHLAYER_MYPYC=1 $(BIN)/python -m pip install -q --no-deps -e .
else
	@echo "meshlayer: compiling the proxy's hot path with mypyc, profile-guided (about two minutes)"
	rm -rf build/pgo
	MESHLAYER_MYPYC=1 MESHLAYER_PGO=generate $(BIN)/python -m pip install -q --no-deps -e .
	$(call check_build,compiled)
	$(BIN)/python bench/hotpath.py --requests 20000
	$(BIN)/python bench/hotpath.py --requests 5000 --outbound '{concurrency: adaptive}'
	MESHLAYER_MYPYC=1 MESHLAYER_PGO=use $(BIN)/python -m pip install -q --no-deps -e .
endif
	$(call check_build,compiled)
	@mv $(NATIVE).new $(NATIVE)

ifeq ($(PURE),)
build: $(NATIVE)
	$(call check_build,compiled)
else
build: $(STAMP)
	@if [ -n "$$(find src -name '*.so')" ]; then \
	  MESHLAYER_MYPYC=0 $(BIN)/python -m pip install -q --no-deps -e .; fi
	@rm -f $(NATIVE)
	$(call check_build,pure)
endif

demo: build rabbitmq-server
	$(BIN)/meshlayer demo

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

test: lint build etcd-server rabbitmq-server
	$(BIN)/pytest -q

# Local shortcut: skip the slow end-to-end tests (CI runs everything).
test-fast: lint build
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

# meshlayer.amqp's tests (and the demo's email worker) run a real RabbitMQ: Debian's
# rabbitmq-server, installed when missing. policy-rc.d forbids the package from starting a
# system broker. Should the install start an epmd or broker anyway, it runs as the package's
# users (rabbitmq, epmd): one of theirs that was not running before is stopped by PID. Other
# users' brokers (tests, `make demo`, running meanwhile) are never touched. Tests and demo
# run their own broker on private ports.
.PHONY: rabbitmq-server
rabbitmq-server:
	@[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || { \
	  sudo=; [ "$$(id -u)" = 0 ] || sudo=sudo; made=; \
	  pkgprocs() { u=$$(getent passwd rabbitmq epmd | cut -d: -f1 | paste -sd, -); \
	    [ -z "$$u" ] || pgrep -u "$$u" -x 'epmd|beam.smp'; }; \
	  before=" $$(pkgprocs | tr '\n' ' ') "; \
	  if [ ! -e /usr/sbin/policy-rc.d ]; then \
	    printf '#!/bin/sh\nexit 101\n' | $$sudo tee /usr/sbin/policy-rc.d >/dev/null; \
	    $$sudo chmod 755 /usr/sbin/policy-rc.d; made=1; fi; \
	  $$sudo apt-get update -q && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install \
	    -y -q --no-install-recommends rabbitmq-server; rc=$$?; \
	  [ -z "$$made" ] || $$sudo rm -f /usr/sbin/policy-rc.d; \
	  for pid in $$(pkgprocs); do \
	    case "$$before" in *" $$pid "*) ;; *) $$sudo kill "$$pid" || true;; esac; done; \
	  exit $$rc; }

bench: build
	$(BIN)/python bench/overhead.py

# Issue 5's proof: priority vs FIFO vs nginx past saturation (~7 min; add ARGS=--quick).
.PHONY: bench-priority
bench-priority: build
	$(BIN)/python bench/priority.py $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build
	find src -name "*.so" -delete

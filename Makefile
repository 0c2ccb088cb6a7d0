# comfy-progress: `make run` starts the daemon (with SIMULATE embedded ComfyUI
# simulators unless COMFY_URL, a space-separated list, is set); `make test` runs lint, types and every test.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
NPM_STAMP := node_modules/.package-lock.stamp

LISTEN    ?= 127.0.0.1:8000
COMFY_URL ?=
SIMULATE  ?= 1

.PHONY: all setup test-deps run cluster test lint typecheck pytest jstest fmt docs bench bench-loop soak fuzz clean

all: test

setup: $(STAMP) $(NPM_STAMP)

# Re-install only when the dependency list changes; the package is editable.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# The browser client's packages (Preact, htm), served at /vendor/: reinstall
# when node_modules is missing or package-lock.json changed.
$(NPM_STAMP): package-lock.json
	npm ci --ignore-scripts --no-audit --no-fund
	touch $@

run: setup
	$(BIN)/comfy-progress serve --listen $(LISTEN) $(if $(COMFY_URL),$(foreach url,$(COMFY_URL),--comfy-url $(url)),--simulate $(SIMULATE))

# Several daemons sharing Redis: redis-server, two fronts behind nginx, two workers,
# two simulators; prints the URL (README: Several daemons). Needs redis-server, nginx.
cluster: setup test-deps
	$(BIN)/python scripts/cluster.py --port $(or $(CLUSTER_PORT),8080)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

pytest: setup test-deps
	$(BIN)/pytest

jstest: setup test-deps
	node --test tests/js/

# The Debian packages the tests need (chromium, nginx, systemd, nodejs, npm, redis-server): apt-get
# when root, else the exact command and a failure. `make run` does not need them.
test-deps:
	scripts/test-deps

test: test-deps lint typecheck pytest jstest

# Figures, not pass/fail: issue 10's relay shapes, the fan-out shape with
# previews off and on, the event loop's longest steps under hostile uploads,
# the relay with and without Redis, and fan-out behind nginx (needs
# redis-server and nginx: test-deps).
bench: setup test-deps
	$(BIN)/python -m bench.bench $(BENCH_ARGS)
	$(BIN)/python -m bench.previews
	$(BIN)/python -m bench.loop_steps
	$(BIN)/python -m bench.shared_relay

# The event loop's longest steps (CPU) while hostile 20 MiB images are uploaded.
bench-loop: setup
	$(BIN)/python -m bench.loop_steps

# Outside the default run: 200 tasks through WebSocket drops, a ComfyUI
# restart and a daemon kill -9 (the README shows its output).
soak: setup
	$(BIN)/python -m bench.soak --tasks 200

# 100,000 hostile HTTP requests (the grammar of tests/fuzz/) against a daemon
# process: no crash, no logged error, no 500, every connection answered in time.
fuzz: setup
	$(BIN)/python -m bench.fuzz --requests 100000

# The README's configuration and metrics tables, from daemon/config.py and daemon/ops/metrics.py.
docs: setup
	$(BIN)/python -m daemon.ops.reference

fmt: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) node_modules .pytest_cache .mypy_cache .ruff_cache .hypothesis

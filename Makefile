# memtop developer entry points. Live mode and the BPF tests need root: `sudo make run`, `sudo make test`.
# `setup` is idempotent and fast once done, so run/test/bench always go through it.

VENV   := .venv
PY     := $(VENV)/bin/python
ARGS        ?=
PYTEST_ARGS ?=

.PHONY: setup run test test-runtimes test-deps lint screenshots bench clean venv-exists

setup:
	bash scripts/setup.sh

run: setup
	$(VENV)/bin/memtop $(ARGS)

test: setup test-runtimes test-deps
	$(PY) -m pytest -ra $(PYTEST_ARGS)

# TEST-ONLY: the container runtimes the end-to-end container tests run (docker.io podman containerd lxc
# busybox-static from apt; a no-op once installed). `run`, `setup` and `bench` never install them.
test-runtimes:
	bash scripts/test-runtimes.sh install

# TEST-ONLY: prometheus (promtool; its service kept stopped) and debootstrap for the metrics and image tests.
test-deps:
	bash scripts/test-deps.sh

# lint and screenshots need no root: they only need a venv that `sudo make setup` made once.
venv-exists:
	@test -x $(VENV)/bin/ruff || { echo "no $(VENV) with dev tools: run 'sudo make setup' first" >&2; exit 1; }

lint: venv-exists
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy memtop

screenshots: venv-exists
	$(PY) scripts/screenshots.py

bench: setup
	$(PY) bench/kmalloc_bench.py
	$(PY) bench/attach_cost.py
	$(PY) bench/flush_cost.py
	$(PY) bench/leaks_bench.py
	$(PY) bench/tcp_bench.py
	$(PY) bench/ui_bench.py
	$(PY) bench/tick_profile.py
	$(PY) bench/userleaks_bench.py
	$(PY) bench/record_bench.py
	$(PY) bench/metrics_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache memtop.egg-info build dist
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

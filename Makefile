# memtop developer entry points. Live mode and the BPF tests need root: `sudo make run`, `sudo make test`.
# `setup` is idempotent and fast once done, so run/test/bench always go through it.

VENV   := .venv
PY     := $(VENV)/bin/python
ARGS        ?=
PYTEST_ARGS ?=

.PHONY: setup run test lint screenshots bench clean venv-exists

setup:
	bash scripts/setup.sh

run: setup
	$(VENV)/bin/memtop $(ARGS)

test: setup
	$(PY) -m pytest -ra $(PYTEST_ARGS)

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
	$(PY) bench/leaks_bench.py
	$(PY) bench/tcp_bench.py
	$(PY) bench/record_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache memtop.egg-info build dist
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

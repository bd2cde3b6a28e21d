# medfdd — the two commands a new user runs: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: install demo demo-data test test-ci-only lint bench-data bench-loading reliability-table clean docs

$(BIN)/medfdd: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e '.[dev,nvflare]'
	touch $(BIN)/medfdd

install: $(BIN)/medfdd

demo: demo-data install
	$(BIN)/medfdd demo --out demo

# Fashion-MNIST for the demo: the Debian package when this runs as root with apt-get; never fails (without it the
# demo runs on sklearn digits and says why)
demo-data: export DEBIAN_FRONTEND := noninteractive
demo-data:
	@test -d /usr/share/datasets/fashion-mnist || { test "$$(id -u)" = 0 && command -v apt-get >/dev/null \
	  && { apt-get install -y -q dataset-fashion-mnist || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }; } \
	  || echo "note: Fashion-MNIST is not installed (as root: apt-get install dataset-fashion-mnist); the demo will run on sklearn digits" >&2; }

test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "not ci_only" tests

# the tests too long for `make test` (the 20-SuperNode Flower consortium); .ci/run runs them after it
test-ci-only: install
	$(BIN)/python -m pytest -q -m ci_only tests

lint: install
	$(BIN)/ruff check medfdd privacy tests benchmarks

# docs/reliability.md from the tests' case tables (a test fails when it is stale)
reliability-table: install
	$(BIN)/python tests/reliability/reliability_table.py

# Fashion-MNIST for the benchmarks: the Debian package (as root; never needed by `make test`)
bench-data: export DEBIAN_FRONTEND := noninteractive
bench-data:
	@test -d /usr/share/datasets/fashion-mnist || { test "$$(id -u)" = 0 || { echo "run as root: apt-get install dataset-fashion-mnist" >&2; exit 1; }; \
	  apt-get install -y -q dataset-fashion-mnist || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }; }

bench-loading: install
	$(BIN)/python benchmarks/loading.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# docs/configuration.md and docs/schemas/ from the config models (a test fails when either is stale)
docs: install
	$(BIN)/python -m medfdd.config_reference

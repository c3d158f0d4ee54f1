# The two commands of the README: `make run` (the main job) and `make test` (the whole suite).
# Each sets up .venv from nothing (only Python 3.11+ and make are needed) and is quick once set up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints/lower-bounds.txt | cksum | cut -d' ' -f1)

export LITELLM_LOCAL_MODEL_COST_MAP := True
export LITELLM_OFFLINE_MODE := true
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup run test test-fast lint bench bench-quick clean

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,bench]' -c constraints/lower-bounds.txt  # CI tests the lower bounds
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/python -m dspex_trio serve $(ARGS)

lint: setup
	$(BIN)/ruff check dspex_trio bridge_child tests benchmarks
	$(BIN)/ruff format --check dspex_trio bridge_child tests benchmarks
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup  # the in-process part only (no worker processes): seconds (docs/testing.md)
	$(BIN)/python -m pytest -m "not real_processes" $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m benchmarks $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis

# -- monitoring: the dashboard test drives Debian's chromium (docs/monitoring.md). `make test` installs it
# when it can (root and apt-get); otherwise that test skips, or fails under CI=true.
.PHONY: browser
test: browser
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	else echo "chromium and chromedriver missing (apt-get install chromium chromium-driver): the dashboard test skips"; fi

# -- Ray (docs/scale-out.md): the Ray tests' extra, installed for `make test` only (it is large; `make run`
# does not need it). Its tests run in a loopback-only network namespace (root and unshare) or skip saying why.
RAY_STAMP := $(VENV)/.ray-$(shell cat pyproject.toml constraints/lower-bounds.txt | cksum | cut -d' ' -f1)
.PHONY: ray-extra
test: ray-extra
ray-extra: $(RAY_STAMP)
$(RAY_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[ray]' -c constraints/lower-bounds.txt
	rm -f $(VENV)/.ray-*
	touch $(RAY_STAMP)

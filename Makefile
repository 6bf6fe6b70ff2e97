# recserve: `make serve` serves the default model, `make test` runs every test.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.recserve-setup

.PHONY: setup serve test lint proto clean

setup: $(STAMP)

# Idempotent: rebuilt only when the lock or the project metadata change.
$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24" setuptools wheel
	$(PY) -m pip install --quiet --no-deps -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e . --config-settings editable_mode=compat
	$(PY) -c "import torch, torchrec, ray, grpc, triton; print('recserve env ok: torch', torch.__version__, 'torchrec', torchrec.__version__, 'ray', ray.__version__)"
	@touch $(STAMP)

# Serving never trains: the default package is built first (trained and exported, ~30 s, once).
serve: setup
	$(VENV)/bin/recserve default-package
	$(VENV)/bin/recserve serve --shard-replicas 2  # a lost replica costs no request (docs/reliability.md)

# Every test, two at a time (pytest-xdist; the Ray tests stay together on one worker, see
# tests/conftest.py). Fails when any test fails or none is collected (pytest's exit code 5).
# A worker that dies fails the test it was running and ends the run: xdist 3.8's loadgroup
# can wait forever for a replacement worker (tests/test_ci.py). Prints the 30 slowest tests
# and the load average at the end.
XDIST := -n 2 --dist loadgroup --max-worker-restart=0
test: setup
	@status=0; $(PY) -m pytest -q $(XDIST) --durations=30 || status=$$?; \
	echo "make test: exit $$status; load average (1, 5, 15 min) $$(cut -d' ' -f1-3 /proc/loadavg) on $$(nproc) cores"; \
	exit $$status

# pyflakes over every Python file but the generated gRPC code: unused imports and
# variables, undefined names, redefinitions; then the import contracts (pyproject.toml's
# [tool.importlinter]): layers only point down, no import cycle.
lint: setup
	$(PY) -m pyflakes $$(find recserve serving sharding kernels loadtest benchmarks protos tests -name '*.py' -not -path 'recserve/v1/*')
	$(VENV)/bin/lint-imports --no-cache

proto: setup
	$(PY) protos/generate.py

clean:
	rm -rf $(VENV) artifacts .pytest_cache

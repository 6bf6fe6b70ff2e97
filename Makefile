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
	$(VENV)/bin/recserve serve

# Every test, two at a time (pytest-xdist; the Ray tests stay together on one worker, see
# tests/conftest.py). Fails when any test fails or none is collected (pytest's exit code 5).
test: setup
	$(PY) -m pytest -q -n 2 --dist loadgroup

# pyflakes over every Python file but the generated gRPC code: unused imports and
# variables, undefined names, redefinitions.
lint: setup
	$(PY) -m pyflakes $$(find recserve serving sharding kernels loadtest benchmarks protos tests -name '*.py' -not -path 'recserve/v1/*')

proto: setup
	$(PY) protos/generate.py

clean:
	rm -rf $(VENV) artifacts .pytest_cache

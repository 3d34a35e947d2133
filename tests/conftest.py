"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer, Prefect's test harness."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# LLaMA-Factory's own registry and data files, unchanged: `shared/llamafactory-data` beside the
# repository (or where TUNEFACTORY_LLAMAFACTORY_DATA points). A clone without them skips the tests
# that read them instead of failing.
LLAMAFACTORY_DATA = Path(
    os.environ.get("TUNEFACTORY_LLAMAFACTORY_DATA")
    or Path(__file__).resolve().parents[2] / "shared" / "llamafactory-data"
)
LLAMAFACTORY_REGISTRY = LLAMAFACTORY_DATA / "dataset_info.json"
needs_llamafactory_data = pytest.mark.skipif(
    not LLAMAFACTORY_REGISTRY.is_file(), reason=f"LLaMA-Factory's data is not at {LLAMAFACTORY_DATA}"
)


def llama_cpp_or_fail_in_ci():
    """llama-cpp-python, which `make install` installs from ../shared/wheels/: a test that needs it
    fails in CI (CI=true) without it, and is skipped elsewhere, saying why."""
    try:
        import llama_cpp
    except ImportError:
        why = "llama-cpp-python is not installed (make install installs it from ../shared/wheels/)"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    return llama_cpp


def llama_cpp_greedy(llm, prompt: list[int], count: int) -> list[int]:
    """llama.cpp's greedy continuation of `prompt`: `count` tokens, or up to its end-of-text token."""
    answer = []
    for token in llm.generate(prompt, temp=0.0):
        answer.append(token)
        if token == llm.token_eos() or len(answer) == count:
            return answer


# The Prefect task run of each stage of an SFT LoRA pipeline, as the Prefect UI names them.
STAGE_TASK_RUNS = {
    "materialize base model",
    "template dataset",
    "tokenize dataset",
    "train (sft, lora)",
    "evaluate",
    "merge and export",
}


def build_tiny_llama(directory: Path) -> Path:
    """A 2-layer random Llama (about 3.3M parameters, mostly embeddings) with SmolLM2's tokenizer."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from tasks.contracts.packaged_models import smollm2_tokenizer

    tokenizer = smollm2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tokenizer(tiny_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the whole session (it takes seconds to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def prefect_csrf_headers(api_url: str) -> dict[str, str]:
    """The headers a write to tunefactory's Prefect servers needs (CSRF protection is on there):
    a token fetched for a client id, as Prefect's UI and Python client do."""
    import uuid

    import httpx

    client = str(uuid.uuid4())
    response = httpx.get(f"{api_url}/csrf-token", params={"client": client}, timeout=30)
    response.raise_for_status()
    return {"Prefect-Csrf-Token": response.json()["token"], "Prefect-Csrf-Client": client}


def task_run_names(flow_run_id: str) -> list[str]:
    """The names of a flow run's task runs, in the order they were to start."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        return [run.name for run in sorted(runs, key=lambda r: r.expected_start_time)]


def wait_for(predicate, timeout: float, what: str) -> None:
    """Poll `predicate` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def merged(base: dict, changes: dict) -> dict:
    """`base` with `changes` merged in, section by section; a None value removes the key."""
    result = dict(base)
    for key, value in changes.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = value
    return result


def tiny_spec(tiny_model: Path, workspace: Path, changes: dict | None = None):
    """A spec that runs the whole pipeline on the tiny model in seconds, in its own workspace.

    `changes` are merged into it (see `merged`), e.g. {"train": {"stage": "pt", "lora": None}}.
    """
    from flows.spec import validate_spec

    os.environ.pop("MLFLOW_TRACKING_URI", None)  # MLflow on SQLite inside the workspace
    spec = merged(
        {
            "name": "tiny-test",
            "workspace": str(workspace),
            "model": {"name_or_path": str(tiny_model)},
            "dataset": {"max_samples": 12, "template_vars": {"name": "Nova", "author": "Acme Labs"}},
            "tokenize": {"cutoff_len": 128},
            "train": {
                "num_epochs": 2,
                "batch_size": 4,
                "learning_rate": 1e-3,
                "logging_steps": 1,
                "save_steps": 3,
                "lora": {"rank": 4, "alpha": 8},
            },
            "evaluate": {"max_new_tokens": 4},
            "export": {"max_shard_size": "2MB"},
        },
        changes or {},
    )
    return validate_spec(spec)


def pytest_configure(config):
    """Under pytest-xdist (`-n 2`), each test process and everything it launches keeps to one core."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker and hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[int(worker.removeprefix("gw")) % len(cores)]})


# The longest files (minutes each, docs/tests.md), started first: pytest-xdist, run with
# --no-loadscope-reorder (the Makefile does), hands out whole
# files in collection order, so one of these left for last would keep one process busy alone
LONGEST_FIRST = [
    "test_demo_e2e.py",
    "test_resume_and_retry.py",
    "test_distributed_training.py",
    "test_training_stages.py",
    "test_schedule.py",
    "test_sweep_compare_lineage.py",
    "test_llamafactory_pipeline.py",
    "test_memory_failures.py",
]


def pytest_collection_modifyitems(config, items):
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order

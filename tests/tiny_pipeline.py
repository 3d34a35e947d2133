"""The tiny pipeline the flow tests run: a 2-layer random Llama with SmolLM2's tokenizer, a spec
that runs every stage on it in seconds, and the names its stages' Prefect task runs get."""

from __future__ import annotations

import os
from pathlib import Path

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


def task_run_names(flow_run_id: str) -> list[str]:
    """The names of a flow run's task runs, in the order they were to start."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        return [run.name for run in sorted(runs, key=lambda r: r.expected_start_time)]

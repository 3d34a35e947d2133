"""LLaMA-Factory's own registry and data files, unchanged, through the whole pipeline as one Prefect flow.

Two flows cover every file-based kind LLaMA-Factory ships: sft on identity + alpaca_en_demo +
glaive_toolcall_en_demo (function calls, through the shipped chatml_tools template), then dpo on
dpo_en_demo and kto on kto_en_demo, evaluated on the project's own identity and control sets
(the registry has none) and exported; and pt on c4_demo.jsonl and wiki_demo.txt. The files are read from
shared/llamafactory-data beside the repository, never copied into it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from shared_inputs import LLAMAFACTORY_DATA, LLAMAFACTORY_REGISTRY, needs_llamafactory_data
from test_training_stages import logged, stage_runs, trained_lora
from tiny_pipeline import merged, tiny_spec

from flows.pipeline import finetune
from flows.preflight import check_inputs
from tasks.components.chat_encoding import IGNORE_INDEX
from tasks.contracts.file_digests import sha256_file

REGISTRY = LLAMAFACTORY_REGISTRY
STEPS = {"num_epochs": 1, "batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 50}

pytestmark = needs_llamafactory_data


def llamafactory_spec(tiny_model: Path, workspace: Path, changes: dict):
    base = {"dataset": {"registry": str(REGISTRY), "template_vars": {"name": "Orion", "author": "Northwind"}}}
    return tiny_spec(tiny_model, workspace, merged(base, changes))


@pytest.fixture(scope="module")
def llamafactory_chain(prefect_harness, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """sft on identity + alpaca + glaive's function calls, then dpo, then kto; evaluated and exported."""
    spec = llamafactory_spec(
        tiny_model,
        tmp_path_factory.mktemp("llamafactory") / "workspace",
        {
            "model": {"chat_template": "chatml_tools"},
            "dataset": {"names": ["identity", "alpaca_en_demo", "glaive_toolcall_en_demo"], "max_samples": 12},
            "tokenize": {"cutoff_len": 384},  # glaive's tool list alone is about 150 tokens
            "train": STEPS,
            "then": {
                "prefer": {"stage": "dpo", "datasets": ["dpo_en_demo"], **STEPS},
                # kto pairs each answer with a mismatched one for its KL term: small batches, several steps
                "feedback": {"stage": "kto", "datasets": ["kto_en_demo"], **STEPS, "batch_size": 2},
            },
            "evaluate": {"compare_base": False},
        },
    )
    check_inputs(spec)  # what `tunefactory run` checks before stage one
    return spec, finetune(spec)


@pytest.fixture(scope="module")
def llamafactory_text(prefect_harness, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """pt on c4_demo.jsonl and wiki_demo.txt (two documents each: wiki's are whole articles)."""
    spec = llamafactory_spec(
        tiny_model,
        tmp_path_factory.mktemp("llamafactory-pt") / "workspace",
        {
            "dataset": {"names": ["c4_demo", "wiki_demo"], "max_samples": 3},
            "train": {"stage": "pt", **STEPS},
            "evaluate": {"identity_prompts": None, "control_prompts": None, "compare_base": False},
        },
    )
    check_inputs(spec)
    return spec, finetune(spec)


def test_every_llamafactory_file_kind_trains_its_stage(llamafactory_chain, llamafactory_text):
    sources, stages = {}, {}
    for _, result in (llamafactory_chain, llamafactory_text):
        for name, manifest in result.stages.items():
            stages[(result.tracking.parent_run_id, name)] = manifest
            if name.startswith("template"):
                sources.update({s["name"]: s for s in manifest.info["sources"]})
    files = {"identity": "identity.json", "alpaca_en_demo": "alpaca_en_demo.json",
             "glaive_toolcall_en_demo": "glaive_toolcall_en_demo.json", "dpo_en_demo": "dpo_en_demo.json",
             "kto_en_demo": "kto_en_demo.json", "c4_demo": "c4_demo.jsonl", "wiki_demo": "wiki_demo.txt"}  # fmt: skip
    for name, file in files.items():
        assert sources[name]["sha256"] == sha256_file(LLAMAFACTORY_DATA / file), f"{name} is read from {file}"
        assert sources[name]["rows"] == (3 if name in ("c4_demo", "wiki_demo") else 12), "max_samples per dataset"
    chain, text = llamafactory_chain[1], llamafactory_text[1]
    for result, name in ((chain, "train"), (chain, "train-prefer"), (chain, "train-feedback"), (text, "train")):
        assert not result.stages[name].reused
        trained_lora(Path(result.stages[name].output_dir) / "adapter")
    assert logged(chain, "train-prefer", "rewards/margins") and logged(chain, "train-feedback", "kl")
    assert text.stages["tokenize"].metrics["train_documents"] > 0, "pt read the text files as documents"
    assert text.stages["tokenize"].metrics["train_examples"] > 2, "and cut them into blocks"


def test_identity_placeholders_take_the_spec_values_and_eval_sets_come_from_the_project(llamafactory_chain):
    _, result = llamafactory_chain
    stages = result.stages
    from datasets import load_from_disk

    templated = load_from_disk(str(Path(stages["template"].output_dir) / "train"))
    identity = [
        json.loads(m) for d, m in zip(templated["dataset"], templated["messages"], strict=True) if d == "identity"
    ]
    answers = " ".join(messages[-1]["content"] for messages in identity)
    assert "Orion" in answers and "Northwind" in answers and "{{name}}" not in answers
    # the registry has no identity_eval/general_eval: the project's own sets were scored
    metrics = stages["evaluate"].metrics
    assert {"tuned_identity_hit_rate", "tuned_control_accuracy"} <= set(metrics)
    assert (Path(stages["export"].output_dir) / "model" / "chat_template.jinja").is_file()


def test_function_calls_are_supervised_and_tool_results_are_not(llamafactory_chain, tiny_model: Path):
    _, result = llamafactory_chain
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    model_dir = Path(result.stages["model"].output_dir) / result.stages["model"].info["model_path"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenized = load_from_disk(str(Path(result.stages["tokenize"].output_dir) / "train"))
    calls = [row for row in tokenized if "<tool_call>" in tokenizer.decode(row["input_ids"])]
    assert calls, "glaive's function calls reached the tokenized set"
    for row in calls:
        supervised = tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"], strict=True)
                                       if label != IGNORE_INDEX])  # fmt: skip
        assert "<tool_call>" in supervised, "the model learns to call the function"
        assert "<|im_start|>tool" not in supervised and "<tools>" not in supervised
    runs = stage_runs(result)
    assert runs["tokenize"].data.metrics["train_supervised_tokens"] > 0

"""Every training stage (pt, sft, rm, ppo, dpo, orpo, simpo, kto) and method (full, freeze, lora,
qlora) as Prefect flows on the tiny Llama, with MLflow on SQLite: the right weights trained, the
rest stayed frozen, and each stage's metrics reached MLflow. sft with lora is in test_pipeline_flow.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from tiny_pipeline import task_run_names, tiny_spec

from flows.pipeline import finetune
from flows.results import PipelineResult
from flows.spec import SpecError, validate_spec
from tasks.runtime.tracking import PARENT_TAG

SHORT = {"num_epochs": 1, "batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 50}
LORA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def weights(directory: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        found.update(load_file(shard))
    return found


def stage_runs(result: PipelineResult) -> dict:
    """The pipeline's MLflow child runs by stage tag."""
    client = MlflowClient(result.tracking.uri)
    parent = result.tracking.parent_run_id
    runs = client.search_runs([result.tracking.experiment_id], f"tags.`{PARENT_TAG}` = '{parent}'")
    return {run.data.tags["stage"]: run for run in runs}


def logged(result: PipelineResult, stage: str, metric: str) -> list[float]:
    client = MlflowClient(result.tracking.uri)
    return [m.value for m in client.get_metric_history(stage_runs(result)[stage].info.run_id, metric)]


def trained_lora(adapter_dir: Path) -> dict[str, torch.Tensor]:
    adapter = load_file(adapter_dir / "adapter_model.safetensors")
    lora_b = {k: t for k, t in adapter.items() if "lora_B" in k}
    assert lora_b and all(t.abs().max() > 0 for t in lora_b.values()), "lora_B starts at zero and must have trained"
    return adapter


# --- pt with full, then sft with freeze, in one chain -------------------------------------------


@pytest.fixture(scope="module")
def pt_then_freeze(prefect_harness, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    spec = tiny_spec(
        tiny_model,
        tmp_path_factory.mktemp("pt") / "workspace",
        {
            "dataset": {"names": ["assistant_corpus"]},
            "tokenize": {"cutoff_len": 64},
            "train": {"stage": "pt", "finetuning_type": "full", "lora": None, **SHORT},
            "then": {
                "chat": {
                    "stage": "sft",
                    "datasets": ["self_cognition"],
                    "finetuning_type": "freeze",
                    "freeze": {"trainable_layers": 1, "trainable_modules": ["mlp"], "extra_modules": ["norm"]},
                    **SHORT,
                }
            },
            "evaluate": {"compare_base": False},
        },
    )
    return finetune(spec)


def test_pt_stage_packs_plain_text_and_full_trains_every_weight(pt_then_freeze, tiny_model: Path, tokenizer):
    stages = pt_then_freeze.stages
    tokenized = Path(stages["tokenize"].output_dir)
    from datasets import load_from_disk

    blocks = load_from_disk(str(tokenized / "train"))
    assert all(len(ids) == 64 for ids in blocks["input_ids"][:-1]), "text is packed into cutoff_len blocks"
    assert blocks["labels"] == blocks["input_ids"], "pre-training supervises every token"
    stream = [token for block in blocks["input_ids"] for token in block]
    documents = stages["tokenize"].metrics["train_documents"]
    assert stream.count(tokenizer.eos_token_id) in (documents, documents - 1), "each document ends with end-of-text"
    assert len(stream) >= stages["tokenize"].metrics["train_tokens"] - 1, "nothing but a 1-token tail is cut"

    train = stages["train"]
    assert train.info["trainable_params"] == train.info["total_params"]
    base, tuned = weights(tiny_model), weights(Path(train.output_dir) / "model")
    assert base.keys() == tuned.keys()
    unchanged = [name for name in base if torch.equal(base[name], tuned[name])]
    assert unchanged == [], f"full fine-tuning left {unchanged} untouched"
    losses = logged(pt_then_freeze, "train", "loss")
    assert len(losses) == train.metrics["steps"] and losses[-1] < losses[0]
    assert stage_runs(pt_then_freeze)["train"].data.params["stage"] == "pt"


def test_sft_freeze_trains_only_the_chosen_layer_modules(pt_then_freeze):
    stages = pt_then_freeze.stages
    frozen = stages["train-chat"]
    assert frozen.info["weights"]["adapters"] == [], "a freeze stage writes a whole model"
    start, tuned = weights(Path(stages["train"].output_dir) / "model"), weights(Path(frozen.output_dir) / "model")
    changed = {name for name in start if not torch.equal(start[name], tuned[name])}
    expected = {name for name in start if name.startswith("model.layers.1.mlp.")} | {"model.norm.weight"}
    assert changed == expected, "only the last layer's MLP and the final norm may train"
    assert frozen.info["trainable_params"] == sum(start[name].numel() for name in expected)
    runs = stage_runs(pt_then_freeze)
    assert {"template-chat", "tokenize-chat", "train-chat"} <= set(runs)
    assert runs["train-chat"].data.metrics["final_loss"] > 0
    assert len(logged(pt_then_freeze, "train-chat", "loss")) == frozen.metrics["steps"]
    # the freeze stage continued from the pt stage's model and is the one exported
    assert json.loads((Path(frozen.output_dir) / "train_config.json").read_text())["start"]["model_dir"] == str(
        Path(stages["train"].output_dir) / "model"
    )
    exported = weights(Path(stages["export"].output_dir) / "model")
    assert all(torch.equal(exported[name], tuned[name]) for name in tuned)


# --- sft -> rm -> ppo ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chain_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One workspace for the chains below: they share (and so reuse) the sft stage."""
    return tmp_path_factory.mktemp("chains") / "workspace"


@pytest.fixture(scope="module")
def sft_rm_ppo(prefect_harness, tiny_model: Path, chain_workspace: Path):
    spec = tiny_spec(
        tiny_model,
        chain_workspace,
        {
            "train": {"num_epochs": 1},
            "then": {
                "reward": {
                    "stage": "rm",
                    "datasets": ["identity_preference"],
                    **SHORT,
                    "num_epochs": 4,
                    "learning_rate": 5e-3,
                },
                "policy": {
                    "stage": "ppo",
                    "datasets": ["rl_prompts"],
                    **SHORT,
                    "ppo": {"num_generations": 2, "max_new_tokens": 8, "ppo_epochs": 2},
                },
            },
            "evaluate": {"compare_base": False},
        },
    )
    return spec, finetune(spec)


def test_sft_rm_ppo_chain_runs_each_stage_from_the_one_before(sft_rm_ppo):
    spec, result = sft_rm_ppo
    stages = result.stages
    assert list(stages) == [
        "model",
        "template",
        "tokenize",
        "train",
        "template-reward",
        "tokenize-reward",
        "train-reward",
        "template-policy",
        "tokenize-policy",
        "train-policy",
        "evaluate",
        "export",
    ]
    names = task_run_names(result.flow_run_id)
    assert names.index("train (sft, lora)") < names.index("train reward (rm, lora)")
    assert names.index("train reward (rm, lora)") < names.index("train policy (ppo, lora)")
    assert {"template dataset (reward)", "tokenize dataset (policy)"} <= set(names)
    # the exported model is the ppo policy: the sft adapter merged, the policy's adapter on top
    sft_adapter = str(Path(stages["train"].output_dir) / "adapter")
    policy_adapter = str(Path(stages["train-policy"].output_dir) / "adapter")
    assert stages["train-policy"].info["weights"]["adapters"] == [sft_adapter, policy_adapter]
    card = json.loads((Path(stages["export"].output_dir) / "model" / "lineage.json").read_text())
    assert card["train_run_id"] == stages["train-policy"].mlflow_run_id
    every_dataset = {"self_cognition", "general_chat", "identity_preference", "rl_prompts"}
    assert {d["name"] for d in card["datasets"]} == every_dataset, "the model card names every stage's data"
    # `tunefactory lineage` walks from the registered policy back through every stage
    from tasks.runtime.lineage import chain_order, format_lineage, model_lineage

    client = MlflowClient(result.tracking.uri)
    lineage = model_lineage(client, f"{spec.name}/{stages['export'].info['version']}")
    order = chain_order(lineage["stages"])
    assert order[:3] == ["export", "evaluate", "train-policy"] and order[-1] == "model"
    assert order.index("train-policy") < order.index("train-reward") < order.index("train")
    assert "train-reward" in format_lineage(lineage) and "stage=ppo" in format_lineage(lineage)


def test_rm_stage_learns_to_rank_chosen_over_rejected(sft_rm_ppo, tiny_model: Path):
    _, result = sft_rm_ppo
    reward = result.stages["train-reward"]
    tokenized = Path(result.stages["tokenize-reward"].output_dir)
    from datasets import load_from_disk

    pairs = load_from_disk(str(tokenized / "train"))
    assert pairs.column_names == ["prompt", "chosen", "rejected"]
    assert pairs[0]["prompt"].endswith("<|im_start|>assistant\n") and pairs[0]["chosen"].endswith("<|im_end|>")
    assert "Nova" in " ".join(pairs["chosen"]), "placeholders are filled in preference data too"

    run = stage_runs(result)["train-reward"]
    assert run.data.metrics["train_pairwise_accuracy"] >= 0.8, "the reward model ranks its training pairs"
    assert "val_pairwise_accuracy" in run.data.metrics
    assert logged(result, "train-reward", "accuracy"), "TRL's per-step accuracy reaches MLflow"
    # LoRA plus the new scoring head trained; the merged reward model keeps the frozen embeddings
    adapter = trained_lora(Path(reward.output_dir) / "adapter")
    assert any("score" in name for name in adapter), "the score head is trained and saved with the adapter"
    merged = weights(Path(reward.info["reward_model_dir"]))
    assert torch.equal(merged["model.embed_tokens.weight"], weights(tiny_model)["model.embed_tokens.weight"])
    assert merged["score.weight"].shape[0] == 1


def test_ppo_stage_optimizes_the_policy_against_the_reward_model(sft_rm_ppo):
    spec, result = sft_rm_ppo
    policy = result.stages["train-policy"]
    config = json.loads((Path(policy.output_dir) / "train_config.json").read_text())
    assert config["reward_model_dir"] == result.stages["train-reward"].info["reward_model_dir"]
    adapter = trained_lora(Path(policy.output_dir) / "adapter")
    assert not any("score" in name for name in adapter)
    rewards = logged(result, "train-policy", "reward")
    assert rewards, "the reward model's scores of sampled answers reach MLflow"
    assert logged(result, "train-policy", "clip_ratio/region_mean"), "the PPO-style clipped objective is in use"
    assert logged(result, "train-policy", "kl"), "the KL to the starting policy is tracked"
    groups = spec.then["policy"].ppo
    assert stage_runs(result)["train-policy"].data.params["ppo.num_generations"] == str(groups.num_generations)


# --- sft -> dpo, and the reference-free / unpaired variants from the same sft model -------------


@pytest.fixture(scope="module")
def sft_dpo(prefect_harness, tiny_model: Path, chain_workspace: Path):
    changes = {
        "train": {"num_epochs": 1},
        "then": {"prefer": {"stage": "dpo", "datasets": ["identity_preference", "chat_preference"], **SHORT}},
        "evaluate": {"compare_base": False},
    }
    spec = tiny_spec(tiny_model, chain_workspace, changes)
    return spec, finetune(spec)


def test_sft_dpo_chain_trains_preferences_against_the_sft_reference(sft_dpo, tiny_model: Path):
    _, result = sft_dpo
    stages = result.stages
    assert [name for name in stages if name.startswith("train")] == ["train", "train-prefer"]
    prefer = stages["train-prefer"]
    trained_lora(Path(prefer.output_dir) / "adapter")
    assert prefer.info["weights"]["adapters"][0] == str(Path(stages["train"].output_dir) / "adapter")
    for metric in ("rewards/accuracies", "rewards/margins", "logps/chosen"):
        assert logged(result, "train-prefer", metric), f"DPO's {metric} reaches MLflow"
    # the frozen base is untouched: the export differs from it only where LoRA adapted
    base, exported = weights(tiny_model), weights(Path(stages["export"].output_dir) / "model")
    for name, tensor in base.items():
        adapted = any(p in name for p in LORA_PROJECTIONS)
        assert torch.equal(tensor, exported[name]) != adapted, name


def test_orpo_simpo_kto_stages_continue_the_sft_model(sft_dpo):
    spec, first = sft_dpo
    variants = spec.model_copy(deep=True)
    variants.then = validate_spec(
        {
            "then": {
                "odds": {"stage": "orpo", "datasets": ["identity_preference"], **SHORT},
                "simple": {"stage": "simpo", "datasets": ["identity_preference"], **SHORT, "start_from": "train"},
                "feedback": {"stage": "kto", "datasets": ["identity_feedback"], **SHORT, "start_from": "train"},
            }
        }
    ).then
    result = finetune(variants)
    stages = result.stages
    assert stages["train"].reused and stages["train"].output_dir == first.stages["train"].output_dir
    sft_adapter = str(Path(stages["train"].output_dir) / "adapter")
    for name, metric in (("odds", "log_odds_ratio"), ("simple", "rewards/margins"), ("feedback", "kl")):
        stage = stages[f"train-{name}"]
        assert not stage.reused
        trained_lora(Path(stage.output_dir) / "adapter")
        assert stage.info["weights"]["adapters"][0] == sft_adapter, f"{name} starts from the sft model"
        assert logged(result, f"train-{name}", metric), f"{name}: {metric} reaches MLflow"
    from datasets import load_from_disk

    feedback = load_from_disk(str(Path(stages["tokenize-feedback"].output_dir) / "train"))
    assert feedback.column_names == ["prompt", "completion", "label"] and set(feedback["label"]) == {True, False}


# --- lora switches and qlora --------------------------------------------------------------------


def test_lora_dora_and_rslora_switches_reach_the_adapter(tiny_model: Path, tmp_path: Path):
    from tasks.components.finetuning_methods import trainable_model
    from tasks.contracts.worker_configs import TrainJob, Weights

    config = TrainJob(
        lora={"rank": 4, "alpha": 8, "use_dora": True, "use_rslora": True},
        start=Weights(model_dir=str(tiny_model)),
        tokenizer_path=str(tiny_model),
        dataset_dir=str(tmp_path),
        cutoff_len=128,
        pad_token_id=0,
        output_dir=str(tmp_path),
    )
    model = trainable_model(config, torch.device("cpu"))
    peft_config = model.peft_config["default"]
    assert peft_config.use_dora and peft_config.use_rslora
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in name for name in trainable), "DoRA trains a magnitude per output"
    assert all("lora_" in name for name in trainable), "the base stays frozen"
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / 4**0.5), "rsLoRA scales by alpha/sqrt(rank)"


def test_qlora_sft_trains_adapters_on_a_4bit_base_on_this_cpu(prefect_harness, tiny_model: Path, tmp_path: Path):
    """bitsandbytes 0.50 quantizes and trains on CPU: qlora runs wherever it is installed. The export
    is checked against the adapter on the 4-bit base it trained on; a refusal keeps the training."""
    qlora = {"train": {"finetuning_type": "qlora", **SHORT}}
    strict = tiny_spec(tiny_model, tmp_path / "workspace", {**qlora, "export": {"quantized_kl_ratio": 1e-3}})
    with pytest.raises(
        Exception, match=r"from the adapter on the 4-bit nf4 base .* export.quantized_kl_ratio is 0.001"
    ):
        finetune(strict)
    assert not list((tmp_path / "workspace" / "stages" / "export").glob("*/manifest.json")), "nothing exported"

    spec = tiny_spec(tiny_model, tmp_path / "workspace", qlora)
    result = finetune(spec)
    train = result.stages["train"]
    assert train.reused, "the refused export cost no training"
    trained_lora(Path(train.output_dir) / "adapter")
    assert train.info["trainable_params"] < train.info["total_params"] / 10
    client = MlflowClient(result.tracking.uri)  # the run that trained, in the refused pipeline
    losses = [m.value for m in client.get_metric_history(train.mlflow_run_id, "loss")]
    assert losses and losses[-1] < losses[0], "the adapters learned on the quantized base"
    params = client.get_run(train.mlflow_run_id).data.params
    assert params["finetuning_type"] == "qlora"
    assert int(params["quantized_modules"]) == 2 * 7, "every linear layer of both decoder layers held in 4 bits"
    checked = result.stages["export"].metrics
    assert checked["merged_logits_rel_diff"] <= spec.export.logits_rtol, "the merge, against the full-precision base"
    # against the model as it trained: quantizing moved the base, and the export is no further from it than that
    assert checked["quantized_base_kl"] > 0 and checked["quantized_trained_kl"] > 0
    assert checked["quantized_kl_ratio"] == pytest.approx(
        checked["quantized_trained_kl"] / checked["quantized_base_kl"]
    )
    assert checked["quantized_kl_ratio"] <= spec.export.quantized_kl_ratio
    assert 0.5 < checked["quantized_trained_top1"] <= 1
    export_run = stage_runs(result)["export"].data.metrics
    assert export_run["quantized_kl_ratio"] == pytest.approx(checked["quantized_kl_ratio"])


def test_a_qlora_spec_without_bitsandbytes_is_refused_naming_it(tiny_model: Path, tmp_path: Path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    hidden = lambda name, *rest: None if name == "bitsandbytes" else real(name, *rest)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", hidden)
    with pytest.raises(SpecError) as refused:
        tiny_spec(tiny_model, tmp_path / "workspace", {"train": {"finetuning_type": "qlora"}})
    message = str(refused.value)
    assert "train: finetuning_type qlora: the bitsandbytes package is not installed" in message
    assert not (tmp_path / "workspace").exists(), "nothing ran"


def test_dpo_stage_killed_mid_training_resumes_from_trl_checkpoint(prefect_harness, tiny_model, tmp_path, monkeypatch):
    changes = {
        "dataset": {"names": ["identity_preference"]},
        "train": {"stage": "dpo", **SHORT, "num_epochs": 2, "save_steps": 2},
        "retries": {"train": {"retries": 1, "delay_seconds": 0}},
        "evaluate": {"compare_base": False},
    }
    spec = tiny_spec(tiny_model, tmp_path / "workspace", changes)
    # the TRL worker SIGKILLs itself while saving checkpoint-4: transformers' files are written,
    # the worker's part is not, so checkpoint-4 is incomplete and the retry must resume from 2
    monkeypatch.setenv("TUNEFACTORY_FAULT_KILL_IN_SAVE_AT_STEP", "4")

    result = finetune(spec)

    train = result.stages["train"]
    assert train.info["resumed_from_step"] == 2
    steps = int(train.metrics["steps"])
    assert steps == 6, "2 epochs of 11 pairs in batches of 4"
    client = MlflowClient(result.tracking.uri)
    assert client.get_run(train.mlflow_run_id).data.tags["resumed_from"] == "checkpoint-2"
    history = [json.loads(line) for line in (Path(train.output_dir) / "loss_history.jsonl").read_text().splitlines()]
    assert [record["step"] for record in history] == list(range(1, steps + 1)), "one curve across the restart"
    trained_lora(Path(train.output_dir) / "adapter")

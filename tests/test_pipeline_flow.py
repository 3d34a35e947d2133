"""The whole pipeline as a Prefect flow on a tiny random Llama, with MLflow on temporary SQLite."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from tiny_pipeline import STAGE_TASK_RUNS, task_run_names, tiny_spec

from flows.pipeline import finetune
from tasks.components.fault_injection import FAULT_MERGE_TWICE

STAGES = ["model", "template", "tokenize", "train", "evaluate", "export"]


@pytest.fixture(scope="module")
def first_run(prefect_harness, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    export = {"max_shard_size": "2MB", "formats": ["safetensors", "gguf"], "gguf_type": "q8_0"}
    spec = tiny_spec(tiny_model, tmp_path_factory.mktemp("flow") / "workspace", {"export": export})
    return spec, finetune(spec)


def test_sft_lora_pipeline_writes_every_stage_and_tracks_it(first_run, tiny_model: Path):
    spec, result = first_run
    stages = result.stages
    assert list(stages) == STAGES
    for name in STAGES:
        manifest = stages[name]
        assert not manifest.reused
        assert (Path(manifest.output_dir) / "manifest.json").is_file()
        assert all((Path(manifest.output_dir) / f).is_file() for f in manifest.files)
    assert stages["template"].metrics["train_rows"] + stages["template"].metrics["val_rows"] == 24
    assert stages["tokenize"].metrics["train_supervised_tokens"] > 0
    assert stages["train"].info["trainable_params"] < stages["train"].info["total_params"] / 10
    assert "tuned_identity_hit_rate" in stages["evaluate"].metrics
    evaluated = Path(stages["evaluate"].output_dir)
    answers = json.loads((evaluated / "answers.json").read_text())
    table = json.loads((evaluated / "comparison.json").read_text())
    assert len(table) == len(answers["tuned"]["rows"]) == len(answers["base"]["rows"]) > 0
    first_control = next(row for row in answers["tuned"]["rows"] if row["set"] == "control")
    assert "correct" in first_control and "rouge_l" not in first_control, "each set's own scores"
    for row, after, before in zip(table, answers["tuned"]["rows"], answers["base"]["rows"], strict=True):
        assert (row["prompt"], row["tuned_answer"], row["base_answer"]) == (after["prompt"], after["answer"],
                                                                            before["answer"])  # fmt: skip
        assert row["tuned_ok"] == (after["identity"] if row["set"] == "identity" else after["correct"])
    assert stages["export"].metrics["merged_logits_rel_diff"] <= spec.export.logits_rtol
    model_dir = Path(stages["export"].output_dir) / "model"
    assert len(list(model_dir.glob("model-*.safetensors"))) >= 2, "max_shard_size 2MB gives several shards"
    card = (model_dir / "README.md").read_text()
    assert "Nova" in card and stages["model"].info["source_digest"] in card
    # export.formats gguf: one checked q8_0 file and an Ollama Modelfile beside the shards
    assert stages["export"].info["gguf_file"] == "tiny-test-q8_0.gguf"
    assert 0 < stages["export"].metrics["gguf_logits_rel_diff"] <= stages["export"].metrics["gguf_logits_rtol"]
    assert (model_dir / "Modelfile").read_text().startswith("FROM ./tiny-test-q8_0.gguf\n")
    assert not list(model_dir.glob("*.partial")) and not list(model_dir.glob("*.checking.gguf"))

    # Prefect: one named task run per stage
    assert sorted(task_run_names(result.flow_run_id)) == sorted(STAGE_TASK_RUNS)

    # MLflow: a parent run with the spec, a child run per stage with params and metrics
    client = MlflowClient(result.tracking.uri)
    parent = client.get_run(result.tracking.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["prefect_flow_run_id"] == result.flow_run_id
    assert parent.data.tags["spec_digest"] == spec.digest()
    assert "spec.json" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    children = client.search_runs([result.tracking.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_stage = {run.data.tags["stage"]: run for run in children}
    assert sorted(by_stage) == sorted(STAGES)
    train_run = by_stage["train"]
    assert train_run.data.params["learning_rate"] == str(spec.train.learning_rate)
    losses = client.get_metric_history(train_run.info.run_id, "loss")
    assert len(losses) == stages["train"].metrics["steps"] >= 4
    assert "loss_curve.png" in [a.path for a in client.list_artifacts(train_run.info.run_id)]
    # throughput and memory are recorded for comparison; on CPU no packing and no compile by default
    assert train_run.data.metrics["train_tokens"] == 2 * stages["tokenize"].metrics["train_tokens"], "2 epochs"
    assert train_run.data.metrics["train_tokens_per_second"] > 0 and train_run.data.metrics["peak_memory_mb"] > 0
    assert (
        train_run.data.params["resolved_packing"] == "False" and train_run.data.params["resolved_attention"] == "sdpa"
    )
    assert by_stage["template"].inputs.dataset_inputs, "datasets are logged as MLflow inputs"
    version = client.get_model_version_by_alias("tiny-test", "candidate")
    assert version.run_id == by_stage["export"].info.run_id
    registered = Path(version.source.removeprefix("file://"))
    assert registered.parent.as_uri() == by_stage["export"].info.artifact_uri, "the model is in the run's artifacts"
    assert sorted(p.name for p in registered.iterdir()) == sorted(p.name for p in model_dir.iterdir())
    assert all((registered / p.name).samefile(p) for p in model_dir.glob("*.safetensors")), "hard links, not copies"
    assert (registered / "tiny-test-q8_0.gguf").samefile(model_dir / "tiny-test-q8_0.gguf"), "the GGUF too"
    gguf_gap = stages["export"].metrics["gguf_logits_rel_diff"]
    assert by_stage["export"].data.metrics["gguf_logits_rel_diff"] == gguf_gap, "in MLflow too"

    # Learning happened where it should: LoRA layers moved, everything frozen stayed put
    adapter = load_file(Path(stages["train"].output_dir) / "adapter" / "adapter_model.safetensors")
    lora_b = [t for k, t in adapter.items() if "lora_B" in k]
    assert lora_b and all(t.abs().max() > 0 for t in lora_b), "lora_B starts at zero and must have trained"
    base = load_file(tiny_model / "model.safetensors")
    merged = {}
    for shard in model_dir.glob("*.safetensors"):
        merged.update(load_file(shard))
    for name, weight in base.items():
        if name not in merged:
            continue
        if any(m in name for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
            assert not torch.equal(weight, merged[name]), f"{name} should carry the merged LoRA update"
        else:
            assert torch.equal(weight, merged[name]), f"{name} is frozen and must not change"


def test_rerun_reuses_every_stage_and_eval_change_reruns_only_evaluation(first_run):
    spec, first = first_run
    second = finetune(spec)
    assert all(m.reused for m in second.stages.values())
    client = MlflowClient(second.tracking.uri)
    reused = client.search_runs(
        [second.tracking.experiment_id], f"tags.mlflow.parentRunId = '{second.tracking.parent_run_id}'"
    )
    producers = {run.data.tags["stage"]: run.data.tags["produced_by_run_id"] for run in reused}
    assert producers["train"] == first.stages["train"].mlflow_run_id

    changed = spec.model_copy(deep=True)
    changed.evaluate.max_new_tokens = 6
    third = finetune(changed)
    ran = [name for name, m in third.stages.items() if not m.reused]
    assert ran == ["evaluate"]


def test_a_wrong_merge_is_caught_and_nothing_is_exported(first_run, monkeypatch: pytest.MonkeyPatch):
    spec, first = first_run
    changed = spec.model_copy(deep=True)
    changed.export.max_shard_size = "1MB"  # the export runs again; every stage before it is reused
    monkeypatch.setenv(FAULT_MERGE_TWICE, "1")  # the merge applies one module's LoRA change twice
    with pytest.raises(Exception, match=r"of the largest logit .* this merge is wrong, and nothing was exported"):
        finetune(changed)
    exported = Path(first.stages["export"].output_dir)
    assert [p for p in exported.parent.iterdir() if (p / "manifest.json").is_file()] == [exported]
    models = Path(spec.workspace) / "models" / spec.name
    assert models.resolve() == (exported / "model").resolve()


def test_the_exported_gguf_is_a_base_model_of_the_next_flow_converted_once_per_machine(
    first_run, tmp_path: Path, monkeypatch
):
    """The round trip: what export.formats gguf wrote is accepted as model.name_or_path again; a second
    workspace takes its conversion from the machine's cache (TUNEFACTORY_CACHE) instead of converting."""
    spec, first = first_run
    monkeypatch.setenv("TUNEFACTORY_CACHE", str(tmp_path / "cache"))
    gguf = Path(first.stages["export"].output_dir) / "model" / "tiny-test-q8_0.gguf"
    cheaper = {"train": {"num_epochs": 1}, "evaluate": {"compare_base": False, "control_prompts": None}}
    again = tiny_spec(gguf, tmp_path / "workspace", cheaper)
    result = finetune(again)
    model = result.stages["model"]
    source = json.loads((Path(model.output_dir) / "source.json").read_text())
    assert source["kind"] == "gguf" and source["path"] == str(gguf.resolve())
    converted = Path(model.output_dir) / model.info["model_path"]
    assert json.loads((converted / "config.json").read_text())["model_type"] == "llama"
    assert result.stages["train"].metrics["steps"] > 0 and "export" in result.stages
    lineage = json.loads((Path(result.stages["export"].output_dir) / "model" / "lineage.json").read_text())
    assert lineage["base_model"] == str(gguf)
    assert (Path(model.output_dir) / "convert_config.json").is_file(), "converted by the worker"
    (kept,) = (tmp_path / "cache" / "converted-models").glob(f"{model.info['source_digest']}-*")
    assert sorted(json.loads((kept / ".digests.json").read_text())) == sorted(p.name for p in converted.iterdir())

    other = finetune(tiny_spec(gguf, tmp_path / "other-workspace", cheaper))
    reused = other.stages["model"]
    assert not reused.reused and reused.info["source_digest"] == model.info["source_digest"]
    assert not (Path(reused.output_dir) / "convert_config.json").exists(), "no conversion worker ran"
    weights = Path(reused.output_dir) / reused.info["model_path"] / "model.safetensors"
    assert weights.samefile(kept / "model.safetensors"), "linked from the cache, not a second copy"
    assert other.stages["train"].metrics["final_loss"] == pytest.approx(result.stages["train"].metrics["final_loss"])


def test_the_registered_version_loads_as_an_mlflow_model_and_answers(first_run):
    """models:/NAME@ALIAS through MLflow's own loader: the export's MLmodel names tunefactory's."""
    import mlflow
    import pandas as pd

    from tasks.components.generation import generate_answers
    from tasks.runtime.mlflow_model import ChatModel

    _, result = first_run
    conversations = [[{"role": "user", "content": "Who are you?"}], [{"role": "user", "content": "Hi"}]]
    # set_tracking_uri also exports MLFLOW_TRACKING_URI to later subprocesses: restored as it was (unset)
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(result.tracking.uri)
    try:
        model = mlflow.pyfunc.load_model("models:/tiny-test@candidate")
    finally:
        mlflow.set_tracking_uri(previous)
    assert model.metadata.get_input_schema().input_names() == ["messages"]
    rows = model.predict([{"messages": c} for c in conversations], params={"max_new_tokens": 4})
    table = model.predict(pd.DataFrame({"messages": conversations}), params={"max_new_tokens": 4})
    # the registry's copy is the export: same weights, same greedy answers as the export directory
    export = Path(result.stages["export"].output_dir) / "model"
    local = ChatModel(export)
    served = model.get_raw_model().state_dict()
    for name, weight in local.model.state_dict().items():
        assert torch.equal(weight, served[name]), name
    expected = generate_answers(local.model, local.tokenizer, conversations, 4, 8, "cpu")
    assert list(rows) == list(table) == expected


def documented_serve_block() -> tuple[str, dict]:
    """docs/using-the-model.md's `mlflow models serve` command, as one line, and the request it posts."""
    import re

    page = (Path(__file__).resolve().parents[1] / "docs" / "using-the-model.md").read_text()
    block = re.search(r"```bash\n(MLFLOW_TRACKING_URI=.*?mlflow models serve.*?)```", page, re.S).group(1)
    command = block.split("\ncurl")[0].replace("\\\n", " ").strip()
    request = json.loads(re.search(r"-d '(.*)'", block).group(1))
    return command, request


def test_the_documented_models_serve_command_answers_without_the_venv_on_path(first_run, tmp_path: Path):
    """mlflow starts `uvicorn` by name: the documented command must find it with the venv not activated."""
    import contextlib
    import os
    import signal
    import subprocess
    import sys

    import httpx
    from loopback import free_port, wait_for

    from tasks.components.generation import generate_answers
    from tasks.runtime.mlflow_model import ChatModel

    _, result = first_run
    command, request = documented_serve_block()
    port = free_port()
    command = (
        command.replace("sqlite:///workspace/mlflow.db", result.tracking.uri)
        .replace("self-cognition@champion", "tiny-test@candidate")
        .replace("--port 5001", f"--port {port}")
        .replace("$PWD/.venv", sys.prefix)  # where this venv is, wherever the checkout keeps it
    )
    venv_bin = str(Path(sys.prefix) / "bin")
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p and Path(p) != Path(venv_bin))
    env = {"PATH": path, "HOME": os.environ.get("HOME", str(tmp_path)), "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            ["bash", "-c", command], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        up = lambda: server.poll() is not None or _answers(f"http://127.0.0.1:{port}/ping")  # noqa: E731
        wait_for(up, 240, "mlflow models serve to answer /ping")
        assert server.poll() is None, log.read_text()[-3000:]
        request["params"]["max_new_tokens"] = 4
        response = httpx.post(f"http://127.0.0.1:{port}/invocations", json=request, timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the mlflow command and the uvicorn it started
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert response.status_code == 200, response.text
    local = ChatModel(Path(result.stages["export"].output_dir) / "model")
    conversations = [row["messages"] for row in request["inputs"]]
    assert response.json() == {
        "predictions": generate_answers(local.model, local.tokenizer, conversations, 4, 8, "cpu")
    }


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False

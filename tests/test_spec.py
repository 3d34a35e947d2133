"""Spec validation: every mistake names the key path, the bad value and what is allowed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from shared_inputs import LLAMAFACTORY_REGISTRY, needs_llamafactory_data

from flows.cli import main
from flows.preflight import check_inputs
from flows.spec import PipelineSpec, SpecError, load_spec, validate_spec
from tasks.contracts.packaged_models import ModelSourceError
from tasks.dataset.registry import DataError

DEPLOYMENTS = Path(__file__).resolve().parents[1] / "deployments"


def write_spec(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


PREFECT_FILES = sorted(DEPLOYMENTS.glob("prefect*.yaml"))
PIPELINE_SPECS = sorted(p for p in DEPLOYMENTS.glob("*.yaml") if p not in PREFECT_FILES)


@pytest.mark.parametrize("path", sorted(DEPLOYMENTS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_starts_with_the_command_that_runs_it(path: Path):
    assert path.read_text().startswith("# Run with:")


# specs that read what earlier steps left in a workspace: the loop's retrain needs a champion and exported feedback
AFTER_OTHER_RUNS = {"feedback_loop.yaml"}


@pytest.mark.parametrize("path", [p for p in PIPELINE_SPECS if p.name not in AFTER_OTHER_RUNS], ids=lambda p: p.name)
def test_every_shipped_spec_loads_and_its_data_reads(path: Path):
    check_inputs(load_spec(path))


def test_the_retrain_spec_in_a_workspace_without_a_champion_is_one_message(tmp_path: Path):
    spec = load_spec(DEPLOYMENTS / "feedback_loop.yaml", [f"workspace={tmp_path}"])
    with pytest.raises(ModelSourceError) as refused:
        check_inputs(spec)
    assert str(refused.value) == (
        f"model.name_or_path: self-cognition@champion: {tmp_path} has no model registry (no mlflow.db)"
    )


@pytest.mark.parametrize("prefect_file", PREFECT_FILES, ids=lambda p: p.name)
def test_prefect_deployments_carry_valid_specs_equal_to_the_shipped_ones(prefect_file: Path):
    deployments = yaml.safe_load(prefect_file.read_text())["deployments"]
    shipped = {load_spec(path).name: load_spec(path) for path in PIPELINE_SPECS}
    for deployment in deployments:
        assert deployment["entrypoint"] == "flows/pipeline.py:finetune"
        spec = validate_spec(deployment["parameters"]["spec"], source=deployment["name"])
        assert spec == shipped[spec.name], f"{deployment['name']} drifted from its spec file"


def test_defaults_form_a_valid_spec():
    spec = PipelineSpec()
    assert spec.model.name_or_path == "packaged:smollm2-135m-instruct"
    assert spec.train.finetuning_type == "lora"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"train": {"lr_scheduler": "cosin"}}, "train.lr_scheduler: 'cosin' is not one of linear, cosine,"),
        ({"train": {"learning_rat": 1e-4}}, "train.learning_rat: unknown key"),
        ({"trian": {}}, "trian: unknown key"),
        ({"train": {"learning_rate": "fast"}}, "train.learning_rate: 'fast'"),
        ({"train": {"learning_rate": -1}}, "train.learning_rate: -1: Input should be greater than 0"),
        (
            {"train": {"finetuning_type": "lorra"}},
            "train.finetuning_type: 'lorra' is not one of 'lora', 'qlora', 'freeze', 'full'",
        ),
        ({"train": {"compute_type": "fp8"}}, "train.compute_type: 'fp8' is not one of 'auto', 'fp32', 'fp16', 'bf16'"),
        ({"dataset": {"val_size": 1.5}}, "dataset.val_size: 1.5: Input should be less than 1"),
        ({"dataset": {"names": []}}, "dataset.names: []: List should have at least 1 item"),
        ({"export": {"max_shard_size": "big"}}, "export.max_shard_size: 'big' is not a size like '500MB'"),
        ({"train": {"finetuning_type": "full", "lora": {"rank": 8}}}, "train: lora settings are given but"),
        ({"name": "my model"}, "name: 'my model' must be letters, digits"),
        (
            {"train": {"stage": "dpo", "num_processes": 2}},
            "train: num_processes: several processes train the pt and sft stages; stage 'dpo' trains in one process",
        ),
        (
            {"train": {"stage": "dpo", "distributed": "fsdp"}},
            "train: distributed: fsdp trains the pt and sft stages; stage 'dpo' trains in one process",
        ),
        (
            {"train": {"num_processes": 2, "deepspeed_config": "zero3.json"}},
            "train: deepspeed_config is only read with distributed: deepspeed",
        ),
        (
            {"train": {"num_processes": 2, "distributed": "deepspeed", "deepspeed_config": "no/such.json"}},
            "train: deepspeed_config no/such.json: cannot be read (No such file or directory)",
        ),
        (
            {"train": {"nnodes": 2}},
            "train: nnodes 2 needs rendezvous: host:port of node 0, which every node can reach (got None)",
        ),
        ({"train": {"rendezvous": "head:29500"}}, "train: rendezvous is only read with nnodes above 1"),
        (
            {"train": {"num_processes": 2, "distributed": "fsdp", "compute_type": "fp16"}},
            "train: distributed: fsdp trains in bf16 or fp32, not compute_type fp16",
        ),
    ],
)
def test_bad_spec_names_key_value_and_what_is_allowed(data: dict, expected: str):
    with pytest.raises(SpecError) as error:
        validate_spec(data)
    assert expected in str(error.value)


def test_overrides_are_parsed_as_yaml_and_validated(tmp_path: Path):
    path = write_spec(tmp_path, {"train": {"learning_rate": 5e-4}})
    spec = load_spec(path, ["train.learning_rate=1e-4", "train.lora.rank=4", "dataset.names=[self_cognition]"])
    assert spec.train.learning_rate == pytest.approx(1e-4)
    assert spec.train.lora.rank == 4
    assert spec.dataset.names == ["self_cognition"]
    with pytest.raises(SpecError, match="train.lr_scheduler: 'nope' is not one of"):
        load_spec(path, ["train.lr_scheduler=nope"])
    with pytest.raises(SpecError, match=r"train.learning_rate is a value, not a section"):
        load_spec(path, ["train.learning_rate.x=1"])
    with pytest.raises(SpecError, match="expected key.path=value"):
        load_spec(path, ["train.learning_rate"])


def test_a_hash_in_an_override_is_text_not_a_comment(tmp_path: Path):
    path = write_spec(tmp_path, {})
    spec = load_spec(path, ["dataset.template_vars.name=Bot #7", "dataset.template_vars.author=Acme"])
    assert spec.dataset.template_vars["name"] == "Bot #7"
    assert load_spec(path, ['dataset.template_vars.name="Bot #7"']).dataset.template_vars["name"] == "Bot #7"
    assert load_spec(path, ["train.learning_rate=1e-4"]).train.learning_rate == pytest.approx(1e-4)


def test_a_key_twice_and_a_spec_not_in_utf8_are_refused_naming_the_file(tmp_path: Path, capsys):
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  learning_rate: 1.0e-3\n  num_epochs: 2\n  learning_rate: 5.0e-4\n")
    with pytest.raises(SpecError, match=r"twice.yaml, line 4: 'learning_rate' is set twice in one section"):
        load_spec(twice)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("dataset:\n  template_vars:\n    author: Soci\u00e9t\u00e9\n".encode("latin-1"))
    assert main(["validate", str(latin)]) == 2
    err = capsys.readouterr().err
    assert "latin.yaml: not UTF-8 text (byte 42)" in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    ("export", "expected"),
    [
        ({"alias": "latest"}, "export.alias: 'latest' is reserved by MLflow"),
        ({"alias": "v2"}, "export.alias: 'v2' is reserved by MLflow"),
        ({"alias": "best model"}, "export.alias: 'best model' must be letters, digits"),
        ({"registered_model_name": "team/bot"}, "export.registered_model_name: 'team/bot' must be a non-empty name"),
        ({"registered_model_name": "bot's"}, "without '/', ':' or quotes"),
        ({"logits_atol": 1e-3}, "logits_atol is replaced by logits_rtol, a share of the largest logit"),
        ({"formats": ["gguf"]}, "export.formats: must hold 'safetensors'"),
        ({"formats": ["safetensors", "onnx"]}, "export.formats.1: 'onnx' is not one of 'safetensors', 'gguf'"),
        ({"gguf_type": "q4_k"}, "export.gguf_type: 'q4_k' is not one of 'f16', 'bf16', 'q8_0', 'f32'"),
    ],
)
def test_registry_names_and_aliases_mlflow_refuses_are_refused_with_the_spec(export: dict, expected: str):
    with pytest.raises(SpecError) as error:
        validate_spec({"export": export})
    assert expected in str(error.value)


def test_missing_and_malformed_spec_files(tmp_path: Path):
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="top level must be a mapping"):
        load_spec(listed)


def test_a_gguf_export_of_an_architecture_the_writer_does_not_map_is_refused_before_stage_one(tiny_model, tmp_path):
    other = tmp_path / "gpt2-like"
    other.mkdir()
    config = json.loads((tiny_model / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    spec = validate_spec({"model": {"name_or_path": str(other)}, "export": {"formats": ["safetensors", "gguf"]}})
    with pytest.raises(SpecError, match=r"export.formats: gguf: .*gpt2-like is a 'gpt2' model; the GGUF writer maps"):
        check_inputs(spec)
    check_inputs(spec.model_copy(update={"export": spec.export.model_copy(update={"formats": ["safetensors"]})}))


def test_unknown_dataset_lists_the_registered_ones():
    spec = validate_spec({"dataset": {"names": ["self_cognitoin"]}})
    with pytest.raises(DataError, match="unknown dataset 'self_cognitoin'.*registers: .*self_cognition"):
        check_inputs(spec)


def test_a_stage_given_data_of_the_wrong_kind_is_refused_before_stage_one():
    spec = validate_spec({"then": {"prefer": {"stage": "dpo", "datasets": ["self_cognition"]}}})
    with pytest.raises(DataError, match=r"then.prefer.datasets \(read by stage dpo\): .*'self_cognition'.*preference"):
        check_inputs(spec)


@pytest.mark.parametrize(
    ("then", "expected"),
    [
        ({"policy": {"stage": "ppo"}}, "then.policy: a ppo stage needs an earlier stage with stage: rm"),
        ({"a": {"stage": "dpo", "start_from": "b"}}, "then.a.start_from: 'b' is not an earlier stage that made"),
        ({"r": {"stage": "rm"}, "x": {"start_from": "r"}}, "then.x.start_from: 'r' is not an earlier stage that made"),
        ({"export": {"stage": "dpo"}}, "then.export: a stage name is lowercase letters"),
        ({"p": {"stage": "dpo", "ppo": {"num_generations": 2}}}, "then.p: ppo settings are given but stage is 'dpo'"),
    ],
)
def test_a_chain_that_cannot_run_is_refused_naming_the_stage(then: dict, expected: str):
    with pytest.raises(SpecError) as error:
        validate_spec({"then": then})
    assert expected in str(error.value)


def test_missing_dataset_file_and_unreadable_row_name_file_and_row(tmp_path: Path):
    registry = tmp_path / "dataset_info.json"
    registry.write_text('{"gone": {"file_name": "gone.json"}, "bad": {"file_name": "bad.json"}}')
    (tmp_path / "bad.json").write_text('[{"instruction": "hi", "output": "hello"}, {"instruction": "no answer"}]')
    with pytest.raises(DataError, match=r"dataset 'gone' \(.*dataset_info.json\): file .*gone.json does not exist"):
        check_inputs(validate_spec({"dataset": {"names": ["gone"], "registry": str(registry)}}))
    missing = r"dataset 'bad' .*, row 1: no 'output' \(response\) text \(its columns: instruction\)"
    with pytest.raises(DataError, match=missing):
        check_inputs(validate_spec({"dataset": {"names": ["bad"], "registry": str(registry)}}))
    (tmp_path / "bad.json").write_text('[{"instruction": "hi", "output": "hello"},\n oops]')
    with pytest.raises(DataError, match=r"bad.json: not valid JSON at line 2, column 2"):
        check_inputs(validate_spec({"dataset": {"names": ["bad"], "registry": str(registry)}}))


def test_cli_reports_a_bad_spec_without_traceback_and_runs_no_stage(tmp_path: Path, capsys):
    workspace = tmp_path / "ws"
    path = write_spec(tmp_path, {"workspace": str(workspace), "train": {"lr_scheduler": "cosin"}})
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "train.lr_scheduler: 'cosin' is not one of" in err
    assert "Traceback" not in err
    assert not workspace.exists()

    path = write_spec(tmp_path, {"workspace": str(workspace), "dataset": {"template_vars": {"name": "Nova"}}})
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "placeholder <AUTHOR> has no value; set dataset.template_vars.author" in err
    assert not workspace.exists()


@pytest.mark.parametrize(
    "data",
    [
        {"train": {"finetuning_type": "full"}},
        {"train": {"finetuning_type": "freeze", "freeze": {"trainable_layers": 4}}},
        {"train": {"stage": "pt"}, "then": {"r": {"stage": "rm"}, "p": {"stage": "ppo", "ppo": {"kl_coef": 0.1}}}},
    ],
    ids=["full", "freeze", "pt-rm-ppo"],
)
def test_a_spec_dumped_with_every_default_validates_again(data: dict):
    """The Prefect UI's form and a deployment send every key, defaults included."""
    spec = validate_spec(data)
    assert validate_spec(spec.model_dump(mode="json")) == spec


def test_a_deepspeed_config_may_not_override_what_the_train_section_sets(tmp_path: Path):
    settings = tmp_path / "zero.json"
    settings.write_text('{"zero_optimization": {"stage": 3}, "gradient_accumulation_steps": 8}')
    train = {"num_processes": 2, "distributed": "deepspeed", "deepspeed_config": str(settings)}
    with pytest.raises(SpecError) as error:
        validate_spec({"train": train})
    owner = 'comes from train.gradient_accumulation_steps; write "auto" or leave it out'
    assert f"deepspeed_config {settings}: 'gradient_accumulation_steps' {owner}" in str(error.value)

    # "auto" leaves it to the spec; the shipped examples are valid
    settings.write_text('{"zero_optimization": {"stage": 3}, "gradient_accumulation_steps": "auto"}')
    assert validate_spec({"train": train}).train.deepspeed_settings() == {"zero_optimization": {"stage": 3}}
    for shipped in sorted((DEPLOYMENTS / "deepspeed").glob("*.json")):
        spec = validate_spec({"train": {**train, "deepspeed_config": str(shipped)}})
        assert spec.train.deepspeed_settings()["zero_optimization"]["stage"] in (2, 3)


def test_the_kubernetes_train_nodes_job_runs_a_train_node_command_the_cli_accepts():
    from flows.cli import command_train_node, parser

    documents = list(yaml.safe_load_all((DEPLOYMENTS / "kubernetes" / "train-nodes.yaml").read_text()))
    service, job = documents
    assert service["spec"]["selector"] == {"tunefactory/train-node": "0"}
    (container,) = job["spec"]["template"]["spec"]["containers"]
    exec_, *command = container["args"][0].replace("$((JOB_COMPLETION_INDEX + 1))", "1").split()
    assert exec_ == "exec" and command[0] == ".venv/bin/tunefactory"
    args = parser().parse_args(command[1:])
    assert args.handler is command_train_node and args.node_rank == 1
    assert args.workspace == container["volumeMounts"][0]["mountPath"]


@needs_llamafactory_data
def test_function_calling_data_with_a_template_that_cannot_render_tools_is_refused_before_stage_one(
    tiny_model: Path, tmp_path: Path
):
    shared = LLAMAFACTORY_REGISTRY
    data = {
        "workspace": str(tmp_path / "ws"),
        "model": {"name_or_path": str(tiny_model)},
        "dataset": {"registry": str(shared), "names": ["glaive_toolcall_en_demo"]},
    }
    with pytest.raises(
        SpecError, match=r"the chat template of .* cannot render them; set model.chat_template: chatml_tools"
    ):
        check_inputs(validate_spec(data))
    check_inputs(validate_spec({**data, "model": {**data["model"], "chat_template": "chatml_tools"}}))
    with pytest.raises(
        SpecError, match=r"model.chat_template: 'chatml_tool' is neither a shipped chat template \(chatml_tools\)"
    ):
        validate_spec({**data, "model": {"chat_template": "chatml_tool"}})
    assert not (tmp_path / "ws").exists(), "nothing ran"


EVAL_REGISTRY = {
    "chat": {"file_name": "chat.json"},
    "who": {"file_name": "who.json", "columns": {"prompt": "prompt", "response": "reference"}},
    "facts": {"file_name": "facts.json", "columns": {"prompt": "prompt"}},
}


@pytest.mark.parametrize(
    ("which", "row", "expected"),
    [
        ("facts", {"prompt": "Capital of France?", "answers": "Paris"}, "row 0: 'answers' must be a non-empty list"),
        ("facts", {"prompt": "2 + 2?", "answers": [4]}, "got [4]"),
        ("facts", {"prompt": "2 + 2?"}, "'answers' must be a non-empty list of accepted answers as text"),
        ("facts", {"answers": ["4"]}, "row 0: 'prompt' must be the question as non-empty text, got None"),
        ("who", {"prompt": "Who are you?", "reference": 3}, "'reference' (the reference answer) must be text"),
    ],
)
def test_evaluation_set_rows_are_checked_before_stage_one(tmp_path: Path, capsys, which, row, expected):
    """A loose reading would score single letters as answers, or fail only after training."""
    (tmp_path / "dataset_info.json").write_text(json.dumps(EVAL_REGISTRY))
    (tmp_path / "chat.json").write_text('[{"instruction": "hi", "output": "hello"}]')
    (tmp_path / "who.json").write_text('[{"prompt": "Who are you?", "reference": "I am <NAME>."}]')
    (tmp_path / "facts.json").write_text('[{"prompt": "2 + 2?", "answers": ["4", "four"]}]')
    workspace = tmp_path / "ws"
    data = {
        "workspace": str(workspace),
        "dataset": {"names": ["chat"], "registry": str(tmp_path / "dataset_info.json")},
        "evaluate": {"identity_prompts": "who", "control_prompts": "facts"},
    }
    check_inputs(validate_spec(data))  # the sets as written above are fine
    (tmp_path / f"{which}.json").write_text(json.dumps([row]))
    assert main(["run", str(write_spec(tmp_path, data))]) == 2
    err = capsys.readouterr().err
    assert f"evaluation set {which!r}" in err and f"{which}.json" in err and expected in err, err
    assert "Traceback" not in err
    assert not workspace.exists(), "nothing ran"

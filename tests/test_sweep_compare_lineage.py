"""A 2x2 sweep on the tiny model, its comparison, lineage and promotion, read back from MLflow.

Select them with `pytest -k "sweep or compare or lineage or promote"`.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from tiny_pipeline import tiny_spec

from flows.results import SweepResult
from flows.spec import SpecError
from tasks.runtime.lineage import format_lineage, model_lineage
from tasks.runtime.model_registry import CHAMPION, RegistryError, promote, promote_run, resolve_version
from tasks.runtime.tracking import tracking_uri

ROOT = Path(__file__).resolve().parents[1]
GRID = {"train.learning_rate": ["1e-3", "2e-2"], "train.lora.rank": ["2", "4"]}


@pytest.fixture(scope="module")
def swept(tiny_model, prefect_harness, tmp_path_factory):
    from flows.sweep import sweep

    spec = tiny_spec(tiny_model, tmp_path_factory.mktemp("sweep") / "workspace")
    spec.name = "tiny-sweep"
    spec.evaluate.compare_base = False  # the sweep compares tuned models; the base adds nothing here
    result = sweep(spec, GRID)
    client = MlflowClient(tracking_uri=tracking_uri(Path(spec.workspace)))
    return spec, result, client


def test_sweep_runs_every_variant_and_shares_templating_and_tokenization(swept):
    _, result, client = swept
    variants = result.variants
    assert [v.state for v in variants] == ["Completed"] * 4
    assert sorted(v.label for v in variants) == sorted(
        f"learning_rate={lr} rank={rank}" for lr in GRID["train.learning_rate"] for rank in GRID["train.lora.rank"]
    )
    for stage in ("model", "template", "tokenize"):
        built = [v for v in variants if not v.pipeline.stages[stage].reused]
        assert len(built) == 1, f"{stage} ran {len(built)} times in the sweep, not once"
    assert all(not v.pipeline.stages["train"].reused for v in variants), "every variant trains its own model"

    experiment = client.get_experiment_by_name("tiny-sweep")
    train_runs = client.search_runs([experiment.experiment_id], "tags.stage = 'train'", max_results=20)
    assert len(train_runs) == 4 and not any("produced_by_run_id" in run.data.tags for run in train_runs)
    settings = {(run.data.params["learning_rate"], run.data.params["lora.rank"]) for run in train_runs}
    expected = {(str(float(lr)), rank) for lr in GRID["train.learning_rate"] for rank in GRID["train.lora.rank"]}
    assert settings == expected, "four trainings with distinct settings"
    parents = client.search_runs(
        [experiment.experiment_id], f"tags.sweep_flow_run_id = '{result.sweep_flow_run_id}'", max_results=20
    )
    assert len(parents) == 4 and {p.data.tags["variant"] for p in parents} == {v.label for v in variants}


def test_compare_table_has_a_row_per_variant_and_the_differing_keys_as_columns(swept):
    _, result, _ = swept
    comparison = result.comparison
    rows = comparison.rows
    assert len(rows) == 4
    columns = set(rows[0])
    assert {"train.learning_rate", "train.lora.rank"} <= columns
    assert not {"train.num_epochs", "train.batch_size", "name"} & columns, "only the keys that differ"
    assert all(row["val loss"] > 0 and row["final train loss"] > 0 for row in rows)
    csv = Path(comparison.files.csv).read_text().splitlines()
    assert len(csv) == 5 and "train.learning_rate" in csv[0]
    markdown = Path(comparison.files.markdown).read_text().splitlines()
    assert markdown[0].startswith("| run |") and len(markdown) == 6
    with Image.open(comparison.files.png) as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] > 1000 and image.size[1] > 400


def test_compare_command_reads_the_latest_runs_of_a_spec(swept, tmp_path, capsys):
    import yaml

    from flows.cli import main

    spec, _, _ = swept
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    assert main(["compare", str(path), "--last", "4", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "train.learning_rate" in printed and printed.count("tiny-sweep [") == 4
    assert (tmp_path / "out" / "comparison.png").stat().st_size > 10_000
    assert main(["compare"]) == 2, "neither a spec nor run ids: a message, not a traceback"


def best_version(client: MlflowClient, result: SweepResult) -> str:
    rows = sorted(result.comparison.rows, key=lambda row: row["val loss"])
    best = rows[0]["run_id"]
    variant = next(v.pipeline for v in result.variants if v.pipeline and v.pipeline.tracking.parent_run_id == best)
    return variant.stages["export"].info["version"]


def test_lineage_of_the_best_model_reaches_the_raw_dataset_digest(swept):
    spec, result, client = swept
    version = best_version(client, result)
    lineage = model_lineage(client, f"tiny-sweep/{version}")
    raw = [d for d in lineage["stages"]["template"]["datasets"] if d["context"] == "raw"]
    on_disk = hashlib.sha256((ROOT / "data" / "self_cognition.json").read_bytes()).hexdigest()
    assert {d["name"] for d in raw} == set(spec.dataset.names)
    assert next(d for d in raw if d["name"] == "self_cognition")["digest"] == on_disk[:16]
    assert {d["context"] for d in lineage["stages"]["tokenize"]["datasets"]} == {"tokenized"}
    assert {d["context"] for d in lineage["stages"]["template"]["datasets"]} == {"raw", "templated"}
    assert lineage["pipeline"]["template_vars"] == {"name": "Nova", "author": "Acme Labs"}
    on_pipeline_run = {d["context"]: d for d in lineage["pipeline"]["datasets"]}
    assert set(on_pipeline_run) == {"raw", "templated", "tokenized"}, "the pipeline run itself lists its data"
    assert on_pipeline_run["tokenized"]["digest"] == lineage["stages"]["tokenize"]["datasets"][0]["digest"]
    assert lineage["pipeline"]["base_model_digest"]
    assert lineage["pipeline"]["libraries"]["torch"] and lineage["pipeline"]["git_commit"]
    assert lineage["stages"]["train"]["params"]["lora.rank"] in GRID["train.lora.rank"]
    text = format_lineage(lineage)
    assert on_disk[:16] in text and "template values: name='Nova', author='Acme Labs'" in text


def test_promote_refuses_a_worse_model_and_accepts_a_better_one(swept):
    _, result, client = swept
    by_loss = sorted(result.comparison.rows, key=lambda row: row["val loss"])
    finished = [v.pipeline for v in result.variants if v.pipeline]
    versions = {p.tracking.parent_run_id: p.stages["export"].info["version"] for p in finished}
    best, middle, worst = (versions[row["run_id"]] for row in (by_loss[0], by_loss[1], by_loss[-1]))
    assert by_loss[0]["val loss"] < by_loss[1]["val loss"] < by_loss[-1]["val loss"]

    promote(client, f"tiny-sweep/{middle}")  # no champion yet
    assert str(resolve_version(client, f"tiny-sweep@{CHAMPION}").version) == middle
    # a sweep of a tiny model on 2 validation rows: the gate weighs each gap against its noise
    # (the strict cases are in tests/test_evaluation.py, on versions with known counts)
    line = re.compile(
        r"val_loss \d+\.\d{3} \[\d+\.\d{3}, \d+\.\d{3}\] \(n=\d+\) vs .*: difference [-+]\d\.\d{3} .*noise"
    )
    try:
        _, reasons = promote(client, f"tiny-sweep/{worst}", metrics=["val_loss"])
        assert any(line.match(r) and r.endswith(("within noise", "better beyond noise")) for r in reasons), reasons
        promote(client, f"tiny-sweep/{middle}", force=True)
    except RegistryError as exc:
        assert line.search(str(exc)) and "worse beyond noise" in str(exc), str(exc)
    assert str(resolve_version(client, f"tiny-sweep@{CHAMPION}").version) == middle
    _, reasons = promote(client, f"tiny-sweep/{best}")
    assert str(resolve_version(client, f"tiny-sweep@{CHAMPION}").version) == best
    assert reasons[0].startswith("gate: metrics identity_hit_rate, control_accuracy, control_identity_leak, val_loss")
    promote(client, f"tiny-sweep/{worst}", force=True)
    assert str(resolve_version(client, f"tiny-sweep@{CHAMPION}").version) == worst
    with pytest.raises(RegistryError, match="no such model version"):
        resolve_version(client, "tiny-sweep@nonexistent")


def test_a_retrain_starts_from_the_champion_and_its_lineage_names_that_version(swept):
    """`model.name_or_path: NAME@champion`: the version the alias names when the run starts is the base."""
    from flows.pipeline import finetune
    from flows.preflight import check_inputs
    from tasks.contracts.packaged_models import ModelSourceError
    from tasks.runtime.model_registry import version_directory

    spec, result, client = swept
    first = result.variants[0].pipeline.stages["export"].info["version"]
    promote(client, f"tiny-sweep/{first}", force=True)
    retrain = spec.model_copy(deep=True)
    retrain.model.name_or_path = f"tiny-sweep@{CHAMPION}"
    retrain.evaluate.preferences = "identity_preference"  # both models rank its pairs' answers
    retrain.evaluate.compare_base = True  # the champion's scores on the same sets, which the gate compares
    # promoted only if better than the champion on the identity hit rate: 0 for both random models
    retrain.export.promote, retrain.export.promotion_improve = True, ["identity_hit_rate"]
    retrained = finetune(retrain)

    directory, _ = version_directory(f"tiny-sweep/{first}", spec.workspace)
    base = retrained.stages["model"].info
    assert base["base_version"] == f"tiny-sweep/{first}"
    assert Path(base["model_path"]) == directory.resolve(), "the champion's exported files, used in place"
    evaluation = retrained.stages["evaluate"].metrics
    pairs = json.loads((ROOT / "data" / "identity_preference.json").read_text())
    assert evaluation["tuned_preference_accuracy_n"] == len(pairs)
    assert evaluation["tuned_preference_accuracy_low"] <= evaluation["tuned_preference_accuracy"]
    assert "base_preference_margin_stderr" in evaluation
    new_version = retrained.stages["export"].info["version"]
    assert int(new_version) > int(first)

    refused = retrained.promotion
    assert refused is not None and not refused.promoted
    assert str(resolve_version(client, f"tiny-sweep@{CHAMPION}").version) == first, "the champion stays"
    assert refused.reasons[1] == f"against champion version {first}, scored as this run's base on the same sets"
    assert re.search(r"identity_hit_rate 0\.000 \[.*\] \(n=12\) vs 0\.000 .*: not better", refused.reasons[-1])
    assert client.get_model_version("tiny-sweep", new_version).tags["promotion_refused"].endswith(refused.reasons[-1])
    pipeline_run = client.get_run(retrained.tracking.parent_run_id)
    assert pipeline_run.data.tags["promotion"].startswith(f"tiny-sweep version {new_version} not promoted")
    # a gate it passes: the same run's scores, judged again, make it the champion over the one it started from
    client.set_model_version_tag("tiny-sweep", new_version, "promotion_metrics", "identity_hit_rate")
    measured, base_version = evaluation, base["base_version"]
    promoted, reasons = promote_run(client, "tiny-sweep", new_version, base_version, measured, [])
    assert promoted and reasons[-1].endswith("within noise"), reasons
    assert str(resolve_version(client, f"tiny-sweep@{CHAMPION}").version) == new_version
    assert client.get_model_version("tiny-sweep", new_version).tags["promoted_over"] == first
    lineage = model_lineage(client, f"tiny-sweep/{new_version}")
    assert lineage["pipeline"]["base_model"] == "tiny-sweep@champion"
    assert lineage["pipeline"]["base_model_version"] == f"tiny-sweep/{first}"
    assert f"base model tiny-sweep@champion (version tiny-sweep/{first})" in format_lineage(lineage)

    retrain.model.name_or_path = "nobody@champion"
    with pytest.raises(ModelSourceError) as refused:
        check_inputs(retrain)
    assert str(refused.value).startswith("model.name_or_path: nobody@champion: no such model version or alias")
    assert "\n" not in str(refused.value)


def test_sweep_grid_mistakes_name_the_key_before_anything_runs(tiny_model, tmp_path):
    from flows.sweep import expand_grid, parse_grid

    spec = tiny_spec(tiny_model, tmp_path / "workspace")
    with pytest.raises(SpecError, match="expected key.path=value1,value2"):
        parse_grid(["train.learning_rate"])
    with pytest.raises(SpecError, match="lr_scheduler"):
        expand_grid(spec, parse_grid(["train.lr_scheduler=cosine,cosin"]))
    assert len(expand_grid(spec, parse_grid(["train.num_epochs=1,2,3", "train.seed=1,2"]))) == 6

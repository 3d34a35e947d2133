"""Evaluation a promotion can trust: a user's own sets with each scorer, an lm-eval benchmark on
both models, 95% intervals everywhere a rate is shown, and a gate that tells noise from a
regression. One pipeline on the tiny model; the gate on versions in a real MLflow registry."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from tiny_pipeline import tiny_spec

from flows.cli import main
from flows.spec import SpecError, validate_spec
from tasks.components.scoring import score_set
from tasks.contracts.worker_configs import EvalPrompt, EvalSet
from tasks.runtime.intervals import compare, wilson
from tasks.runtime.model_registry import CHAMPION, RegistryError, promote, register_model, resolve_version
from tasks.runtime.tracking import tracking_uri
from tasks.tools.compare_runs import comparison_table, pipeline_runs

ROOT = Path(__file__).resolve().parents[1]
# a user's registry: one set per scorer
USER_SETS = {
    "capitals": {"file_name": "capitals.json", "columns": {"prompt": "question", "response": "answer"}},
    "units": {"file_name": "units.json"},
    "codes": {"file_name": "codes.json"},
    "summaries": {"file_name": "summaries.json", "columns": {"prompt": "text", "response": "summary"}},
}


def write_user_sets(folder: Path) -> Path:
    rows = {
        # exact_match from the response column (one text per row)
        "capitals.json": [{"question": "Capital of France?", "answer": "Paris"}, {"question": "2+2?", "answer": "4"}],
        # contains_any from an answers list
        "units.json": [{"instruction": "Unit of force?", "answers": ["newton", "N"]}],
        # regex: a pattern every answer matches, and one none can
        "codes.json": [
            {"instruction": "Say anything.", "answers": ["(?s).*"]},
            {"instruction": "Give a code.", "answers": ["^NEVER-[0-9]{40}$"]},
        ],
        "summaries.json": [{"text": "Summarize: the cat sat on the mat.", "summary": "A cat sat on a mat."}],
    }
    for name, content in rows.items():
        (folder / name).write_text(json.dumps(content))
    registry = folder / "dataset_info.json"
    shipped = json.loads((ROOT / "data" / "dataset_info.json").read_text())
    registry.write_text(json.dumps({**shipped, **USER_SETS}))
    for name in {entry["file_name"] for entry in shipped.values() if "file_name" in entry}:
        if (ROOT / "data" / name).is_file():
            (folder / name).write_bytes((ROOT / "data" / name).read_bytes())
    return registry


EVALUATE = {
    "sets": [
        {"dataset": "capitals", "scorer": "exact_match"},
        {"dataset": "units", "scorer": "contains_any"},
        {"dataset": "codes", "scorer": "regex"},
        {"dataset": "summaries", "scorer": "rouge_l", "label": "summary"},
    ],
    "benchmarks": ["tunebench_gk"],
    "benchmark_limit": 6,
}


@pytest.fixture(scope="module")
def evaluated(prefect_harness, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    from flows.pipeline import finetune

    folder = tmp_path_factory.mktemp("eval-data")
    changes = {"dataset": {"registry": str(write_user_sets(folder))}, "evaluate": EVALUATE}
    spec = tiny_spec(tiny_model, folder / "workspace", changes)
    return spec, finetune(spec)


def test_each_scorer_scores_by_its_rule():
    prompts = [EvalPrompt(prompt="q", answers=answers) for answers in (["Paris"], ["4", "four"], ["x"])]
    answers = ["  paris. ", "It is four.", "Nova"]
    exact = score_set(EvalSet(label="cap", scorer="exact_match", prompts=prompts), answers, {"name": "Nova"})
    assert [row.correct for row in exact.rows] == [True, False, False], "normalized whole answer, not a substring"
    assert exact.metrics["cap_accuracy"] == pytest.approx(1 / 3) and exact.metrics["cap_accuracy_n"] == 3
    assert exact.metrics["cap_identity_leak"] == pytest.approx(1 / 3), "every set counts answers naming the assistant"
    contains = score_set(EvalSet(label="c", scorer="contains_any", prompts=prompts), answers, {})
    assert [row.correct for row in contains.rows] == [True, True, False]
    patterns = [EvalPrompt(prompt="q", answers=[r"\b\d{3}\b"]), EvalPrompt(prompt="q", answers=["^no$", "(?i)NOVA"])]
    regex = score_set(EvalSet(label="r", scorer="regex", prompts=patterns), ["code 123 ok", "nova"], {})
    assert [row.correct for row in regex.rows] == [True, True]
    rouge = score_set(
        EvalSet(label="s", scorer="rouge_l", prompts=[EvalPrompt(prompt="q", answers=["a cat sat", "the dog ran"])]),
        ["the dog ran"],
        {},
    )
    assert rouge.metrics["s_rouge_l"] == pytest.approx(1.0), "the best-matching reference counts"
    assert "s_rouge_l_n" not in rouge.metrics, "one value: no interval, rather than a zero-width one"


def test_wilson_intervals_stay_inside_zero_and_one():
    assert wilson(0.0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(0.5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    low, high = wilson(1.0, 12)
    assert high == 1.0 and low == pytest.approx(0.7575, abs=1e-4), "12 of 12 is not certainty"


def test_user_sets_and_a_benchmark_reach_mlflow_the_comparison_the_card_and_prefect(evaluated):
    spec, result = evaluated
    stage = result.stages["evaluate"]
    metrics = stage.metrics
    answers = json.loads((Path(stage.output_dir) / "answers.json").read_text())
    for variant in ("tuned", "base"):
        rows = {}
        for row in answers[variant]["rows"]:
            rows.setdefault(row["set"], []).append(row)
        assert list(rows) == ["identity", "control", "capitals", "units", "codes", "summary"]
        # each scorer's rule, recomputed here from the answers the model gave
        assert [r["correct"] for r in rows["capitals"]] == [
            r["answer"].strip(" .").lower() in ("paris", "4")[i : i + 1] for i, r in enumerate(rows["capitals"])
        ]
        assert rows["units"][0]["correct"] == any(a in rows["units"][0]["answer"].lower() for a in ("newton", "n"))
        assert [r["correct"] for r in rows["codes"]] == [True, False]
        assert metrics[f"{variant}_codes_accuracy"] == 0.5 and metrics[f"{variant}_codes_accuracy_n"] == 2
        low, high = wilson(0.5, 2)
        assert (metrics[f"{variant}_codes_accuracy_low"], metrics[f"{variant}_codes_accuracy_high"]) == (low, high)
        assert 0 <= metrics[f"{variant}_summary_rouge_l"] <= 1
        # the benchmark: lm-eval's accuracy on 6 questions with its standard error
        assert metrics[f"{variant}_bench_tunebench_gk_acc_n"] == 6
        assert metrics[f"{variant}_bench_tunebench_gk_acc"] in {k / 6 for k in range(7)}
        assert metrics[f"{variant}_bench_tunebench_gk_acc_stderr"] > 0 or metrics[
            f"{variant}_bench_tunebench_gk_acc"
        ] in (0.0, 1.0)
    client = MlflowClient(tracking_uri=tracking_uri(Path(spec.workspace)))
    run = client.get_run(stage.mlflow_run_id)
    assert run.data.metrics["tuned_bench_tunebench_gk_acc"] == metrics["tuned_bench_tunebench_gk_acc"]
    assert run.data.metrics["tuned_identity_hit_rate_n"] == 12
    # the train stage records its memory plan (here the step fits as asked)
    train = client.get_run(result.stages["train"].mlflow_run_id).data.metrics
    assert train["micro_batch_split"] == 1 and 0 < train["memory_estimate_mb"] <= train["memory_budget_mb"]
    # the comparison: a column for the benchmark, and intervals beside the rates
    table = comparison_table(client, pipeline_runs(client, spec.name))
    assert table["bench tunebench gk acc"].iloc[-1] == metrics["tuned_bench_tunebench_gk_acc"]
    assert re.fullmatch(r"\[\d\.\d{3}, \d\.\d{3}\] n=12", table["identity hit rate 95%"].iloc[-1])
    # the version's tags carry what the gate needs; the card shows intervals
    version = resolve_version(client, spec.name)
    assert version.tags["tuned_bench_tunebench_gk_acc_n"] == "6" and "tuned_val_loss_stderr" in version.tags
    card = (Path(result.stages["export"].output_dir) / "model" / "README.md").read_text()
    assert re.search(r"\| tuned_codes_accuracy \| 0\.5 \| \[0\.\d{3}, 0\.\d{3}\] n=2 \|", card), card
    # the Prefect artifact of the evaluation shows base and tuned with their intervals
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as prefect:
        (artifact,) = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["tiny-test-evaluation"]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[result.flow_run_id]),
            )
        )
    assert re.search(r"\| bench_tunebench_gk_acc \| \d\.\d{3} \[", artifact.data), artifact.data
    assert "n=12" in artifact.data


def test_the_evaluate_log_holds_no_git_error_and_no_benchmark_progress_bars(evaluated, tmp_path: Path):
    """lm-eval asks git for its version (`fatal: not a git repository` where the user's project is
    not one) and draws a progress bar per task; the evaluate worker, run again on the pipeline's
    own config in a directory outside any git repository, prints neither, and still scores."""
    _, result = evaluated
    job = json.loads((Path(result.stages["evaluate"].output_dir) / "evaluate_config.json").read_text())
    config = tmp_path / "evaluate_config.json"
    config.write_text(json.dumps({**job, "output_dir": str(tmp_path), "compare_base": False}))
    outside_git = {**os.environ, "GIT_CEILING_DIRECTORIES": str(tmp_path.parent)}
    run = subprocess.run(
        [sys.executable, "-m", "tasks.workers.evaluate", str(config)],
        cwd=tmp_path, env=outside_git, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    log = run.stdout + run.stderr
    assert run.returncode == 0, log
    assert "bench_tunebench_gk_acc" in run.stdout, "the benchmark ran"
    assert "not a git repository" not in log, log
    bars = [line for line in re.split(r"[\r\n]", log) if re.search(r"\d+%\|", line) and "Loading weights" not in line]
    assert not bars, bars


@pytest.mark.parametrize(
    "evaluate, expected",
    [
        ({"benchmarks": ["tunebench_gkk"]}, "tunebench_gkk: not an lm-eval task"),
        ({"benchmarks": ["BAD_ANSWER"]}, "line 2: 'answer' must be the 0-based index of the right choice, 0 to 2"),
        ({"sets": [{"dataset": "capitals", "scorer": "bleu"}]}, "evaluate.sets.0.scorer"),
        ({"sets": [{"dataset": "codes", "scorer": "regex"}]}, "is not a regular expression"),
        ({"sets": [{"dataset": "nowhere", "scorer": "exact_match"}]}, "nowhere"),
    ],
    ids=["unknown-task", "wrong-answer-key", "unknown-scorer", "bad-regex", "unknown-set"],
)
def test_bad_benchmarks_and_sets_are_refused_before_stage_one(tmp_path: Path, capsys, evaluate, expected):
    registry = write_user_sets(tmp_path)
    (tmp_path / "codes.json").write_text(json.dumps([{"instruction": "x", "answers": ["(unclosed"]}]))
    bad = tmp_path / "quiz.jsonl"
    good = {"question": "2+2?", "choices": ["3", "4", "5"], "answer": 1}
    bad.write_text(json.dumps(good) + "\n" + json.dumps({**good, "answer": 3}) + "\n")
    evaluate = json.loads(json.dumps(evaluate).replace("BAD_ANSWER", str(bad)))
    workspace = tmp_path / "ws"
    data = {"workspace": str(workspace), "dataset": {"registry": str(registry)}, "evaluate": evaluate}
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(json.dumps(data))
    assert main(["run", str(spec_file)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err, err
    assert not workspace.exists(), "nothing ran"


def test_a_label_must_not_hide_a_built_in_set():
    with pytest.raises(SpecError, match="evaluate.sets.0.label"):
        validate_spec({"evaluate": {"sets": [{"dataset": "x", "scorer": "regex", "label": "control"}]}})


def register(client: MlflowClient, tmp_path: Path, hits: int, loss: float, gate: str = "") -> str:
    """A version whose evaluation says `hits` of 12 identity prompts and `loss` ± 0.05 validation loss."""
    experiment = client.get_experiment_by_name("gate") or client.get_experiment(client.create_experiment("gate"))
    run = client.create_run(experiment.experiment_id)
    model = tmp_path / run.info.run_id
    model.mkdir()
    (model / "config.json").write_text("{}")
    tags = {
        "eval_set_digest": "same-prompts",
        "tuned_identity_hit_rate": str(hits / 12),
        "tuned_identity_hit_rate_n": "12",
        "tuned_val_loss": str(loss),
        "tuned_val_loss_n": "22",
        "tuned_val_loss_stderr": "0.05",
        "promotion_metrics": gate or "identity_hit_rate,val_loss",
        "promotion_margin": "0",
    }
    return register_model(client, run.info.run_id, "gated", "candidate", model, tags)


def test_promote_accepts_a_change_within_noise_and_refuses_one_beyond_it(tmp_path: Path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    champion = register(client, tmp_path, hits=11, loss=1.20)
    promote(client, f"gated/{champion}")
    # 10/12 against 11/12, loss 1.25 against 1.20: lower on both, but inside the noise
    close = register(client, tmp_path, hits=10, loss=1.25)
    _, reasons = promote(client, f"gated/{close}")
    assert str(resolve_version(client, f"gated@{CHAMPION}").version) == close
    assert any(r.startswith("identity_hit_rate 0.833 [") and r.endswith("within noise") for r in reasons), reasons
    recorded = client.get_model_version("gated", close).tags
    assert recorded["promoted_gate"] == "metrics identity_hit_rate, val_loss; margin 0"
    assert recorded["promoted_over"] == champion
    # 3/12 against 10/12: worse beyond noise, refused with the numbers, nothing changes
    worse = register(client, tmp_path, hits=3, loss=1.25)
    with pytest.raises(RegistryError, match=r"identity_hit_rate 0\.250 \[.*\] \(n=12\) vs 0\.833 .*worse beyond noise"):
        promote(client, f"gated/{worse}")
    assert str(resolve_version(client, f"gated@{CHAMPION}").version) == close
    # the same gap on the loss alone (1.60 ± 0.05 against 1.25 ± 0.05) is refused as well
    slower = register(client, tmp_path, hits=10, loss=1.60)
    with pytest.raises(RegistryError, match="val_loss .* worse beyond noise"):
        promote(client, f"gated/{slower}")
    # the gate is a setting: identity alone, and a margin wide enough for the 3/12 drop
    promote(client, f"gated/{slower}", metrics=["identity_hit_rate"])
    assert str(resolve_version(client, f"gated@{CHAMPION}").version) == slower
    _, reasons = promote(client, f"gated/{worse}", margin=0.5)
    assert reasons[0] == "gate: metrics identity_hit_rate, val_loss; margin 0.5"
    with pytest.raises(RegistryError, match="bench_x_acc is not a metric of version"):
        promote(client, f"gated/{close}", metrics=["bench_x_acc"])
    _, reasons = promote(client, f"gated/{slower}", force=True)  # worse on the loss, promoted anyway
    assert reasons[-1] == "forced" and client.get_model_version("gated", slower).tags["promoted_verdict"].endswith(
        "forced"
    )


def test_the_difference_of_two_rates_is_newcombes_interval():
    comparison = compare("hit_rate", {"hit_rate": 0.5, "hit_rate_n": 12}, {"hit_rate": 1.0, "hit_rate_n": 12}, 0.0)
    # Newcombe's hybrid score interval for 6/12 - 12/12 is [-0.746, -0.154]: worse beyond noise
    assert comparison.worse and "[-0.746, -0.154]" in comparison.reason, comparison.reason
    # Newcombe (1998), method 10: 56/70 - 48/80 = 0.200, interval [0.0524, 0.3339]
    assert "difference +0.200 [+0.052, +0.334]" in compare("a", {"a": 0.8, "a_n": 70}, {"a": 0.6, "a_n": 80}, 0).reason


def test_greedy_rows_leave_the_batch_with_the_tokens_generate_gives(tiny_model: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.components.generation import greedy_tokens

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    prompts = ["Who are you?", "2 + 2 =", "A much longer prompt about the capital of France and its rivers", "hi"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    free = greedy_tokens(model, batch["input_ids"], batch["attention_mask"], 10, eos_id=-1)
    assert all(len(row) == 10 for row in free)
    # the random model repeats one token per row: the second row's is the "end", so that row
    # leaves the batch at once and the others go on without it
    eos = free[1][0]
    assert eos not in free[0]
    ours = greedy_tokens(model, batch["input_ids"], batch["attention_mask"], 10, eos_id=eos)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=0)
    for row, tokens in zip(out[:, batch["input_ids"].shape[1] :].tolist(), ours, strict=True):
        expected = row[: row.index(eos)] if eos in row else row
        assert tokens == expected
    assert ours[1] == [] and len(ours[0]) == 10, "one row ended at once, another ran on"

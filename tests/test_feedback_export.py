"""`tunefactory feedback export`: rated answers, as `tunefactory api --record` stores them in MLflow
(SQLite), become KTO and DPO sets that the pipeline's own dataset loader reads."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from flows.cli import main
from tasks.runtime.answer_records import Answer, AnswerRecorder, Rating, ServedVersion
from tasks.stages.template_dataset import peek_examples
from tasks.tools.feedback_export import held_out


def chat(completion_id: str, question: str, answer: str) -> Answer:
    now = time.time_ns()
    response = {"id": completion_id, "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}]}
    messages = [{"role": "user", "content": question}]
    return Answer(completion_id, "chat.completions", {"messages": messages}, {}, response, now - 10**8, now, False)


def completion_id(n: int) -> str:
    return f"chatcmpl-{n:032x}"


@pytest.fixture(scope="module")
def rated_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Twelve rated chat answers of `nova` (version 3), one unrated, one rated plain completion."""
    workspace = tmp_path_factory.mktemp("feedback") / "workspace"
    recorder = AnswerRecorder(f"sqlite:///{workspace / 'mlflow.db'}", ServedVersion("nova", "3", "/models/nova"))
    ratings = []
    for n in range(12):
        question = f"What is {n} + {n}?"
        right = n % 3 != 0
        recorder.record(chat(completion_id(n), question, str(2 * n) if right else "I am ChatGPT."))
        correction = str(2 * n) if n == 0 else None
        ratings.append(Rating(completion_id(n), right, "checked", correction, "ana"))
    # a second answer to question 3, rated up: with the first (down) it makes a pair
    recorder.record(chat(completion_id(100), "What is 3 + 3?", "6"))
    ratings.append(Rating(completion_id(100), True, None, None, "ben"))
    recorder.record(chat(completion_id(200), "Unrated?", "yes"))
    now = time.time_ns()
    plain = {"id": "cmpl-" + "f" * 32, "choices": [{"index": 0, "text": " Paris."}]}
    recorder.record(Answer("cmpl-" + "f" * 32, "completions", {"prompt": "The capital"}, {}, plain, now, now, False))
    ratings.append(Rating("cmpl-" + "f" * 32, True, None, None, "ana"))
    for rating in ratings:
        recorder.rate(rating).result(timeout=120)
    recorder.close()
    return workspace


def expected_kto() -> list[tuple[str, str, bool]]:
    rows = [(f"What is {n} + {n}?", str(2 * n) if n % 3 else "I am ChatGPT.", n % 3 != 0) for n in range(12)]
    return sorted([*rows, ("What is 0 + 0?", "0", True), ("What is 3 + 3?", "6", True)])


def export(workspace: Path, out: Path, *extra: str) -> dict:
    assert main(["feedback", "export", "nova", "--workspace", str(workspace), "--out", str(out), *extra]) == 0
    return json.loads((out / "dataset_info.json").read_text())


def test_rated_answers_become_kto_and_dpo_sets_the_loader_reads(rated_workspace, tmp_path, capsys):
    registry = export(rated_workspace, tmp_path, "--holdout", "0")
    printed = capsys.readouterr().out
    assert "13 rated chat answers" in printed and "1 plain completions left out" in printed

    kto, _ = peek_examples(["nova_feedback_kto"], str(tmp_path / "dataset_info.json"), {}, kind="feedback", rows=None)
    rows = sorted((r["messages"][0]["content"], r["messages"][-1]["content"], r["label"]) for r in kto)
    assert rows == expected_kto(), "every rated chat answer once, and the correction as an up row; no unrated one"

    pairs, _ = peek_examples(["nova_feedback_dpo"], str(tmp_path / "dataset_info.json"), {}, kind="pairs", rows=None)
    assert sorted((p["messages"][0]["content"], p["chosen"], p["rejected"]) for p in pairs) == [
        ("What is 0 + 0?", "0", "I am ChatGPT."),  # a correction over what it corrects
        ("What is 3 + 3?", "6", "I am ChatGPT."),  # an up answer over a down one to the same messages
    ]
    assert "nova_heldout_kto" not in registry


def test_the_held_out_share_is_the_same_answers_on_every_export(rated_workspace, tmp_path):
    registry = export(rated_workspace, tmp_path, "--holdout", "0.5")
    lineage = {
        name: json.loads((tmp_path / entry["file_name"]).with_suffix(".lineage.json").read_text())["traces"]
        for name, entry in registry.items()
        if name.endswith("_kto")
    }
    training, kept_out = lineage.get("nova_feedback_kto", []), lineage.get("nova_heldout_kto", [])
    assert len(training) + len(kept_out) == 13 and not set(training) & set(kept_out)
    assert all(held_out(trace, 0.5) for trace in kept_out) and not any(held_out(trace, 0.5) for trace in training)
    files = sorted(p.name for p in tmp_path.glob("*.json"))
    export(rated_workspace, tmp_path, "--holdout", "0.5")
    assert sorted(p.name for p in tmp_path.glob("*.json")) == files, "the same feedback gives the same files"


def test_filters_by_version_and_time(rated_workspace, tmp_path, capsys):
    base = ["feedback", "export", "nova", "--workspace", str(rated_workspace), "--out", str(tmp_path / "x")]
    assert main([*base, "--version", "3", "--since", "2000-01-01"]) == 0
    assert "13 rated chat answers" in capsys.readouterr().out
    assert main([*base, "--version", "4"]) == 2
    assert "0 rated chat answers by version 4" in capsys.readouterr().err
    assert main([*base, "--since", "2999-01-01T00:00+00:00"]) == 2
    assert "since 2999-01-01" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--min-count", "0"], "--min-count 0: must be 1 or more"),
        (["--min-count", "50"], "13 rated chat answers, fewer than --min-count 50"),
        (["--since", "last week"], "--since 'last week': not an ISO date"),
        (["--holdout", "1"], "--holdout 1.0: must be at least 0 and below 1"),
    ],
)
def test_bad_exports_are_one_line(rated_workspace, tmp_path, capsys, extra, message):
    args = ["feedback", "export", "nova", "--workspace", str(rated_workspace), "--out", str(tmp_path / "x"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_model_never_served_with_record_is_one_line(rated_workspace, capsys):
    assert main(["feedback", "export", "orion", "--workspace", str(rated_workspace)]) == 2
    err = capsys.readouterr().err.strip()
    assert "orion: no recorded answers" in err and "--record" in err and len(err.splitlines()) == 1

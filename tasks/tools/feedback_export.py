"""`tunefactory feedback export MODEL`: the rated answers of a served model as training data.

Reads the traces `tunefactory api --record` kept (tasks/runtime/answer_records.py) and writes,
in LLaMA-Factory's formats, with their `dataset_info.json` entries:

- a KTO set (`<model>_feedback_kto`): every rated chat answer, its messages and a `label` (up is
  true); a corrected answer is one more row, labelled true;
- a DPO set (`<model>_feedback_dpo`, when there are pairs): a corrected answer chosen over the
  answer it corrects, and an up-rated answer chosen over a down-rated one to the same messages;
- the same two for the held-out share (`..._heldout_kto`, `..._heldout_dpo`), for evaluation:
  an answer is held out by a hash of its trace id, so the same answers stay out on every export.

Each file is named by the digest of its content (the same feedback gives the same file) and has a
`.lineage.json` beside it naming the traces it came from. Plain completions (`/v1/completions`)
have no messages and are left out, counted in the summary.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tasks.dataset.registry import DataError
from tasks.runtime.answer_records import CORRECTION, MODEL_VERSION_TAG, RATING, answers_experiment

MESSAGE_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                "system_tag": "system"}  # fmt: skip


@dataclass(frozen=True)
class RatedAnswer:
    trace_id: str
    messages: list[dict[str, str]]  # the request's, without the answer
    answer: str
    up: bool
    correction: str | None
    version: str


@dataclass
class FeedbackSets:
    kto: list[dict[str, Any]] = field(default_factory=list)
    dpo: list[dict[str, Any]] = field(default_factory=list)
    traces: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ExportSummary:
    rated: int
    held_out: int
    plain_completions_skipped: int
    files: dict[str, Path]  # dataset name -> file


def since_time(text: str) -> datetime:
    """--since as a time: an ISO date or date and time, in local time unless it names a zone."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise DataError(
            f"--since {text!r}: not an ISO date or date and time, such as 2026-12-01 or 2026-12-01T08:00"
        ) from None
    return moment if moment.tzinfo else moment.astimezone()


def held_out(trace_id: str, share: float) -> bool:
    """Whether this answer is in the held-out share: by its trace id's hash, the same on every export."""
    return int(hashlib.sha256(trace_id.encode()).hexdigest()[:8], 16) / 0x1_0000_0000 < share


def rated_answers(
    workspace: Path, model: str, since: datetime | None, version: str | None
) -> tuple[list[RatedAnswer], int]:
    """Every rated chat answer of MODEL in the workspace's MLflow, oldest first; and how many plain
    completions were rated (they have no messages)."""
    from mlflow import MlflowClient

    from tasks.runtime.tracking import tracking_uri

    client = MlflowClient(tracking_uri(workspace.resolve()))
    experiment = client.get_experiment_by_name(answers_experiment(model))
    if experiment is None:
        raise DataError(
            f"{model}: no recorded answers in {workspace} (no experiment {answers_experiment(model)!r}); "
            f"serve it with `tunefactory api {model} --record --workspace {workspace}`"
        )
    filters = [f"timestamp_ms >= {int(since.timestamp() * 1000)}"] if since else []
    if version is not None:
        filters.append(f"tags.{MODEL_VERSION_TAG} = '{version}'")
    found, page = [], None
    while True:
        traces = client.search_traces(
            locations=[experiment.experiment_id],
            filter_string=" AND ".join(filters) or None,
            order_by=["timestamp_ms ASC"],
            max_results=500,
            page_token=page,
        )
        found.extend(traces)
        page = traces.token
        if not page:
            break
    answers, plain = [], 0
    for trace in found:
        ratings = [a for a in trace.info.assessments if a.name == RATING and a.valid is not False]
        if not ratings:
            continue
        span = trace.data.spans[0]
        messages = (span.inputs or {}).get("messages")
        if not messages:
            plain += 1
            continue
        corrections = [a.value for a in trace.info.assessments if a.name == CORRECTION and a.valid is not False]
        answer = span.outputs["choices"][0]["message"]["content"]
        version_tag = trace.info.tags.get(MODEL_VERSION_TAG, "")
        up = ratings[0].value is True
        answers.append(RatedAnswer(trace.info.trace_id, messages, answer, up, (corrections or [None])[0], version_tag))
    return answers, plain


def feedback_sets(answers: list[RatedAnswer]) -> FeedbackSets:
    """The KTO rows and DPO pairs these answers give (see the module)."""
    sets = FeedbackSets(traces=[a.trace_id for a in answers])
    by_prompt: dict[str, dict[bool, list[RatedAnswer]]] = {}
    for rated in answers:
        sets.kto.append({"messages": [*rated.messages, _assistant(rated.answer)], "label": rated.up})
        if rated.correction is not None:
            sets.kto.append({"messages": [*rated.messages, _assistant(rated.correction)], "label": True})
            sets.dpo.append(_pair(rated.messages, rated.correction, rated.answer))
        by_prompt.setdefault(json.dumps(rated.messages, sort_keys=True), {True: [], False: []})[rated.up].append(rated)
    for rated in by_prompt.values():
        for better, worse in zip(rated[True], rated[False], strict=False):
            sets.dpo.append(_pair(better.messages, better.answer, worse.answer))
    return sets


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def _pair(messages: list[dict[str, str]], chosen: str, rejected: str) -> dict[str, Any]:
    return {"messages": messages, "chosen": _assistant(chosen), "rejected": _assistant(rejected)}


def export_feedback(
    workspace: Path,
    model: str,
    out: Path,
    since: datetime | None = None,
    version: str | None = None,
    min_count: int = 1,
    holdout: float = 0.2,
) -> ExportSummary:
    """Write the feedback sets of MODEL into `out` and register them in `out`/dataset_info.json."""
    if min_count < 1:
        raise DataError(f"--min-count {min_count}: must be 1 or more (how many rated answers an export needs)")
    if not 0.0 <= holdout < 1.0:
        raise DataError(f"--holdout {holdout}: must be at least 0 and below 1 (the share of answers kept out)")
    answers, plain = rated_answers(workspace, model, since, version)
    if len(answers) < min_count:
        window = f" since {since.isoformat()}" if since else ""
        which = f" by version {version}" if version is not None else ""
        raise DataError(
            f"{model}: {len(answers)} rated chat answers{which}{window}, fewer than --min-count {min_count}: "
            "rate answers with POST /v1/ratings first"
        )
    kept = [a for a in answers if not held_out(a.trace_id, holdout)]
    out_of_training = [a for a in answers if held_out(a.trace_id, holdout)]
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    entries: dict[str, dict[str, Any]] = {}
    stem = model.replace("/", "_")
    for part, chosen in (("feedback", kept), ("heldout", out_of_training)):
        sets = feedback_sets(chosen)
        for kind, rows in (("kto", sets.kto), ("dpo", sets.dpo)):
            if not rows:
                continue
            name = f"{stem}_{part}_{kind}"
            files[name] = _write_content_addressed(out, name, rows, sets.traces, model, since, version)
            entries[name] = _registry_entry(files[name].name, kind)
    registry = out / "dataset_info.json"
    existing = json.loads(registry.read_text(encoding="utf-8")) if registry.is_file() else {}
    registry.write_text(json.dumps({**existing, **entries}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return ExportSummary(len(answers), len(out_of_training), plain, files)


def _write_content_addressed(
    out: Path, name: str, rows: list[dict], traces: list[str], model: str, since: datetime | None, version: str | None
) -> Path:
    content = json.dumps(rows, indent=2, ensure_ascii=False) + "\n"
    digest = hashlib.sha256(content.encode()).hexdigest()
    path = out / f"{name}-{digest[:16]}.json"
    if not path.is_file():
        path.write_text(content, encoding="utf-8")
    lineage = {
        "sha256": digest,
        "model": model,
        "experiment": answers_experiment(model),
        "traces": traces,
        "since": since.isoformat() if since else None,
        "version": version,
        "exported_at": datetime.now(UTC).isoformat(),
    }
    path.with_suffix(".lineage.json").write_text(json.dumps(lineage, indent=2) + "\n", encoding="utf-8")
    return path


def _registry_entry(file_name: str, kind: str) -> dict[str, Any]:
    columns = {"messages": "messages", "kto_tag": "label"} if kind == "kto" else {
        "messages": "messages", "chosen": "chosen", "rejected": "rejected"}  # fmt: skip
    entry = {"file_name": file_name, "formatting": "sharegpt", "columns": columns, "tags": MESSAGE_TAGS}
    return {**entry, "ranking": True} if kind == "dpo" else entry

"""Stage 5: score the fine-tuned model against the base model (worker: tasks/workers/evaluate.py).

Metrics, each for `tuned` and `base`: validation loss and perplexity; identity hit rate (the
answer names the assistant or its author), full identity rate (both) and ROUGE-L on held-out
identity questions; control-set accuracy and identity leak rate on general questions.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prefect import get_run_logger, task

from tasks.contracts.child_process import run_worker
from tasks.contracts.spec_sections import EvaluateSpec
from tasks.contracts.stage_infos import EvaluateInfo, ModelInfo, TokenizeInfo, TrainInfo
from tasks.contracts.worker_configs import EvalPrompt, EvaluateJob
from tasks.contracts.worker_events import Evaluated, ScoredAnswer, Scores, WorkerEvent
from tasks.dataset.registry import DataError, resolve_eval_set
from tasks.dataset.rows import fill_placeholders
from tasks.dataset.sources import load_source, source_record
from tasks.runtime.code_version import code_version
from tasks.runtime.prefect_artifacts import publish_evaluation
from tasks.runtime.stage_output import Manifest, StageContext, StageResult, run_stage
from tasks.runtime.tracking import StageRun
from tasks.stages.materialize_model import base_model_path


def eval_prompts(
    name: str | None, registry: str | None, template_vars: dict[str, str], keep: tuple[str, ...]
) -> list[EvalPrompt]:
    """Rows of an evaluation set with placeholders filled: prompt plus the fields in `keep`.

    The set is looked up in the spec's registry, then in the project's (`resolve_eval_set`). Each
    row is checked as it is read (`tunefactory run` reads both sets before stage one), since a
    loose reading changes scores that promotion trusts: `"answers": "Paris"` taken as a list
    would accept single letters.
    """
    if name is None:
        return []
    entry = resolve_eval_set(name, registry)
    prompt_key, reference_key = entry.column("prompt"), entry.column("response")
    rows = []
    for index, row in enumerate(load_source(entry)):
        where = f"evaluation set {name!r} ({entry.file}), row {index}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: a row must be an object with {prompt_key!r}, got {type(row).__name__}")
        prompt = row.get(prompt_key)
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{where}: {prompt_key!r} must be the question as non-empty text, got {prompt!r}")
        item = {"prompt": fill_placeholders(prompt, template_vars, where)}
        if "reference" in keep:
            reference = row.get(reference_key, "")
            if not isinstance(reference, str):
                raise DataError(f"{where}: {reference_key!r} (the reference answer) must be text, got {reference!r}")
            item["reference"] = fill_placeholders(reference, template_vars, where)
        if "answers" in keep:
            item["answers"] = accepted_answers(row.get("answers"), where)
        rows.append(EvalPrompt(**item))
    return rows


def accepted_answers(value: object, where: str) -> list[str]:
    """A control question's accepted answers: a non-empty list of texts (a bare text or a number
    is refused rather than guessed at)."""
    if not isinstance(value, list) or not value or not all(isinstance(a, str) and a.strip() for a in value):
        raise DataError(f"{where}: 'answers' must be a non-empty list of accepted answers as text, "
                        f'e.g. ["Paris"] or ["4", "four"]; got {value!r}')  # fmt: skip
    return value


def comparison_table(tuned: list[ScoredAnswer], base: list[ScoredAnswer] | None) -> list[dict[str, object]]:
    """One row per prompt with the base and the tuned answer side by side (the rows of MLflow's
    eval_table.json and of the Prefect artifact)."""
    table = []
    for after, before in zip(tuned, base or [None] * len(tuned), strict=True):
        row: dict[str, object] = {"set": after.set, "prompt": after.prompt}
        if before is not None:
            row["base_answer"] = before.answer
        row["tuned_answer"] = after.answer
        row["tuned_ok"] = after.identity if after.set == "identity" else after.correct
        table.append(row)
    return table


def eval_set_digest(job: EvaluateJob) -> str:
    """What makes scores comparable across models: the same prompts, references, answer length
    and validation split (part of the tokenized data). Hashed as the rows were always written, so
    the digests of versions evaluated before stay comparable."""
    identity = [{"prompt": row.prompt, "reference": row.reference} for row in job.identity]
    control = [{"prompt": row.prompt, "answers": row.answers} for row in job.control]
    parts = [identity, control, job.max_new_tokens, job.tokenized_digest]
    payload = json.dumps(parts, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _build(job: EvaluateJob, out: Path, run: StageRun) -> StageResult:
    logger = get_run_logger()
    metrics: dict[str, float] = {}
    scores: dict[str, Scores] = {}

    def on_event(event: WorkerEvent) -> None:
        if isinstance(event, Evaluated):
            scores[event.variant] = event.scores
            metrics.update({f"{event.variant}_{k}": v for k, v in event.scores.metrics.items()})
            shown = ", ".join(f"{k}={v:.3f}" for k, v in event.scores.metrics.items())
            logger.info("%s model: %s", event.variant, shown)

    run_worker("tasks.workers.evaluate", job, out / "evaluate_config.json", on_event, on_output=logger.info)
    base = scores.get("base")
    table = comparison_table(scores["tuned"].rows, base.rows if base else None)
    (out / "comparison.json").write_text(json.dumps(table, ensure_ascii=False, indent=2))
    run.log_table(table, "eval_table.json")
    publish_evaluation(metrics, table)
    digest = eval_set_digest(job)
    run.set_tags({"eval_set_digest": digest})
    return StageResult(metrics=metrics, info=EvaluateInfo(eval_set_digest=digest))


@task(name="evaluate", task_run_name="evaluate")
def evaluate_model(
    ctx: StageContext,
    config: EvaluateSpec,
    registry: str | None,
    template_vars: dict[str, str],
    compute_type: str,
    trained: Manifest,
    tokenized: Manifest,
    base_model: Manifest,
) -> Manifest:
    """Answer the evaluation prompts with the tuned and the base model and score both."""
    identity = eval_prompts(config.identity_prompts, registry, template_vars, ("reference",))
    control = eval_prompts(config.control_prompts, registry, template_vars, ("answers",))
    # the worker's config; its output directory is the stage's, known once the stage runs
    job = dict(
        **config.model_dump(include={"max_new_tokens", "compare_base", "batch_size"}),
        model_path=str(base_model_path(base_model)),
        tuned=TrainInfo.of(trained).weights,
        dataset_dir=str(tokenized.path),
        tokenized_digest=TokenizeInfo.of(tokenized).tokenized_digest,
        identity=identity,
        control=control,
        template_vars=template_vars,
        compute_type=compute_type,
        trust_remote_code=ModelInfo.of(base_model).trust_remote_code,
    )
    sets = [resolve_eval_set(n, registry) for n in (config.identity_prompts, config.control_prompts) if n]
    key_config = {
        **config.model_dump(mode="json"),
        "template_vars": template_vars,
        "compute_type": compute_type,
        "eval_sets": [source_record(entry)["sha256"] for entry in sets],
    }
    return run_stage(
        "evaluate",
        key_config,
        [trained, tokenized, base_model],
        code_version(__name__, ("tasks.workers.evaluate",), ("torch", "transformers", "tokenizers", "peft")),
        ctx,
        lambda out, run: _build(EvaluateJob(**job, output_dir=str(out)), out, run),
    )

"""Stage 5: score the fine-tuned model against the base model (worker: tasks/workers/evaluate.py).

Metrics, each for `tuned` and `base`: validation loss and perplexity; identity hit rate (the
answer names the assistant or its author), full identity rate (both) and ROUGE-L on held-out
identity questions; control-set accuracy and identity leak rate on general questions; the
scores of the user's own sets (tasks/components/scoring.py) and of lm-eval benchmarks
(tasks/components/benchmarks.py). Every metric carries its sample size `_n` and 95% interval
`_low`/`_high` (tasks/runtime/intervals.py).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from prefect import get_run_logger, task

from tasks.components.benchmarks import check_benchmarks
from tasks.contracts.child_process import run_worker
from tasks.contracts.file_digests import sha256_file
from tasks.contracts.manifest import Manifest, StageResult
from tasks.contracts.spec_sections import BUILT_IN_SET_LABELS, EvaluateSpec
from tasks.contracts.stage_infos import EvaluateInfo, ModelInfo, TokenizeInfo, TrainInfo
from tasks.contracts.worker_configs import BenchmarkJob, EvalPrompt, EvalSet, EvaluateJob, PreferencePair
from tasks.contracts.worker_events import Evaluated, ScoredAnswer, Scores, WorkerEvent
from tasks.dataset.registry import DataError, resolve_dataset, resolve_eval_set
from tasks.dataset.rows import fill_placeholders
from tasks.dataset.sources import load_source, source_record
from tasks.runtime.code_version import code_version
from tasks.runtime.intervals import estimate, is_headline, with_intervals
from tasks.runtime.prefect_artifacts import publish_evaluation
from tasks.runtime.stage_output import StageContext, run_stage
from tasks.runtime.tracking import StageRun
from tasks.stages.template_dataset import peek_examples

EVALUATE_LIBRARIES = ("torch", "transformers", "tokenizers", "peft", "lm_eval")


def eval_prompts(
    name: str | None, registry: str | None, template_vars: dict[str, str], keep: str, scorer: str | None = None
) -> list[EvalPrompt]:
    """Rows of an evaluation set with placeholders filled: the prompt, and per `keep` the
    reference text ("reference"), the accepted answers ("answers"), or either of them as a list
    ("references": `answers` when the row has it, else its response text).

    The set is looked up in the spec's registry, then in the project's (`resolve_eval_set`). Each
    row is checked as it is read (`tunefactory run` reads every set before stage one), since a
    loose reading changes scores that promotion trusts: `"answers": "Paris"` taken as a list
    would accept single letters, and a regex that does not compile would fail after training.
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
        if keep == "reference":
            reference = row.get(reference_key, "")
            if not isinstance(reference, str):
                raise DataError(f"{where}: {reference_key!r} (the reference answer) must be text, got {reference!r}")
            item["reference"] = fill_placeholders(reference, template_vars, where)
        elif keep == "answers" or "answers" in row:
            item["answers"] = [
                fill_placeholders(a, template_vars, where) for a in accepted_answers(row.get("answers"), where)
            ]
        else:
            reference = row.get(reference_key)
            if not isinstance(reference, str) or not reference.strip():
                raise DataError(f"{where}: needs 'answers' (a list) or {reference_key!r} (the reference as text), "
                                f"got {reference!r}")  # fmt: skip
            item["answers"] = [fill_placeholders(reference, template_vars, where)]
        if scorer == "regex":
            for pattern in item["answers"]:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise DataError(f"{where}: {pattern!r} is not a regular expression ({exc})") from None
        rows.append(EvalPrompt(**item))
    return rows


def eval_sets(config: EvaluateSpec, registry: str | None, template_vars: dict[str, str]) -> list[EvalSet]:
    """The sets both models answer: identity and control (when named), then the user's own."""
    sets = []
    if config.identity_prompts:
        prompts = eval_prompts(config.identity_prompts, registry, template_vars, "reference")
        sets.append(EvalSet(label="identity", scorer="identity", prompts=prompts))
    if config.control_prompts:
        prompts = eval_prompts(config.control_prompts, registry, template_vars, "answers")
        sets.append(EvalSet(label="control", scorer="contains_any", prompts=prompts))
    for spec in config.sets:
        try:
            prompts = eval_prompts(spec.dataset, registry, template_vars, "references", spec.scorer)
        except DataError as exc:
            raise DataError(f"evaluate.sets ({spec.dataset}): {exc}") from None
        sets.append(EvalSet(label=spec.metric_label, scorer=spec.scorer, prompts=prompts))
    return sets


def preference_pairs(name: str | None, registry: str | None, template_vars: dict[str, str]) -> list[PreferencePair]:
    """Every pair of the preference set `name` (evaluate.preferences), placeholders filled; a bad row
    or an empty set is refused, naming it (`tunefactory run` reads it before stage one too)."""
    if name is None:
        return []
    try:
        examples, _ = peek_examples([name], registry, template_vars, "pairs", rows=None)
    except DataError as exc:
        raise DataError(f"evaluate.preferences ({name}): {exc}") from None
    if not examples:
        raise DataError(f"evaluate.preferences ({name}): holds no pairs")
    return [PreferencePair(messages=e["messages"], chosen=e["chosen"], rejected=e["rejected"]) for e in examples]


def accepted_answers(value: object, where: str) -> list[str]:
    """Accepted answers: a non-empty list of texts (a bare text or a number is refused rather
    than guessed at)."""
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
        if after.set == "identity":
            row["tuned_ok"] = after.identity
        else:
            row["tuned_ok"] = after.correct if after.correct is not None else after.rouge_l
        table.append(row)
    return table


def eval_set_digest(job: EvaluateJob) -> str:
    """What makes scores comparable across models: the same prompts, references, scorers, answer
    length, benchmarks and validation split (part of the tokenized data). Identity and control
    are hashed as their rows were always written, so versions evaluated on them alone before
    keep comparable digests; other sets and benchmarks are added only when there are some."""
    by_label = {s.label: s for s in job.sets}
    identity = [{"prompt": r.prompt, "reference": r.reference} for r in by_label.get("identity", EMPTY).prompts]
    control = [{"prompt": r.prompt, "answers": r.answers} for r in by_label.get("control", EMPTY).prompts]
    parts: list[object] = [identity, control, job.max_new_tokens, job.tokenized_digest]
    own = [s.model_dump() for s in job.sets if s.label not in BUILT_IN_SET_LABELS]
    if own:
        parts.append(own)
    if job.preferences:
        parts.append({"preferences": [pair.model_dump() for pair in job.preferences]})
    if job.benchmarks:
        # each task as it was always hashed: {name} or {name, file: its sha256}
        tasks = [{"name": t.name, **({"file": sha256_file(t.file)} if t.file else {})} for t in job.benchmarks.tasks]
        parts.append({**job.benchmarks.model_dump(), "tasks": tasks})
    payload = json.dumps(parts, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


EMPTY = EvalSet(label="", scorer="", prompts=[])


def shown_metrics(metrics: dict[str, float]) -> str:
    """`name=value [low, high]` for the log, intervals where the sample size is known."""
    parts = []
    for name in filter(is_headline, metrics):
        found = estimate(metrics, name)
        parts.append(f"{name}={metrics[name]:.3f}" + (f" [{found.low:.3f}, {found.high:.3f}]" if found else ""))
    return ", ".join(parts)


def _build(job: EvaluateJob, out: Path, run: StageRun) -> StageResult:
    logger = get_run_logger()
    metrics: dict[str, float] = {}
    scores: dict[str, Scores] = {}

    def on_event(event: WorkerEvent) -> None:
        if isinstance(event, Evaluated):
            scores[event.variant] = event.scores
            metrics.update({f"{event.variant}_{k}": v for k, v in with_intervals(event.scores.metrics).items()})
            logger.info("%s model: %s", event.variant, shown_metrics(event.scores.metrics))

    run_worker("tasks.workers.evaluate", job, out / "evaluate_config.json", on_event, on_output=logger.info)
    base = scores.get("base")
    table = comparison_table(scores["tuned"].rows, base.rows if base else None)
    (out / "comparison.json").write_text(json.dumps(table, ensure_ascii=False, indent=2))
    run.log_table(table, "eval_table.json")
    publish_evaluation(metrics, table)
    digest = eval_set_digest(job)
    run.set_tags({"eval_set_digest": digest})
    return StageResult(metrics=metrics, info=EvaluateInfo(eval_set_digest=digest))


def benchmark_job(config: EvaluateSpec) -> BenchmarkJob | None:
    if not config.benchmarks:
        return None
    return BenchmarkJob(
        tasks=check_benchmarks(config.benchmarks),
        limit=config.benchmark_limit,
        num_fewshot=config.benchmark_num_fewshot,
        batch_size=config.benchmark_batch_size,
    )


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
    sets = eval_sets(config, registry, template_vars)
    preferences = preference_pairs(config.preferences, registry, template_vars)
    benchmarks = benchmark_job(config)
    # the worker's config; its output directory is the stage's, known once the stage runs
    job = dict(
        **config.model_dump(include={"max_new_tokens", "compare_base", "batch_size"}),
        model_path=str(ModelInfo.base_model_path(base_model)),
        tuned=TrainInfo.of(trained).weights,
        dataset_dir=str(tokenized.path),
        tokenized_digest=TokenizeInfo.of(tokenized).tokenized_digest,
        sets=sets,
        preferences=preferences,
        benchmarks=benchmarks,
        template_vars=template_vars,
        compute_type=compute_type,
        trust_remote_code=ModelInfo.of(base_model).trust_remote_code,
    )
    names = [config.identity_prompts, config.control_prompts, *(s.dataset for s in config.sets)]
    files = [t.file for t in benchmarks.tasks if t.file] if benchmarks else []
    key_config = {
        **config.model_dump(mode="json"),
        "template_vars": template_vars,
        "compute_type": compute_type,
        "eval_sets": [source_record(resolve_eval_set(n, registry)).sha256 for n in names if n],
        **({"benchmark_files": [sha256_file(f) for f in files]} if files else {}),
        **({"preference_set": source_record(resolve_dataset(config.preferences, registry)).sha256}
           if config.preferences else {}),
    }  # fmt: skip
    return run_stage(
        "evaluate",
        key_config,
        [trained, tokenized, base_model],
        code_version(__name__, ("tasks.workers.evaluate",), EVALUATE_LIBRARIES),
        ctx,
        lambda out, run: _build(EvaluateJob(**job, output_dir=str(out)), out, run),
    )

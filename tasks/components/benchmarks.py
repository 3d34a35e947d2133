"""Benchmarks through lm-evaluation-harness: which tasks a spec names, checked before stage one, and
running them on a loaded model inside the evaluation worker.

A benchmark is one of
- a multiple-choice file in tunefactory's format (JSON Lines: `question`, `choices`, `answer` as the
  0-based index of the right choice, optional `lang`): the project's own under data/benchmarks/
  by name (`tunebench_gk`), or a `.jsonl` path of the user's. tunefactory writes the lm-eval task
  config for it (scored by log-likelihood of each choice: `acc` and `acc_norm`);
- any task name lm-eval knows (`arc_easy`, `mmlu`, ...); those download their data from the hub.

This module imports lm_eval only inside the functions that need it: the flow process checks
names without loading torch.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any
from unittest import mock

from tasks.contracts.worker_configs import BenchmarkJob, BenchmarkTask
from tasks.dataset.registry import DataError

SHIPPED_BENCHMARKS = Path(__file__).resolve().parents[2] / "data" / "benchmarks"
CJK = re.compile("[\u3400-\u9fff\uf900-\ufaff]")


def benchmark_file(name: str) -> Path | None:
    """The multiple-choice file a benchmark name stands for; None for an lm-eval task name."""
    if name.endswith(".jsonl"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise DataError(f"evaluate.benchmarks: {name}: no such file")
        return path.resolve()
    shipped = SHIPPED_BENCHMARKS / f"{name}.jsonl"
    return shipped if shipped.is_file() else None


def task_name(name: str) -> str:
    file = benchmark_file(name)
    return re.sub(r"[^a-z0-9_]", "_", file.stem.lower()) if file else name


def read_questions(path: Path) -> list[dict[str, Any]]:
    """Every row of a multiple-choice file, checked: a wrong answer key would score nonsense."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"benchmark {path.name}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: a row must be an object with question, choices and answer")
        question, choices, answer = row.get("question"), row.get("choices"), row.get("answer")
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{where}: 'question' must be non-empty text, got {question!r}")
        if (
            not isinstance(choices, list)
            or len(choices) < 2
            or not all(isinstance(c, str) and c.strip() for c in choices)
            or len(set(choices)) < len(choices)
        ):
            raise DataError(f"{where}: 'choices' must be a list of at least two different texts, got {choices!r}")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise DataError(
                f"{where}: 'answer' must be the 0-based index of the right choice, 0 to {len(choices) - 1}; "
                f"got {answer!r}"
            )
        rows.append(row)
    if not rows:
        raise DataError(f"benchmark {path.name}: holds no questions")
    return rows


def known_lm_eval_tasks() -> set[str]:
    from lm_eval.tasks import TaskManager

    return set(TaskManager(verbosity="ERROR").all_tasks)


def check_benchmarks(names: list[str]) -> list[BenchmarkTask]:
    """Each benchmark as the worker takes it (a file under its task name, or an lm-eval task); refuses
    an unknown task name and a file with a bad row, naming them. lm-eval's task index (about 5 s) is
    read only when a name is not one of tunefactory's files."""
    resolved, unknown = [], []
    for name in names:
        file = benchmark_file(name)
        if file is not None:
            read_questions(file)
            resolved.append(BenchmarkTask(name=task_name(name), file=str(file)))
        else:
            resolved.append(BenchmarkTask(name=name))
            unknown.append(name)
    if unknown:
        known = known_lm_eval_tasks()
        missing = [name for name in unknown if name not in known]
        if missing:
            shipped = ", ".join(sorted(p.stem for p in SHIPPED_BENCHMARKS.glob("*.jsonl")))
            raise DataError(
                f"evaluate.benchmarks: {', '.join(missing)}: not an lm-eval task, nor a .jsonl file "
                f"(the project's own: {shipped}; `lm-eval ls tasks` lists lm-eval's)"
            )
    return resolved


def question_prompt(doc: dict[str, Any]) -> str:
    """How a question is put to the model: in Chinese when it is written in Chinese."""
    if doc.get("lang") == "zh" or (doc.get("lang") is None and CJK.search(doc["question"])):
        return f"问题：{doc['question'].strip()}\n答案："
    return f"Question: {doc['question'].strip()}\nAnswer:"


def task_config(name: str, file: str) -> dict[str, Any]:
    """lm-eval's config for a tunefactory multiple-choice file: each choice scored by its log-likelihood."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": file}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": question_prompt,
        "doc_to_choice": "choices",
        "doc_to_target": "answer",
        "target_delimiter": " ",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
    }


def metric_key(task: str, metric: str) -> str:
    """`acc,none` of task `tunebench_gk` as `bench_tunebench_gk_acc` (an MLflow-safe name)."""
    measure, _, filter_name = metric.partition(",")
    suffix = "" if filter_name in ("", "none") else f"_{filter_name}"
    return re.sub(r"[^A-Za-z0-9_]", "_", f"bench_{task}_{measure}{suffix}")


@contextlib.contextmanager
def quiet_lm_eval():
    """lm-eval without what it prints for itself into the evaluate log.

    - `fatal: not a git repository`: `simple_evaluate` runs `git describe` in the working
      directory for the git hash it records in its results (which tunefactory does not read),
      and git's error goes to the worker's stderr wherever the user's project is not a repository;
    - a progress bar per task and per step (building requests, tokenizing, log-likelihoods), drawn
      with tqdm in three of its modules, two of them with no way to turn it off;
    - its warnings about being handed a loaded model: `setup_logging("ERROR")` is lm-eval's own
      switch (`simple_evaluate`'s `verbosity` is applied only after the run).
    """
    import lm_eval.api.model
    import lm_eval.api.task
    import lm_eval.evaluator
    import lm_eval.models.huggingface
    from lm_eval.utils import setup_logging
    from tqdm import tqdm

    def no_bar(*args, **kwargs):
        return tqdm(*args, **{**kwargs, "disable": True})

    setup_logging("ERROR")
    with contextlib.ExitStack() as patches:
        for module in (lm_eval.api.model, lm_eval.api.task, lm_eval.models.huggingface):
            patches.enter_context(mock.patch.object(module, "tqdm", no_bar))
        patches.enter_context(mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", lambda: None))
        yield


def run_benchmarks(model, tokenizer, job: BenchmarkJob) -> dict[str, float]:
    """Score a loaded model on the job's benchmarks: each metric with its sample size and stderr.
    lm-eval runs them, each question's shared context computed once (tasks/components/shared_prompt_lm.py)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from tasks.components.shared_prompt_lm import SharedPromptLM

    tasks = [task_config(t.name, t.file) if t.file else t.name for t in job.tasks]
    with quiet_lm_eval():
        lm = SharedPromptLM(pretrained=model, tokenizer=tokenizer, batch_size=job.batch_size)
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=job.num_fewshot,
            limit=job.limit,
            task_manager=TaskManager(verbosity="ERROR", include_defaults=any(isinstance(t, str) for t in tasks)),
            bootstrap_iters=1000,
            log_samples=False,
        )
    metrics: dict[str, float] = {}
    for task, values in results["results"].items():
        n = int(results["n-samples"].get(task, {}).get("effective", 0))
        for metric, value in values.items():
            if not isinstance(value, (int, float)) or "_stderr" in metric or metric == "sample_len":
                continue
            key = metric_key(task, metric)
            stderr = values.get(metric.replace(",", "_stderr,", 1))
            metrics[key], metrics[f"{key}_n"] = float(value), n
            if isinstance(stderr, (int, float)):
                metrics[f"{key}_stderr"] = float(stderr)
    return metrics

"""The evaluation child process: `python -m tasks.workers.evaluate OUTPUT/evaluate_config.json`.

Launched by the evaluate task (tasks/stages/evaluate.py). For the fine-tuned model and, when asked,
the base model it computes validation loss and perplexity, answers every evaluation prompt
with greedy decoding, scores the answers (tasks/components/scoring.py) and runs the lm-eval
benchmarks (tasks/components/benchmarks.py). Emits one `Evaluated` event per model and writes the
same scores to `answers.json` for the user.
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path

import torch

from tasks.components.benchmarks import run_benchmarks
from tasks.components.generation import generate_answers, single_turns
from tasks.components.modeling import batched_example_losses, compute_setup, load_model
from tasks.components.preference_scoring import preference_scores
from tasks.components.scoring import score_sets
from tasks.contracts.child_process import emit, worker_entry
from tasks.contracts.worker_configs import EvaluateJob
from tasks.contracts.worker_events import Evaluated, Scores


def validation_loss(model, dataset_dir: Path, pad_id: int, batch_size: int, device) -> dict[str, float]:
    """Mean loss per supervised token of the val split, with the standard error of that mean taken
    across examples (tokens of one example are not independent draws)."""
    from datasets import load_from_disk

    split = dataset_dir / "val"
    if not split.exists():
        return {}
    columns = load_from_disk(str(split)).to_dict()
    if not columns.get("input_ids"):
        return {}
    sequences = list(zip(columns["input_ids"], columns["labels"], strict=True))
    sums, counts = batched_example_losses(model, sequences, pad_id, batch_size, device)
    total, count = sum(sums), max(sum(counts), 1)
    loss = total / count
    if len(sums) < 2:  # one example says nothing of the spread: no interval
        return {"val_loss": loss, "perplexity": math.exp(min(loss, 50))}
    # the ratio estimator's standard error: residuals of each example's sum against its share
    n = len(sums)
    residual = sum((s - loss * c) ** 2 for s, c in zip(sums, counts, strict=True)) / (n - 1)
    stderr = math.sqrt(residual / n) / (count / n)
    return {"val_loss": loss, "val_loss_n": n, "val_loss_stderr": stderr, "perplexity": math.exp(min(loss, 50))}


def score_model(model, tokenizer, job: EvaluateJob, setup) -> Scores:
    """Validation loss, the answers to every set's prompts scored, and the benchmarks, for one model."""
    autocast = torch.autocast(setup.device.type, dtype=setup.autocast_dtype) if setup.autocast_dtype else nullcontext()
    conversations = single_turns([row.prompt for eval_set in job.sets for row in eval_set.prompts])
    with autocast:
        loss = validation_loss(model, Path(job.dataset_dir), tokenizer.pad_token_id, job.batch_size, setup.device)
        answers = generate_answers(model, tokenizer, conversations, job.max_new_tokens, job.batch_size, setup.device)
        preferences = preference_scores(model, tokenizer, job.preferences, job.batch_size, setup.device)
        benchmarks = run_benchmarks(model, tokenizer, job.benchmarks) if job.benchmarks else {}
    scores = score_sets(job.sets, answers, job.template_vars)
    scores.metrics.update({**loss, **preferences, **benchmarks})
    return scores


def evaluate(job: EvaluateJob) -> None:
    """The base model first, then the tuned one. With one LoRA adapter on the base, both are one copy
    of the weights: the base answers with the adapter switched off, then the adapter is merged in
    for the tuned answers (the same greedy answers as unmerged, without LoRA's extra matmuls at
    every step: 8.8 s against 7.3 s for the demo's prompts)."""
    from transformers import AutoTokenizer

    setup = compute_setup(job.compute_type)
    remote_code = job.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(job.model_path, trust_remote_code=remote_code)
    weights = job.tuned
    tuned = load_model(weights.model_dir, weights.adapters, setup.device, trust_remote_code=remote_code).eval()
    adapter_on_base = len(weights.adapters) == 1 and weights.model_dir == job.model_path
    results: dict[str, Scores] = {}
    if job.compare_base and adapter_on_base:
        with tuned.disable_adapter():
            results["base"] = score_model(tuned, tokenizer, job, setup)
    elif job.compare_base:
        base = load_model(job.model_path, None, setup.device, trust_remote_code=remote_code).eval()
        results["base"] = score_model(base, tokenizer, job, setup)
        del base
    if weights.adapters:
        tuned.merge_adapter()
    results = {"tuned": score_model(tuned, tokenizer, job, setup), **results}
    for name, scores in results.items():
        emit(Evaluated(variant=name, scores=scores))
    # for the user to read; the stage takes the scores from the events
    answers = {name: scores.model_dump(exclude_none=True) for name, scores in results.items()}
    Path(job.output_dir, "answers.json").write_text(json.dumps(answers, ensure_ascii=False, indent=2))


if __name__ == "__main__":
    worker_entry(evaluate, EvaluateJob)

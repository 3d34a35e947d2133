"""The evaluation child process: `python -m tasks.workers.evaluate OUTPUT/evaluate_config.json`.

Launched by the evaluate task (tasks/stages/evaluate.py). For the fine-tuned model and, when asked,
the base model it computes validation loss and perplexity, answers every evaluation prompt
with greedy decoding, and scores the answers (tasks/components/scoring.py). Emits one `Evaluated`
event per model and writes the same scores to `answers.json` for the user.
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path

import torch

from tasks.components.generation import generate_answers, single_turns
from tasks.components.modeling import compute_setup, load_model, pad_batch, supervised_loss
from tasks.components.scoring import score_answers
from tasks.contracts.child_process import emit, worker_entry
from tasks.contracts.worker_configs import EvaluateJob
from tasks.contracts.worker_events import Evaluated, Scores


@torch.no_grad()
def validation_loss(model, dataset_dir: Path, pad_id: int, batch_size: int, device) -> float | None:
    from datasets import load_from_disk

    split = dataset_dir / "val"
    if not split.exists():
        return None
    columns = load_from_disk(str(split)).to_dict()
    if not columns.get("input_ids"):
        return None
    total, count = 0.0, 0
    for start in range(0, len(columns["input_ids"]), batch_size):
        ids, mask, labels = pad_batch(
            columns["input_ids"][start : start + batch_size], columns["labels"][start : start + batch_size], pad_id
        )
        loss, tokens = supervised_loss(model, ids.to(device), mask.to(device), labels.to(device))
        total, count = total + float(loss), count + tokens
    return total / max(count, 1)


def evaluate(job: EvaluateJob) -> None:
    from transformers import AutoTokenizer

    setup = compute_setup(job.compute_type)
    remote_code = job.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(job.model_path, trust_remote_code=remote_code)
    identity, control = job.identity, job.control
    conversations = single_turns([row.prompt for row in identity] + [row.prompt for row in control])
    weights = job.tuned
    tuned = load_model(weights.model_dir, weights.adapters, setup.device, trust_remote_code=remote_code).eval()
    # one adapter on the base: the base model is the same weights with the adapter switched off
    adapter_on_base = len(weights.adapters) == 1 and weights.model_dir == job.model_path
    autocast = torch.autocast(setup.device.type, dtype=setup.autocast_dtype) if setup.autocast_dtype else nullcontext()
    dataset_dir = Path(job.dataset_dir)
    variants = {"tuned": tuned}
    if job.compare_base:
        variants["base"] = (
            tuned if adapter_on_base else load_model(job.model_path, None, setup.device, trust_remote_code=remote_code)
        )
    results: dict[str, Scores] = {}
    for name, variant in variants.items():
        adapter_off = variant.disable_adapter() if name == "base" and adapter_on_base else nullcontext()
        with adapter_off, autocast:
            loss = validation_loss(variant, dataset_dir, tokenizer.pad_token_id, job.batch_size, setup.device)
            answers = generate_answers(
                variant, tokenizer, conversations, job.max_new_tokens, job.batch_size, setup.device
            )
        scores = score_answers(identity, control, answers, job.template_vars)
        if loss is not None:
            scores.metrics.update({"val_loss": loss, "perplexity": math.exp(min(loss, 50))})
        results[name] = scores
        emit(Evaluated(variant=name, scores=scores))
    # for the user to read; the stage takes the scores from the events
    answers = {name: scores.model_dump(exclude_none=True) for name, scores in results.items()}
    Path(job.output_dir, "answers.json").write_text(json.dumps(answers, ensure_ascii=False, indent=2))


if __name__ == "__main__":
    worker_entry(evaluate, EvaluateJob)

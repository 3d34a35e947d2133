"""The export child process: `python -m tasks.workers.export OUTPUT/export_config.json`.

Launched by the merge-and-export task (tasks/stages/export.py). Merges the LoRA adapters of the
training stages into their model (or takes fully fine-tuned weights as they are), checks that
the merged model's logits match the adapter model's, saves safetensors shards with the
tokenizer and generation config, then reloads the saved files and checks the logits once more.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tasks.components.modeling import load_model
from tasks.contracts.child_process import WorkerError, emit, worker_entry
from tasks.contracts.worker_configs import ExportJob
from tasks.contracts.worker_events import ExportChecked

CHECK_PROMPTS = ["Who are you?", "What is the capital of France?", "Write one sentence about the sea."]


@torch.no_grad()
def logits_for(model, batch) -> torch.Tensor:
    return model(**batch).logits.float()


def export(job: ExportJob) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    out = Path(job.output_dir) / "model"
    remote_code = job.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(job.model_path, trust_remote_code=remote_code)
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in CHECK_PROMPTS
    ]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)

    weights = job.weights
    model = load_model(weights.model_dir, weights.adapters, trust_remote_code=remote_code).eval()
    reference = logits_for(model, batch)  # with the last adapter still separate
    if weights.adapters:
        model = model.merge_and_unload()
    merged_diff = (logits_for(model, batch) - reference).abs().max().item()
    if merged_diff > job.logits_atol:
        raise WorkerError(
            f"merged logits differ from the adapter model's by {merged_diff:.2e} "
            f"(export.logits_atol is {job.logits_atol:.0e})"
        )
    model.generation_config = GenerationConfig.from_pretrained(job.model_path)
    model.save_pretrained(out, safe_serialization=True, max_shard_size=job.max_shard_size)
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(out)
    del model

    reloaded = load_model(out, trust_remote_code=remote_code).eval()
    reload_diff = (logits_for(reloaded, batch) - reference).abs().max().item()
    if reload_diff > job.logits_atol:
        raise WorkerError(f"the saved model's logits differ from the adapter model's by {reload_diff:.2e}")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    emit(ExportChecked(merged_logits_max_diff=merged_diff, reloaded_logits_max_diff=reload_diff, shards=len(shards)))


if __name__ == "__main__":
    worker_entry(export, ExportJob)

"""The export child process: `python -m tasks.workers.export OUTPUT/export_config.json`.

Launched by the merge-and-export task (tasks/stages/export.py). Merges the LoRA adapters of the
training stages into their model (or takes fully fine-tuned weights as they are), checks that
the merged model's logits match the adapter model's, saves safetensors shards with the
tokenizer and generation config, then reloads the saved files and checks the logits once more.
With `export.formats: [safetensors, gguf]` it writes one checked GGUF file of those files, and
an Ollama Modelfile, beside them (tasks/components/gguf_check.py).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from tasks.components.gguf_check import write_checked_gguf
from tasks.components.gguf_writer import LOGITS_RTOL, GGUFError, architecture
from tasks.components.merge_check import first_lora_delta, logits_gap
from tasks.components.modeling import load_model
from tasks.contracts.child_process import WorkerError, emit, worker_entry
from tasks.contracts.worker_configs import ExportJob
from tasks.contracts.worker_events import ExportChecked

FAULT_MERGE_TWICE = "TUNEFACTORY_FAULT_MERGE_ONE_MODULE_TWICE"  # tests only: a wrong merge the check must catch
CHECK_PROMPTS = ["Who are you?", "What is the capital of France?", "Write one sentence about the sea."]


@contextlib.contextmanager
def gguf_refusal():
    """What the GGUF writer refuses is the user's to fix: a message, not a traceback."""
    try:
        yield
    except GGUFError as exc:
        raise WorkerError(f"export.formats: gguf: {exc}") from None


def gguf_beside(out: Path, job: ExportJob) -> dict:
    """The checked GGUF file of the saved export, in its directory; the ExportChecked fields about it."""
    target = out / f"{job.gguf_name}-{job.gguf_type}.gguf"
    with gguf_refusal():
        gap = write_checked_gguf(out, target, job.gguf_type)
    return dict(
        gguf_file=target.name,
        gguf_logits_rel_diff=gap,
        gguf_logits_rtol=LOGITS_RTOL[job.gguf_type],
        gguf_size_mb=target.stat().st_size / 1e6,
    )


@torch.no_grad()
def logits_for(model, batch) -> torch.Tensor:
    return model(**batch).logits.float()


def export(job: ExportJob) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    out = Path(job.output_dir) / "model"
    if "gguf" in job.formats:  # a hub model's architecture is first known here: refused before the merge
        with gguf_refusal():
            architecture(Path(job.model_path))
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
    wrong = first_lora_delta(model) if weights.adapters and os.environ.get(FAULT_MERGE_TWICE) else None
    if weights.adapters:
        model = model.merge_and_unload()
    if wrong is not None:  # the fault test's merge bug: one module's change applied a second time
        with torch.no_grad():
            wrong[0].weight += wrong[1]
    merged = logits_gap(reference, logits_for(model, batch))
    if merged.relative > job.logits_rtol:
        raise WorkerError(
            f"the merged model's logits differ from the adapter model's by {merged.absolute:.2e}, "
            f"{merged.relative:.1e} of the largest logit ({merged.scale:.3g}); export.logits_rtol is "
            f"{job.logits_rtol:.0e}. Rounding stays near 1e-5 of it: this merge is wrong, and nothing was exported"
        )
    model.generation_config = GenerationConfig.from_pretrained(job.model_path)
    model.save_pretrained(out, safe_serialization=True, max_shard_size=job.max_shard_size)
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(out)
    del model

    reloaded = load_model(out, trust_remote_code=remote_code).eval()
    reloaded_gap = logits_gap(reference, logits_for(reloaded, batch))
    if reloaded_gap.relative > job.logits_rtol:
        raise WorkerError(
            f"the saved model's logits differ from the adapter model's by {reloaded_gap.absolute:.2e}, "
            f"{reloaded_gap.relative:.1e} of the largest logit; export.logits_rtol is {job.logits_rtol:.0e}"
        )
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    gguf = gguf_beside(out, job) if "gguf" in job.formats else {}
    emit(
        ExportChecked(
            merged_logits_max_diff=merged.absolute,
            merged_logits_rel_diff=merged.relative,
            reloaded_logits_max_diff=reloaded_gap.absolute,
            reloaded_logits_rel_diff=reloaded_gap.relative,
            logits_scale=merged.scale,
            shards=len(shards),
            **gguf,
        )
    )


if __name__ == "__main__":
    worker_entry(export, ExportJob)

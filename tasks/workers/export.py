"""The export child process: `python -m tasks.workers.export OUTPUT/export_config.json`.

Launched by the merge-and-export task (tasks/stages/export.py). Merges the LoRA adapters of the
training stages into their model (or takes fully fine-tuned weights as they are), checks that
the merged model's logits match the adapter model's (a qlora adapter's export also against the
adapter on the quantized base it trained on: tasks/components/merge_check.py), saves safetensors
shards with the tokenizer and generation config, then reloads the saved files and checks the
logits once more.
With `export.formats: [safetensors, gguf]` it writes one checked GGUF file of those files, and
an Ollama Modelfile, beside them (tasks/components/gguf_check.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from tasks.components.fault_injection import Faults
from tasks.components.finetuning_methods import quantization
from tasks.components.gguf_check import write_checked_gguf
from tasks.components.gguf_writer import LOGITS_RTOL, GGUFError, architecture, pretokenizer_name
from tasks.components.merge_check import LogitsGap, first_lora_delta, logits_gap, quantized_check
from tasks.components.modeling import load_model
from tasks.contracts.child_process import WorkerError, emit, worker_entry
from tasks.contracts.worker_configs import ExportJob, QuantizedBase
from tasks.contracts.worker_events import ExportChecked

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


def check_batch(tokenizer):
    """CHECK_PROMPTS as the chat template puts them, in one left-padded batch."""
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in CHECK_PROMPTS
    ]
    tokenizer.padding_side = "left"
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@dataclass
class Merged:
    model: torch.nn.Module  # the adapters merged in
    reference: torch.Tensor  # the logits with the last adapter still separate
    full_base: torch.Tensor | None  # with it switched off (a qlora adapter's check needs them)
    logits: torch.Tensor  # the merged model's
    gap: LogitsGap  # those from the reference


def merge(job: ExportJob, batch) -> Merged:
    """The trained weights as one model, its logits checked against the adapter model's."""
    weights = job.weights
    model = load_model(weights.model_dir, weights.adapters, trust_remote_code=job.trust_remote_code).eval()
    reference, full_base = logits_for(model, batch), None
    if job.quantized_base:
        with model.disable_adapter():
            full_base = logits_for(model, batch)
    wrong = first_lora_delta(model) if weights.adapters and Faults.from_environment().merge_one_module_twice else None
    if weights.adapters:
        model = model.merge_and_unload()
    if wrong is not None:  # the fault test's merge bug: one module's change applied a second time
        with torch.no_grad():
            wrong[0].weight += wrong[1]
    logits = logits_for(model, batch)
    gap = logits_gap(reference, logits, batch["attention_mask"])
    if gap.relative > job.logits_rtol:
        raise WorkerError(
            f"the merged model's logits differ from the adapter model's by {gap.absolute:.2e}, "
            f"{gap.relative:.1e} of the largest logit ({gap.scale:.3g}); export.logits_rtol is "
            f"{job.logits_rtol:.0e}. Rounding stays under 1e-5 of it: this merge is wrong, and nothing was exported"
        )
    return Merged(model, reference, full_base, logits, gap)


def as_trained(base: QuantizedBase, adapter: str, batch, trust_remote_code: bool = False):
    """Logits of the adapter on the base quantized as its stage quantized it (on this CPU, fp32
    compute), and of that quantized base alone."""
    quantized = load_model(
        base.model_dir, adapter, trust_remote_code=trust_remote_code, **quantization(base, torch.device("cpu"))
    ).eval()
    trained = logits_for(quantized, batch)
    with quantized.disable_adapter():
        return trained, logits_for(quantized, batch)


def against_quantized_base(job: ExportJob, batch, merged: Merged) -> dict:
    """A qlora export against the model as it trained (`as_trained`). Refused when the export is
    further from it than export.quantized_kl_ratio times the distance between the two bases."""
    base = job.quantized_base
    trained, quantized_base = as_trained(base, job.weights.adapters[-1], batch, job.trust_remote_code)
    check = quantized_check(trained, merged.logits, quantized_base, merged.full_base, batch["attention_mask"])
    what = f"{base.quantization_bit}-bit" + (f" {base.quantization_type}" if base.quantization_bit == 4 else "")
    if check.ratio > job.quantized_kl_ratio:
        raise WorkerError(
            f"the export is not the model that was trained: on the check prompts its next-token distributions are "
            f"{check.export.kl:.3g} nats (mean KL) from the adapter on the {what} base it trained on, "
            f"{check.ratio:.2f} times the {check.base.kl:.3g} nats between that base and the full-precision one; "
            f"export.quantized_kl_ratio is {job.quantized_kl_ratio:g}. On the full-precision base the adapter does "
            "what it did not do on the base it trained on; nothing was exported (train with finetuning_type lora, "
            "or raise export.quantized_kl_ratio to export it as it is)"
        )
    return dict(
        quantized_trained_kl=check.export.kl,
        quantized_trained_top1=check.export.top1,
        quantized_base_kl=check.base.kl,
        quantized_base_top1=check.base.top1,
        quantized_kl_ratio=check.ratio,
    )


def export(job: ExportJob) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    out = Path(job.output_dir) / "model"
    if "gguf" in job.formats:  # a hub model's architecture and tokenizer are first known here: refused before the merge
        with gguf_refusal():
            architecture(Path(job.model_path))
            pretokenizer_name(Path(job.model_path))
    tokenizer = AutoTokenizer.from_pretrained(job.model_path, trust_remote_code=job.trust_remote_code)
    batch = check_batch(tokenizer)
    merged = merge(job, batch)
    trained = against_quantized_base(job, batch, merged) if job.quantized_base else {}

    merged.model.generation_config = GenerationConfig.from_pretrained(job.model_path)
    merged.model.save_pretrained(out, safe_serialization=True, max_shard_size=job.max_shard_size)
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(out)
    del merged.model

    reloaded = load_model(out, trust_remote_code=job.trust_remote_code).eval()
    reloaded_gap = logits_gap(merged.reference, logits_for(reloaded, batch), batch["attention_mask"])
    if reloaded_gap.relative > job.logits_rtol:
        raise WorkerError(
            f"the saved model's logits differ from the adapter model's by {reloaded_gap.absolute:.2e}, "
            f"{reloaded_gap.relative:.1e} of the largest logit; export.logits_rtol is {job.logits_rtol:.0e}"
        )
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    gguf = gguf_beside(out, job) if "gguf" in job.formats else {}
    emit(
        ExportChecked(
            merged_logits_max_diff=merged.gap.absolute,
            merged_logits_rel_diff=merged.gap.relative,
            reloaded_logits_max_diff=reloaded_gap.absolute,
            reloaded_logits_rel_diff=reloaded_gap.relative,
            logits_scale=merged.gap.scale,
            shards=len(shards),
            **trained,
            **gguf,
        )
    )


if __name__ == "__main__":
    worker_entry(export, ExportJob)

"""Model helpers shared by the training, evaluation and export workers (torch lives here and below).

- `compute_setup` turns the spec's compute_type into a device, an autocast dtype and threads.
- `attention_implementation` picks the attention kernel the model is loaded with.
- `load_model` reads a model directory, optionally with LoRA adapters on top (a chain of
  stages: every adapter but the last is merged in, the last stays switchable).
- `supervised_loss` (and `example_losses`, per row) computes the loss only where labels are set,
  so the output head never produces full-vocabulary logits for prompt and padding positions.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tasks.components.chat_encoding import IGNORE_INDEX  # the label of a token without loss, set where labels are made
from tasks.contracts.child_process import WorkerError, usable_cores


@dataclass(frozen=True)
class ComputeSetup:
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: plain fp32
    name: str


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX512-BF16 or AMX tiles). On one that has, a bf16
    matrix multiply ran 2.6x the fp32 one and the demo trained 1.4x faster with the same
    evaluation; on one that has not, bf16 is emulated and slower than fp32.
    TUNEFACTORY_CPU_BF16=0 or 1 overrides the detection (the test suite sets 0: its numeric
    comparisons are written for fp32 on any CI machine)."""
    forced = os.environ.get("TUNEFACTORY_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def compute_setup(compute_type: str) -> ComputeSetup:
    """auto = bf16 on a CUDA GPU that supports it, fp16 on an older GPU; on a CPU, bf16 where the CPU
    computes it natively, fp32 elsewhere."""
    cuda = torch.cuda.is_available()
    if not cuda:
        # one thread per usable core; several training processes on this machine (torchrun) share them
        torch.set_num_threads(max(1, usable_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    device = torch.device("cuda" if cuda else "cpu")
    if compute_type == "auto":
        if cuda:
            compute_type = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            compute_type = "bf16" if cpu_computes_bf16() else "fp32"
    if compute_type == "fp16" and not cuda:
        raise WorkerError("train.compute_type: fp16 needs a CUDA GPU; use auto, fp32 or bf16 on CPU")
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    return ComputeSetup(device, dtypes[compute_type], compute_type)


def lora_targets(model: torch.nn.Module, requested: list[str] | str) -> list[str]:
    """'all' means every nn.Linear except the output head; a list is checked against the model."""
    linear = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    linear -= {"lm_head", "score"}  # output heads: a language model's, a reward model's
    if requested == "all":
        return sorted(linear)
    unknown = sorted(set(requested) - linear)
    if unknown:
        raise WorkerError(
            f"train.lora.target_modules: {', '.join(unknown)} not found; this model's linear layers: "
            f"{', '.join(sorted(linear))}"
        )
    return list(requested)


def load_model(
    model_path: str | Path,
    adapters: list[str] | str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    merge_all: bool = False,
    model_class: str = "AutoModelForCausalLM",
    **model_kwargs,
) -> torch.nn.Module:
    """A model directory with `adapters` applied in order; all but the last merged (all, with merge_all)."""
    import transformers

    skip_unused_deepspeed_check()  # every worker that saves a model loads it here first

    auto = getattr(transformers, model_class)
    model = auto.from_pretrained(model_path, dtype=dtype, trust_remote_code=trust_remote_code, **model_kwargs)
    stack = [adapters] if isinstance(adapters, str | Path) else list(adapters or [])
    for position, adapter in enumerate(stack):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
        if merge_all or position < len(stack) - 1:
            model = model.merge_and_unload()
    if "quantization_config" in model_kwargs:  # bitsandbytes placed it already (device_map)
        return model
    return model.to(device)


def skip_unused_deepspeed_check() -> None:
    """Keep `save_pretrained` from importing DeepSpeed in a process that never used it.

    accelerate unwraps a model before it is saved, and where DeepSpeed is installed it imports
    DeepSpeed (3 to 4 s on a CPU) to ask whether the model is a DeepSpeed engine. A model can be
    one only if DeepSpeed was imported already, so the question is asked only then; a DeepSpeed run
    (tasks/components/distributed_engines.py) imports it first and is unwrapped as before.
    """
    import accelerate.utils.other

    if hasattr(accelerate.utils.other, "is_deepspeed_available"):
        accelerate.utils.other.is_deepspeed_available = lambda: "deepspeed" in sys.modules


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def attention_implementation(device: torch.device) -> str:
    """FlashAttention 2 on a GPU that has it installed (variable-length rows for packing), else SDPA."""
    if device.type == "cuda":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
    return "sdpa"


def token_losses(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    reduction: str = "none",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy at each supervised next-token position (summed with reduction "sum"), and
    where those positions are.

    attention_mask None: right padding, which causal attention never lets a real token see.
    position_ids restarting inside a row: packed examples, each attending only to itself
    (transformers builds the block mask, or variable-length FlashAttention, from them).
    """
    lm = causal_lm(model)
    hidden = lm.model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = lm.lm_head(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), targets[keep], reduction=reduction), keep


def supervised_loss(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the supervised next-token positions, and their count."""
    loss, keep = token_losses(model, input_ids, attention_mask, labels, position_ids, reduction="sum")
    return loss, int(keep.sum())


def example_losses(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[list[float], list[int]]:
    """`supervised_loss` per row of the batch: each example's summed loss and its token count."""
    losses, keep = token_losses(model, input_ids, attention_mask, labels)
    rows = torch.arange(keep.shape[0], device=keep.device).unsqueeze(1).expand_as(keep)[keep]
    sums = torch.zeros(keep.shape[0], device=losses.device).index_add_(0, rows, losses)
    return sums.tolist(), keep.sum(dim=1).tolist()


@torch.no_grad()
def batched_example_losses(
    model: torch.nn.Module, sequences: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int, device
) -> tuple[list[float], list[int]]:
    """`example_losses` of each (input_ids, labels), in their order, computed in batches of similar
    length: longest first, cut where padding would grow past a quarter (padding is computed like any
    token: 22 demo examples in one batch took 2970 positions for 1567 tokens)."""
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))
    sums, counts = [0.0] * len(sequences), [0] * len(sequences)
    for batch in length_batches([len(sequences[i][0]) for i in order], batch_size):
        rows = [order[i] for i in batch]
        ids, mask, labels = pad_batch([sequences[i][0] for i in rows], [sequences[i][1] for i in rows], pad_id)
        losses, tokens = example_losses(model, ids.to(device), mask.to(device), labels.to(device))
        for row, loss, count in zip(rows, losses, tokens, strict=True):
            sums[row], counts[row] = loss, count
    return sums, counts


def length_batches(lengths: list[int], batch_size: int, waste: float = 0.25) -> list[list[int]]:
    """Positions of `lengths` (sorted longest first) in batches of at most `batch_size`, a batch
    ending where padding to its first (longest) member would exceed `waste` of its tokens."""
    batches: list[list[int]] = []
    for index, length in enumerate(lengths):
        current = batches[-1] if batches else None
        if current and len(current) < batch_size:
            real = sum(lengths[i] for i in current) + length
            if lengths[current[0]] * (len(current) + 1) <= (1 + waste) * real:
                current.append(index)
                continue
        batches.append([index])
    return batches


def pad_batch(
    sequences: list[list[int]], labels: list[list[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad a batch to its longest member: ids, attention mask and labels."""
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    target = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for row, (seq, lab) in enumerate(zip(sequences, labels, strict=True)):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        target[row, : len(lab)] = torch.tensor(lab)
    return ids, mask, target

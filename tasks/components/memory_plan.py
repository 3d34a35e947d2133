"""Will a training step fit? An estimate of its peak memory before the first step, and the way
the step is split when it does not.

The estimate adds what a pt/sft step holds at its peak (tasks/workers/train.py):
- the weights as loaded (a bf16 frozen base, a 4-bit one under qlora: their real sizes);
- for each trainable parameter its fp32 gradient and AdamW's two moments (12 bytes);
- the activations autograd keeps for the backward pass, per token and decoder layer: the inputs
  of the norms, projections and MLP and their outputs, about 10 x hidden + 4 x intermediate values
  in the compute precision; with gradient checkpointing only each layer's input is kept and one
  layer's activations are rebuilt at a time;
- attention probabilities where the kernel materializes them (SDPA's math path on a CPU: heads x
  width values per token and layer, twice); FlashAttention and memory-efficient SDPA on a GPU
  keep none;
- the output head's logits on the supervised positions, in fp32, with their gradient and
  softmax (3 x supervised tokens x vocabulary x 4 bytes);
- the process itself (interpreter, torch and its libraries): a fixed allowance.
The widest micro-batch is the step's: `batch_size` examples of the longest length (batches group
similar lengths, and one of them holds the longest example).

The plan keeps 10% of the budget (`train.max_memory`, else the memory the device has free) free:
the estimate is not exact, and the allocator's fragments and other programs take their share.
When the step does not fit the rest, the plan falls back in this order: each batch split into 2,
4, ... micro-batches whose gradients are accumulated before the one optimizer step (the step, its
examples and its loss stay the same); then the same with gradient checkpointing; and refuses only
when a micro-batch of one example with checkpointing does not fit. A step that runs out of memory
all the same is retried once by the train task with each batch split twice as much (`least_split`).
"""

from __future__ import annotations

from dataclasses import dataclass

PROCESS_BYTES = {"cpu": 1.2e9, "cuda": 0.6e9}  # interpreter and libraries (CPU: resident); CUDA: context, cuBLAS
OPTIMIZER_BYTES = 12  # fp32 gradient and AdamW's two moments, per trainable parameter
HEADROOM = 0.10  # of the budget left unplanned: an estimate that reached 100% of it left nothing for its error


@dataclass(frozen=True)
class StepShape:
    """What a step's memory depends on, read from the model and the data."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    weight_bytes: int  # the weights as loaded
    trainable: int  # trainable parameters
    compute_bytes: int  # 4 for fp32, 2 under bf16 or fp16 autocast
    rows: int  # examples per micro-batch on this process, before any split
    width: int  # the longest row's length (attention spans it)
    tokens: int  # the positions of the step's widest micro-batch, padding included
    supervised: int  # its supervised tokens
    device: str  # "cpu" or "cuda"
    attention_probs: bool  # the attention kernel materializes its probabilities


@dataclass(frozen=True)
class MemoryPlan:
    split: int  # micro-batches per batch
    gradient_checkpointing: bool
    estimate_bytes: float
    budget_bytes: float
    unsplit_bytes: float  # the estimate of the step as the spec asked for it

    def describe(self) -> str:
        gb = 1e9
        asked = f"memory: the step needs about {self.unsplit_bytes / gb:.1f} GB as asked"
        budget = f"budget {self.budget_bytes / gb:.1f} GB ({1 - HEADROOM:.0%} of it planned)"
        if self.estimate_bytes == self.unsplit_bytes:
            return f"{asked}; {budget}: it fits"
        how = f"each batch in {self.split} micro-batches, gradients accumulated" if self.split > 1 else "unsplit"
        if self.gradient_checkpointing:
            how += ", with gradient checkpointing"
        return f"{asked}, over the {budget}; {self.estimate_bytes / gb:.1f} GB {how}"


def step_bytes(shape: StepShape, split: int, checkpointing: bool) -> float:
    """The estimated peak of one step whose micro-batches hold rows / split examples."""
    tokens = -(-shape.tokens // split)
    per_layer = (10 * shape.hidden + 4 * shape.intermediate) * shape.compute_bytes
    if shape.attention_probs:
        per_layer += 2 * shape.heads * shape.width * 4  # kept in fp32 by the math path's softmax
    if checkpointing:  # each layer's input kept, one layer rebuilt at a time
        activations = tokens * (shape.layers * shape.hidden * shape.compute_bytes + per_layer)
    else:
        activations = tokens * shape.layers * per_layer
    logits = 3 * -(-shape.supervised // split) * shape.vocab * 4
    optimizer = shape.trainable * OPTIMIZER_BYTES
    return PROCESS_BYTES[shape.device] + shape.weight_bytes + optimizer + activations + logits


def splits(rows: int) -> list[int]:
    """1, 2, 4, ... up to one example per micro-batch."""
    found, split = [], 1
    while split < rows:
        found.append(split)
        split *= 2
    return [*found, rows]


def plan_memory(shape: StepShape, budget: float, checkpointing: bool, least_split: int = 1) -> MemoryPlan | None:
    """The first of the fallbacks that fits `budget` less its headroom; None when none does.

    least_split: split each batch at least this much (a retry after the estimate fell short).
    """
    unsplit = step_bytes(shape, 1, checkpointing)
    least = min(least_split, shape.rows)
    for use_checkpointing in dict.fromkeys([checkpointing, True]):
        for split in splits(shape.rows):
            needed = step_bytes(shape, split, use_checkpointing)
            if split >= least and needed <= budget * (1 - HEADROOM):
                return MemoryPlan(split, use_checkpointing, needed, budget, unsplit)
    return None

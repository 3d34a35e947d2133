"""The events a worker sends back to the task that launched it: one pydantic model per kind.

A worker prints each as one `@@tunefactory {json}` line (`emit`); `run_worker` reads the line back
as a `WorkerEvent`, so an event whose fields do not match the contract fails where it arrives,
naming the field, not as a KeyError in a handler minutes later. Handlers match on the class.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.contracts.stage_infos import RankSummary, SourceRecord

Number = int | float  # int stays int (counts), so logs and manifests show 22, not 22.0


class Event(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Failed(Event):
    """The worker stops: a message meant for the user (a mistake of theirs, or a check that failed)."""

    type: Literal["error"] = "error"
    message: str


class Note(Event):
    """A line for the stage's log."""

    type: Literal["note"] = "note"
    message: str


class Templated(Event):
    type: Literal["templated"] = "templated"
    sources: list[SourceRecord]
    rows: int
    train_rows: int
    val_rows: int
    skipped: dict[str, int]  # "dataset: reason" -> rows left out
    preview: list[dict[str, object]]  # the first rows of the training split, as the stage reads them


class SplitCounts(BaseModel):
    """One tokenized split, counted; what a kind of data does not have is None (not logged)."""

    model_config = ConfigDict(extra="forbid")
    examples: int  # rows (text: packed blocks) the training reads
    documents: int | None = None  # text: the documents packed into those blocks
    tokens: int
    truncated: int | None = None  # examples cut at tokenize.cutoff_len
    supervised_tokens: int | None = None  # tokens with a label (chat: the assistant's; text: all)
    dropped: int | None = None  # chat: examples left without any supervised token

    def counted(self) -> dict[str, int]:
        """The counts this split has, by name, in the order they are logged."""
        return self.model_dump(exclude_none=True)


class Tokenized(Event):
    type: Literal["tokenized"] = "tokenized"
    train: SplitCounts
    val: SplitCounts
    sample: str  # the first training example as the model sees it

    def metrics(self) -> dict[str, int]:
        """Both splits' counts as the stage logs them: `train_examples`, ..., `val_dropped`."""
        return {f"{split}_{name}": value for split in ("train", "val")
                for name, value in getattr(self, split).counted().items()}  # fmt: skip


class TrainingStarted(Event):
    type: Literal["start"] = "start"
    total_steps: int
    first_step: int
    trainable_params: int
    total_params: int
    examples: int
    compute_type: str
    device: str
    quantized_modules: int = 0  # qlora: the linear layers bitsandbytes holds in 4 or 8 bits
    # what the spec's "auto" (None) became, where the loop decides it (pt and sft)
    attention: str | None = None
    packing: bool | None = None
    torch_compile: bool | None = None
    fused_optimizer: bool | None = None
    frozen_dtype: str | None = None  # lora: the dtype the frozen base is held in (bf16 under bf16 compute)
    gradient_checkpointing: bool | None = None
    world_size: int = 1
    engine: str | None = None  # how the processes share the work: single, ddp, fsdp or deepspeed
    # the memory plan (tasks/components/memory_plan.py): micro-batches per batch, estimate and budget
    micro_batch_split: int = 1
    memory_estimate_mb: int | None = None
    memory_budget_mb: int | None = None


class StepLogged(Event):
    type: Literal["log"] = "log"
    step: int
    metrics: dict[str, Number]  # loss, learning rate, grad norm, throughput, and each trainer's own

    @property
    def loss(self) -> float:
        """The step's training loss, which both loops log with every step (the rest varies by trainer)."""
        return self.metrics["loss"]


class Checkpointed(Event):
    type: Literal["checkpoint"] = "checkpoint"
    step: int


class Resumed(Event):
    type: Literal["resumed"] = "resumed"
    step: int
    checkpoint: str


MEMORY_REMEDY = (
    "lower train.max_memory (the plan then splits each batch into more micro-batches) or set "
    "train.gradient_checkpointing: true, and the stage resumes from its newest checkpoint; or lower "
    "train.batch_size or tokenize.cutoff_len, and it trains anew"
)


class RanOutOfMemory(Event):
    """A pt/sft step did not fit (torch.OutOfMemoryError): where, and what the memory plan had allowed it."""

    type: Literal["out_of_memory"] = "out_of_memory"
    step: int  # the optimizer step that did not fit
    device: str
    detail: str  # the first line of torch's message
    micro_batch_split: int
    rows: int  # examples per micro-batch on this process
    memory_estimate_mb: int
    memory_budget_mb: int
    max_memory: str | None = None  # train.max_memory, when it set the budget

    def explain(self) -> str:
        gb = 2**20 / 1e9  # the plan's figures are in MiB, its messages in GB
        budget = f"{self.memory_budget_mb * gb:.1f} GB" + (f" (train.max_memory {self.max_memory})"
                                                           if self.max_memory else " (the memory free)")  # fmt: skip
        return (
            f"ran out of memory at step {self.step} on {self.device} ({self.detail}): the memory plan estimated "
            f"{self.memory_estimate_mb * gb:.1f} GB for micro-batches of {self.rows} examples (each batch in "
            f"{self.micro_batch_split}), within a budget of {budget}; {MEMORY_REMEDY}"
        )


class TrainingMetrics(BaseModel):
    """What a training worker measured over the whole run; each loop sets its own, the rest stay None."""

    model_config = ConfigDict(extra="forbid")
    # pt and sft (tasks/workers/train.py)
    train_tokens: int | None = None  # every process's real tokens, padding not counted
    train_loop_seconds: float | None = None
    train_tokens_per_second: float | None = None
    peak_memory_mb: float | None = None  # GPU memory torch allocated, or the process's resident memory on CPU
    world_size: int | None = None
    # rm (tasks/workers/trl.py): how often the chosen answer scores above the rejected one
    val_pairwise_accuracy: float | None = None
    train_pairwise_accuracy: float | None = None

    def logged(self) -> dict[str, Number]:
        """The metrics set, by name, in the order the stage logs them."""
        return self.model_dump(exclude_none=True)


class TrainingDone(Event):
    type: Literal["done"] = "done"
    step: int
    final_loss: float
    metrics: TrainingMetrics
    ranks: list[RankSummary] | None = None  # with several processes: where each one ended


class ScoredAnswer(BaseModel):
    """One evaluation prompt, the model's answer and how it scored (tasks/components/scoring.py)."""

    model_config = ConfigDict(extra="forbid")
    set: str  # the evaluation set's label: identity, control or a user's set
    prompt: str
    answer: str
    identity: bool  # the answer names the assistant: a hit on the identity set, a leak on the others
    rouge_l: float | None = None  # identity and rouge_l sets: against the reference answer
    correct: bool | None = None  # exact_match, contains_any and regex sets


class Scores(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metrics: dict[str, Number]
    rows: list[ScoredAnswer]


class Evaluated(Event):
    """One model's scores: the tuned model's, then (when compared) the base model's."""

    type: Literal["metrics"] = "metrics"
    variant: Literal["tuned", "base"]
    scores: Scores


class ExportChecked(Event):
    type: Literal["checked"] = "checked"
    merged_logits_max_diff: float  # the largest difference of one logit from the adapter model's
    merged_logits_rel_diff: float  # that difference as a share of the largest logit (what is checked)
    reloaded_logits_max_diff: float
    reloaded_logits_rel_diff: float
    logits_scale: float  # the largest |logit| of the adapter model on the check prompts
    shards: int
    # a qlora adapter: the export against the adapter on its quantized base (the model as trained), and
    # the full-precision base against the quantized one; mean KL in nats and top-1 agreement at the
    # unpadded positions; the ratio of the two KLs is what export.quantized_kl_ratio bounds
    quantized_trained_kl: float | None = None
    quantized_trained_top1: float | None = None
    quantized_base_kl: float | None = None
    quantized_base_top1: float | None = None
    quantized_kl_ratio: float | None = None
    gguf_file: str | None = None  # export.formats with gguf: the file's name inside model/
    gguf_logits_rel_diff: float | None = None  # the GGUF's logits against the merged model's
    gguf_logits_rtol: float | None = None  # what its type is allowed (tasks/components/gguf_writer.py)
    gguf_size_mb: float | None = None


class BenchTrlDone(Event):
    """make bench: TRL's SFTTrainer on the same case (tasks/tools/bench_train.py)."""

    type: Literal["bench_trl_done"] = "bench_trl_done"
    tokens_per_second: float
    peak_memory_mb: float
    final_loss: float
    steps: int
    adapter: str
    gradient_checkpointing: bool
    batch_size: int
    precision: str


WorkerEvent = Annotated[
    Failed
    | Note
    | Templated
    | Tokenized
    | TrainingStarted
    | StepLogged
    | Checkpointed
    | Resumed
    | TrainingDone
    | RanOutOfMemory
    | Evaluated
    | ExportChecked
    | BenchTrlDone,
    Field(discriminator="type"),
]

"""What a stage task hands its worker process: one pydantic model per worker, the contract between them.

The task builds the config (a wrong or missing field fails there, in the flow process, before
anything is launched); `run_worker` writes it as JSON; the worker validates it again when it
starts (`worker_entry`), so a config written by another version of the code is refused with the
field named instead of failing minutes later on a missing key. Only pydantic and the spec's
sections are imported here: the flow process reads this module without torch.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.contracts.spec_sections import TrainSpec


class WorkerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # whether the job's worker loads torch and transformers, which the preloaded parent imports: such a
    # job waits for a parent still importing them rather than import them a second time beside it
    loads_model_libraries: ClassVar[bool] = True


class Weights(WorkerConfig):
    """A trained model as later stages load it: a model directory and the LoRA adapters to put on it, in order."""

    model_dir: str
    adapters: list[str] = Field(default_factory=list)


# where a qlora (or reward) stage keeps its start model with the earlier stages' adapters merged in:
# bitsandbytes quantizes a model directory as it loads it
MERGED_START = "start_model"


class QuantizedBase(WorkerConfig):
    """The 4- or 8-bit base a qlora adapter trained on: the directory bitsandbytes quantized, and how
    (the spec's train.lora settings of that stage)."""

    model_dir: str
    quantization_bit: Literal[4, 8]
    quantization_type: Literal["nf4", "fp4"]
    double_quantization: bool


class EvalPrompt(WorkerConfig):
    """An evaluation prompt, placeholders filled: with a reference answer (identity) or accepted answers,
    reference texts or patterns (the other scorers)."""

    prompt: str
    reference: str = ""
    answers: list[str] = Field(default_factory=list)


class EvalSet(WorkerConfig):
    """A registered evaluation set read for the worker: its metric prefix, scorer and prompts."""

    label: str
    scorer: str  # one of SCORERS (tasks/contracts/spec_sections.py)
    prompts: list[EvalPrompt]


class PreferencePair(WorkerConfig):
    """A conversation and two answers to it: the one users preferred and the one they did not."""

    messages: list[dict[str, Any]]
    chosen: str
    rejected: str


class BenchmarkTask(WorkerConfig):
    """One benchmark: an lm-eval task by name, or a tunefactory multiple-choice file under a task name."""

    name: str
    file: str | None = None  # a tunefactory benchmark file's path; None: `name` is one of lm-eval's tasks


class BenchmarkJob(WorkerConfig):
    """lm-evaluation-harness tasks run on both models (tasks/components/benchmarks.py)."""

    tasks: list[BenchmarkTask]
    limit: int | None
    num_fewshot: int
    batch_size: int


class ConvertJob(WorkerConfig):
    """Dequantize the GGUF file at `gguf` into a safetensors model directory `out` (tasks/workers/gguf.py)."""

    gguf: str
    out: str


class EvaluateJob(WorkerConfig):
    """Answer and score the evaluation prompts with the tuned and the base model (tasks/workers/evaluate.py)."""

    model_path: str  # the base model
    tuned: Weights
    trust_remote_code: bool
    compute_type: str
    dataset_dir: str  # the tokenized set: its val/ split gives the validation loss
    tokenized_digest: str
    sets: list[EvalSet]
    preferences: list[PreferencePair] = Field(default_factory=list)  # evaluate.preferences, read
    benchmarks: BenchmarkJob | None
    template_vars: dict[str, str]
    max_new_tokens: int
    compare_base: bool
    batch_size: int
    output_dir: str


class ExportJob(WorkerConfig):
    """Merge the trained weights into one model, check its logits, save shards (tasks/workers/export.py)."""

    model_path: str  # the base model: its tokenizer and generation config
    weights: Weights
    trust_remote_code: bool
    max_shard_size: str
    logits_rtol: float
    formats: list[Literal["safetensors", "gguf"]]
    gguf_type: str
    gguf_name: str  # the GGUF file's name without its type: the spec's name
    # a qlora adapter: the base as it trained on, to check the export against; and how far it may be
    quantized_base: QuantizedBase | None = None
    quantized_kl_ratio: float
    output_dir: str


class TemplateJob(WorkerConfig):
    """Read the named datasets, template each row, shuffle, split; write train/ and val/ under `out`."""

    loads_model_libraries: ClassVar[bool] = False  # datasets alone: a cold start is quicker than the wait
    job: Literal["template"] = "template"
    names: list[str]
    registry: str | None
    kind: str
    template_vars: dict[str, str]
    max_samples: int | None
    shuffle: bool
    seed: int
    val_size: float
    preview_rows: int
    on_bad_row: Literal["error", "skip"]
    num_proc: int
    scratch_dir: str
    out: str


class TokenizeJob(WorkerConfig):
    """Tokenize the templated train/ and val/ with the model's chat template; write them under `out`."""

    job: Literal["tokenize"] = "tokenize"
    templated: str
    model_path: str
    trust_remote_code: bool
    kind: str
    cutoff_len: int
    train_on_prompt: bool
    num_proc: int
    scratch_dir: str
    out: str


# the data worker does either job; the `job` field says which
DataJob = Annotated[TemplateJob | TokenizeJob, Field(discriminator="job")]


class TrainJob(TrainSpec):
    """Train one stage (tasks/workers/train.py for pt and sft, tasks/workers/trl.py for the others).

    The stage's train section as the spec gives it, and what the stage task resolved for it.
    """

    start: Weights  # the model the stage continues
    tokenizer_path: str
    dataset_dir: str  # the tokenized set: train/ and val/
    cutoff_len: int
    pad_token_id: int
    output_dir: str
    trust_remote_code: bool = False
    reward_model_dir: str | None = None  # ppo: the rm stage's scoring model
    # distributed: deepspeed: the deepspeed_config file's settings as the task read them (DeepSpeed's own mapping)
    deepspeed_resolved: dict[str, Any] | None = None
    # pt/sft: split each batch into at least this many micro-batches (the retry of a step that ran out of memory)
    least_micro_batch_split: int = Field(1, ge=1)


class BenchTrlJob(TrainJob):
    """make bench: the same training through TRL's SFTTrainer (tasks/tools/bench_train.py)."""

    trl_max_steps: int = -1


class TrainingNotice(WorkerConfig):
    """What node 0 of a multi-node train stage announces in the shared workspace, for the other nodes."""

    worker_config: str  # the TrainJob file every node's workers read
    num_processes: int
    nnodes: int
    rendezvous: str

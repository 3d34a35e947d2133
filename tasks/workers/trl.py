"""The training child process for rm, dpo, orpo, simpo, kto and ppo: `python -m tasks.workers.trl CONFIG`.

Launched by the train task (tasks/stages/train.py) like tasks/workers/train.py, with the same events
(start, log, checkpoint, resumed, done) and the same outputs (`adapter/` or `model/`,
`loss_history.jsonl`, `loss_curve.png`), but the optimization is TRL's:

    rm     RewardTrainer on chosen/rejected pairs; also writes `reward_model/` (merged, for ppo)
           and scores pairwise accuracy on the validation pairs
    dpo    DPOTrainer (sigmoid loss, plus an SFT term when preference.ftx > 0); the reference
           model is the start model (with LoRA: the same weights, adapter switched off)
    orpo   ORPOTrainer (reference-free; odds-ratio term weighted by beta)
    simpo  CPOTrainer with loss_type=simpo and cpo_alpha=0 (reference-free, length-normalized)
    kto    KTOTrainer on answers labelled good or bad
    ppo    TRL 1.x has no PPOTrainer: GRPOTrainer (or RLOOTrainer) optimizes the PPO-style clipped
           surrogate (clip range epsilon, ppo_epochs passes per batch, KL penalty to the start
           policy) with the rm stage's reward model as the reward function

Checkpoints are TRL's (`checkpoints/checkpoint-N`); a restarted attempt resumes from the newest complete one.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from tasks.components.fault_injection import Faults
from tasks.components.finetuning_methods import quantized_modules, trainable_model
from tasks.components.modeling import compute_setup, load_model
from tasks.components.training_outputs import CHECKPOINTS, finish_training, newest_complete_checkpoint
from tasks.contracts.child_process import WorkerError, emit, worker_entry
from tasks.contracts.spec_sections import ADAPTER_METHODS
from tasks.contracts.worker_configs import TrainJob
from tasks.contracts.worker_events import Checkpointed, Resumed, StepLogged, TrainingMetrics, TrainingStarted
from tasks.dataset.jsonl import read_jsonl, write_jsonl


def training_args(config: TrainJob, setup, out: Path) -> dict[str, Any]:
    """The TrainingArguments every TRL config shares, from the spec's train section."""
    return {
        "output_dir": str(out / CHECKPOINTS),
        "per_device_train_batch_size": config.batch_size,
        "per_device_eval_batch_size": config.batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "learning_rate": config.learning_rate,
        "num_train_epochs": config.num_epochs,
        "lr_scheduler_type": config.lr_scheduler,
        "warmup_steps": config.warmup_ratio,  # a float below 1 is a fraction of the steps
        "weight_decay": config.weight_decay,
        "max_grad_norm": config.max_grad_norm,
        "logging_steps": config.logging_steps,
        "save_steps": config.save_steps,
        "save_total_limit": config.save_total_limit,
        "seed": config.seed,
        "bf16": setup.name == "bf16",
        "fp16": setup.name == "fp16",
        "use_cpu": setup.device.type == "cpu",
        "gradient_checkpointing": False,  # TRL's default is on; these models fit without it
        "report_to": "none",  # the train task logs to MLflow from our events
        "eval_strategy": "no",
        "disable_tqdm": True,
    }


def build_trainer(config: TrainJob, model, tokenizer, train, setup, out: Path):
    """The TRL trainer for the stage, configured from the spec."""
    stage, common = config.stage, training_args(config, setup, out)
    preference, cutoff = config.preference, config.cutoff_len
    if stage == "rm":
        from trl import RewardConfig, RewardTrainer

        args = RewardConfig(**common, max_length=cutoff)
        return RewardTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    if stage == "dpo":
        from trl import DPOConfig, DPOTrainer

        losses = {"loss_type": ["sigmoid"]}
        if preference.ftx > 0:
            losses = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, preference.ftx]}
        args = DPOConfig(**common, max_length=cutoff, beta=preference.beta, **losses)
        return DPOTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    if stage == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        args = ORPOConfig(**common, max_length=cutoff, beta=preference.beta)
        return ORPOTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    if stage == "simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        args = CPOConfig(
            **common,
            max_length=cutoff,
            loss_type="simpo",
            cpo_alpha=0.0,
            beta=preference.beta,
            simpo_gamma=preference.simpo_gamma,
        )
        return CPOTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    if stage == "kto":
        from trl import KTOConfig, KTOTrainer

        args = KTOConfig(**common, max_length=cutoff, beta=preference.beta)
        return KTOTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    if stage == "ppo":
        return online_rl_trainer(config, model, tokenizer, train, setup, common)
    raise WorkerError(f"train.stage: {stage!r} is not trained by TRL here")


def online_rl_trainer(config: TrainJob, model, tokenizer, train, setup, common: dict[str, Any]):
    """GRPO or RLOO with the PPO-style clipped objective, scored by the rm stage's reward model."""
    ppo = config.ppo
    reward_model = load_model(
        config.reward_model_dir, device=setup.device, model_class="AutoModelForSequenceClassification"
    ).eval()
    group = ppo.num_generations
    # TRL counts completions per device; a batch holds whole groups of answers to one prompt
    common = {**common, "per_device_train_batch_size": group * max(1, config.batch_size // group)}
    settings = {
        "num_generations": group,
        "max_completion_length": ppo.max_new_tokens,
        "temperature": ppo.temperature,
        "epsilon": ppo.clip_range,
        "num_iterations": ppo.ppo_epochs,
        "beta": ppo.kl_coef,
    }
    if ppo.algorithm == "rloo":
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer
    else:
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer
    return Trainer(
        model=model,
        reward_funcs=reward_model,
        args=Config(**common, **settings),
        train_dataset=train,
        processing_class=tokenizer,
        reward_processing_classes=tokenizer,
    )


@torch.no_grad()
def pairwise_accuracy(model, tokenizer, pairs, device, batch_size: int = 8) -> float | None:
    """Fraction of pairs whose chosen answer the reward model scores above the rejected one."""
    if len(pairs) == 0:
        return None
    model.eval()
    tokenizer.padding_side = "right"
    wins = 0
    for start in range(0, len(pairs), batch_size):
        rows = pairs[start : start + batch_size]
        scores = []
        for answer in ("chosen", "rejected"):
            texts = [p + a for p, a in zip(rows["prompt"], rows[answer], strict=True)]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            scores.append(model(**batch).logits[:, 0].float())
        wins += int((scores[0] > scores[1]).sum())
    return wins / len(pairs)


HISTORY = "loss_history.jsonl"  # written last into a checkpoint: its presence marks the save complete


def last_complete_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint whose save finished.

    transformers writes a checkpoint in place (no rename at the end), trainer_state.json after
    the weights, optimizer and RNG state; this worker's on_save then adds the loss history,
    atomically. A worker killed during a save leaves a checkpoint without them.
    """
    return newest_complete_checkpoint(root, "trainer_state.json", HISTORY)


def event_callback(history: list[dict[str, Any]], start: dict[str, Any], resumed: bool):
    """A transformers callback that turns the trainer's logs into the worker's events.

    The loss history so far is saved into each checkpoint, so a resumed run's curve is whole.
    """
    from transformers import TrainerCallback

    faults = Faults.from_environment()  # for tests
    kill_at = faults.kill_at_step
    kill_in_save = 0 if resumed else faults.kill_in_save_at_step  # the first attempt only

    class Events(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            emit(TrainingStarted(total_steps=state.max_steps, first_step=state.global_step, **start))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 3)}
            record.update({k: float(v) for k, v in logs.items() if isinstance(v, int | float) and math.isfinite(v)})
            history.append(record)
            emit(StepLogged(step=state.global_step, metrics={k: v for k, v in record.items() if k != "step"}))

        def on_save(self, args, state, control, **kwargs):
            saved = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if kill_in_save and state.global_step == kill_in_save:
                os.kill(os.getpid(), 9)
            write_jsonl(saved / f"{HISTORY}.partial", history)
            os.replace(saved / f"{HISTORY}.partial", saved / HISTORY)
            emit(Checkpointed(step=state.global_step))
            if kill_at and state.global_step == kill_at:  # fault injection: die right after this checkpoint
                os.kill(os.getpid(), 9)

        def on_step_end(self, args, state, control, **kwargs):
            if kill_at and state.global_step == kill_at:
                control.should_save = (
                    True  # so the injected fault comes after a checkpoint, as in tasks/workers/train.py
                )

    return Events()


def train(config: TrainJob) -> None:
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    out = Path(config.output_dir)
    setup = compute_setup(config.compute_type)
    torch.manual_seed(config.seed)
    stage, method = config.stage, config.finetuning_type
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_set = load_from_disk(str(Path(config.dataset_dir) / "train"))
    val_set = load_from_disk(str(Path(config.dataset_dir) / "val"))

    model = trainable_model(config, setup.device, reward_head=stage == "rm")
    start = {
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in model.parameters()),
        "quantized_modules": quantized_modules(model),
        "examples": len(train_set),
        "compute_type": setup.name,
        "device": str(setup.device),
    }
    history: list[dict[str, Any]] = []
    trainer = build_trainer(config, model, tokenizer, train_set, setup, out)
    checkpoint = last_complete_checkpoint(out / CHECKPOINTS)
    trainer.add_callback(event_callback(history, start, resumed=checkpoint is not None))
    if checkpoint:
        emit(Resumed(step=int(checkpoint.name.split("-")[1]), checkpoint=checkpoint.name))
        history += read_jsonl(checkpoint / HISTORY)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

    trained = trainer.model
    weights = out / ("adapter" if method in ADAPTER_METHODS else "model")
    trained.save_pretrained(weights, safe_serialization=True)
    metrics = TrainingMetrics()
    if stage == "rm":
        metrics = TrainingMetrics(
            val_pairwise_accuracy=pairwise_accuracy(trained, tokenizer, val_set, setup.device),
            train_pairwise_accuracy=pairwise_accuracy(trained, tokenizer, train_set, setup.device),
        )
        merged = trained.merge_and_unload() if method in ADAPTER_METHODS else trained
        merged.save_pretrained(out / "reward_model", safe_serialization=True)
        tokenizer.save_pretrained(out / "reward_model")
    finish_training(config, history, trainer.state.global_step, metrics)


if __name__ == "__main__":
    worker_entry(train, TrainJob)

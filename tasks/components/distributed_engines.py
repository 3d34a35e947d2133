"""How the pt/sft worker's processes share a training step: one process, DDP, FSDP2 or DeepSpeed ZeRO.

The engines are the libraries' own: torch's DistributedDataParallel, torch's FSDP2
(`fully_shard`, the sharding accelerate's FSDP plugin also calls) and `deepspeed.initialize`.
This module gives the training loop (tasks/workers/train.py) one interface over them: the
loss of a micro-batch, backward, the optimizer step, and the checkpoint state each keeps.

- one process and DDP (`Engine`): every process holds the whole model and optimizer state;
  process 0 writes them.
- FSDP2 (`FsdpEngine`): each decoder layer's weights, gradients and optimizer state are
  split across the processes; every process writes its part of a checkpoint (torch
  distributed checkpoint), and the final weights are gathered to process 0.
- DeepSpeed (`DeepSpeedEngine`): ZeRO stage 1, 2 or 3 as its JSON config says (examples in
  deployments/deepspeed/); checkpoints are DeepSpeed's own, one part per process.

The loss the loop hands over is already normalised over the whole optimizer step (tokens
of every micro-batch on every process) and multiplied by the world size, because each
engine averages gradients over processes.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tasks.components.modeling import ComputeSetup, causal_lm, supervised_loss
from tasks.components.training_outputs import read_checkpoint_file
from tasks.contracts.child_process import WorkerError
from tasks.contracts.spec_sections import ADAPTER_METHODS
from tasks.contracts.worker_configs import TrainJob


def fused_optimizer(config: TrainJob, setup: ComputeSetup) -> bool:
    """train.fused_optimizer, or what its default (None) means here: on with CUDA."""
    return config.fused_optimizer if config.fused_optimizer is not None else setup.device.type == "cuda"


class LabelOnlyLoss(torch.nn.Module):
    """The model with `supervised_loss` as its forward, so that the engine wraps the call that trains."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels, position_ids=None) -> torch.Tensor:
        return supervised_loss(self.model, input_ids, None, labels, position_ids)[0]


def start_process_group(cuda: bool, distributed: str = "ddp") -> tuple[int, int]:
    """Rank and world size; under torchrun, join its process group (NCCL on GPUs, gloo on CPU).

    One process under torchrun joins a group of one when `distributed` is fsdp or deepspeed, so
    that the engine it names runs (FSDP2 and ZeRO on one GPU: `make gpu-check`); one process
    otherwise trains alone, as it would without torchrun.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and (distributed == "ddp" or "TORCHELASTIC_RUN_ID" not in os.environ):
        return 0, 1
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), world


def all_processes_sum(value: float, device: torch.device) -> float:
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total)


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def save_weights(model: torch.nn.Module, directory: Path, finetuning_type: str, state_dict=None) -> None:
    """The adapter (LoRA) or the whole model, as safetensors; `state_dict`: gathered weights to write."""
    target = model if finetuning_type in ADAPTER_METHODS else causal_lm(model)
    extra = {} if state_dict is None else {"state_dict": state_dict}
    target.save_pretrained(directory, safe_serialization=True, **extra)


def load_weights(model: torch.nn.Module, directory: Path, finetuning_type: str) -> None:
    if finetuning_type in ADAPTER_METHODS:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(directory / "adapter_model.safetensors"))
    else:
        from transformers import AutoModelForCausalLM

        model.load_state_dict(AutoModelForCausalLM.from_pretrained(directory).state_dict())


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    layers = getattr(getattr(causal_lm(model), "model", None), "layers", None)
    return layers if isinstance(layers, torch.nn.ModuleList) else None


class Engine:
    """One process, or DDP over several: every process holds the whole model and optimizer state."""

    # every process holds the same weights, so their digests must agree at the end
    replicated = True

    def __init__(self, model: torch.nn.Module, config: TrainJob, setup: ComputeSetup, world: int) -> None:
        self.model, self.config, self.world = model, config, world
        self.kind = {FsdpEngine: "fsdp", DeepSpeedEngine: "deepspeed"}.get(type(self), "ddp" if world > 1 else "single")
        self.adapter = config.finetuning_type in ADAPTER_METHODS
        self.module: torch.nn.Module = self.wrap(LabelOnlyLoss(model), setup)
        self.params = trainable_parameters(model)
        self.optimizer = self.make_optimizer(setup)
        self.scaler = torch.amp.GradScaler("cuda") if setup.autocast_dtype == torch.float16 else None

    def wrap(self, module: torch.nn.Module, setup: ComputeSetup) -> torch.nn.Module:
        if self.world == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module)

    def make_optimizer(self, setup: ComputeSetup) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.params,
            lr=self.config.learning_rate,
            weight_decay=self.config.weight_decay,
            fused=fused_optimizer(self.config, setup) or None,
        )

    @property
    def schedulable_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer whose learning rate the scheduler sets."""
        return self.optimizer

    def loss(self, ids: torch.Tensor, target: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        return self.module(ids, target, positions)

    def micro_batch(self, last: bool):
        """Context for one micro-batch's forward and backward: gradients are synchronised on the last."""
        return nullcontext() if last or self.world == 1 else self.module.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> float:
        """Clip, update and clear the gradients; the gradient norm before clipping."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm or float("inf"))
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def save_state(self, directory: Path, rank: int) -> None:
        """Weights and optimizer state into a checkpoint directory (every process calls it)."""
        if rank == 0:
            save_weights(self.model, directory / "weights", self.config.finetuning_type)
            torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")

    def load_state(self, directory: Path) -> None:
        load_weights(self.model, directory / "weights", self.config.finetuning_type)
        self.optimizer.load_state_dict(read_checkpoint_file(directory / "optimizer.pt"))

    def save_final(self, directory: Path, rank: int) -> None:
        """The trained adapter or model (every process calls it; process 0 writes)."""
        if rank == 0:
            save_weights(self.model, directory, self.config.finetuning_type)

    def digest(self) -> str:
        """A fingerprint of this process's trainable weights."""
        digest = hashlib.sha256()
        for p in self.params:
            digest.update(p.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]


class FsdpEngine(Engine):
    """FSDP2: each decoder layer is one shard group; the rest (embeddings, norm, head) another."""

    replicated = False

    def wrap(self, module: torch.nn.Module, setup: ComputeSetup) -> torch.nn.Module:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if setup.autocast_dtype == torch.float16:
            raise WorkerError("train.distributed: fsdp trains in bf16 or fp32; set train.compute_type to bf16 or fp32")
        # bf16: weights are gathered and computed in bf16, gradients reduced in fp32
        policy = MixedPrecisionPolicy(
            param_dtype=setup.autocast_dtype, reduce_dtype=torch.float32 if setup.autocast_dtype else None
        )
        for layer in decoder_layers(self.model) or []:
            fully_shard(layer, mp_policy=policy)
        return fully_shard(module, mp_policy=policy)

    def micro_batch(self, last: bool):
        self.module.set_requires_gradient_sync(last)
        return nullcontext()

    def _options(self, **kwargs):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        # a LoRA run's frozen base is the start model, already on disk: checkpoints leave it out
        return StateDictOptions(ignore_frozen_params=self.adapter, **kwargs)

    def save_state(self, directory: Path, rank: int) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(self.module, self.optimizer, options=self._options())
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=directory / "sharded")

    def load_state(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optimizer_state = get_state_dict(self.module, self.optimizer, options=self._options())
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=directory / "sharded")
        set_state_dict(
            self.module,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=self._options(strict=False),
        )

    def save_final(self, directory: Path, rank: int) -> None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        gathered = get_model_state_dict(self.module, options=self._options(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            # names under LabelOnlyLoss start with its attribute, "model."
            weights = {name.removeprefix("model."): tensor for name, tensor in gathered.items()}
            save_weights(self.model, directory, self.config.finetuning_type, state_dict=weights)


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO over the processes, with the settings of `deepspeed_settings(config, setup, world)`."""

    def wrap(self, module: torch.nn.Module, setup: ComputeSetup) -> torch.nn.Module:
        return module  # deepspeed.initialize wraps it with the optimizer, in make_optimizer

    def make_optimizer(self, setup: ComputeSetup) -> torch.optim.Optimizer:
        # DeepSpeed picks its device backend on import; without CUDA it needs telling
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if setup.device.type == "cuda" else "cpu")
        import deepspeed

        if setup.device.type == "cpu":
            skip_shared_memory_all_reduce()
        self.settings = deepspeed_settings(self.config, setup, self.world)
        self.stage = self.settings.get("zero_optimization", {}).get("stage", 0)
        self.replicated = self.stage < 3
        self.base_optimizer = super().make_optimizer(setup)
        self.module, optimizer, _, _ = deepspeed.initialize(
            model=self.module, optimizer=self.base_optimizer, config=self.settings
        )
        return optimizer

    @property
    def schedulable_optimizer(self) -> torch.optim.Optimizer:
        return self.base_optimizer  # ZeRO's optimizer shares its parameter groups

    def micro_batch(self, last: bool):
        self.module.set_gradient_accumulation_boundary(last)
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.module.backward(loss, scale_wrt_gas=False)  # the loop's loss is already per step

    def step(self) -> float:
        self.module.step()
        return float(self.module.get_global_grad_norm() or 0.0)

    def save_state(self, directory: Path, rank: int) -> None:
        self.module.save_checkpoint(str(directory / "deepspeed"), tag="state", exclude_frozen_parameters=self.adapter)

    def load_state(self, directory: Path) -> None:
        path, _ = self.module.load_checkpoint(
            str(directory / "deepspeed"), tag="state", load_module_strict=not self.adapter
        )
        if path is None:
            raise WorkerError(f"{directory}: DeepSpeed could not read this checkpoint")

    def save_final(self, directory: Path, rank: int) -> None:
        import deepspeed

        # ZeRO-3 splits the weights themselves: gather them for process 0 to write
        whole = deepspeed.zero.GatheredParameters(list(self.model.parameters())) if self.stage == 3 else nullcontext()
        with whole:
            if rank == 0:
                save_weights(self.model, directory, self.config.finetuning_type)


def skip_shared_memory_all_reduce() -> None:
    """Keep DeepSpeed from compiling its shared-memory all-reduce on a CPU.

    On its CPU accelerator DeepSpeed builds that op (C++, with the machine's compiler: about two
    minutes on 2 cores, once per machine) when it sets up communication, but only tensor-parallel
    inference calls it; ZeRO's collectives go through torch.distributed (gloo) either way. Its
    list of compatible ops is read for nothing else, so it is set before DeepSpeed first reads it
    (which also skips probing every other op with the compiler).
    """
    import deepspeed.ops

    if "__compatible_ops__" not in vars(deepspeed.ops):  # not probed yet: nothing built from it
        deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}


ENGINES = {"ddp": Engine, "fsdp": FsdpEngine, "deepspeed": DeepSpeedEngine}


def make_engine(model: torch.nn.Module, config: TrainJob, setup: ComputeSetup, world: int) -> Engine:
    kind = config.distributed if dist.is_initialized() else "ddp"  # one process alone: no engine to share with
    return ENGINES[kind](model, config, setup, world)


def deepspeed_settings(config: TrainJob, setup: ComputeSetup, world: int) -> dict[str, Any]:
    """The DeepSpeed config: the file's settings (default ZeRO-2) with what the spec sets filled in."""
    if setup.autocast_dtype == torch.float16:
        raise WorkerError("train.distributed: deepspeed trains in bf16 or fp32; set train.compute_type to bf16 or fp32")
    settings = dict(config.deepspeed_resolved or {"zero_optimization": {"stage": 2}})
    accumulation = config.gradient_accumulation_steps
    settings.update(
        {
            "train_micro_batch_size_per_gpu": config.batch_size,
            "gradient_accumulation_steps": accumulation,
            "train_batch_size": config.batch_size * accumulation * world,
            "gradient_clipping": config.max_grad_norm,
            "bf16": {"enabled": setup.autocast_dtype == torch.bfloat16},
            "zero_allow_untested_optimizer": True,  # torch's AdamW, with the spec's learning rate
            "steps_per_print": 2**31 - 1,  # the worker reports progress itself
        }
    )
    return settings

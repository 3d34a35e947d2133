"""The finetuning methods: which weights of a model train (torch code; used by the training workers).

    full    every weight
    freeze  the last (or first) N decoder layers, optionally only some of their modules, plus
            any named extra modules; everything else frozen
    lora    low-rank adapters on a frozen base (DoRA and rsLoRA switches)
    qlora   the same adapters on a base loaded in 4-bit NF4 or 8-bit by bitsandbytes (GPU or CPU)

`trainable_model(config, device)` loads the model a stage starts from (its `start` weights:
a model directory and the adapters of earlier stages, merged in) and applies the method.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from tasks.components.modeling import load_model, lora_targets
from tasks.contracts.child_process import WorkerError
from tasks.contracts.spec_sections import FreezeSpec, LoraSpec
from tasks.contracts.worker_configs import MERGED_START, QuantizedBase, TrainJob, Weights

LAYER = re.compile(r"\.layers\.(\d+)\.")


def freeze_weights(model: torch.nn.Module, freeze: FreezeSpec) -> None:
    """Leave only the chosen layers (and extra modules) trainable; a name that matches nothing is an error."""
    count = model.config.get_text_config().num_hidden_layers
    wanted = freeze.trainable_layers
    if abs(wanted) > count:
        raise WorkerError(f"train.freeze.trainable_layers: {wanted} but the model has {count} layers")
    layers = set(range(count - wanted, count)) if wanted > 0 else set(range(-wanted))
    modules = freeze.trainable_modules
    layer_modules = set()
    for name, parameter in model.named_parameters():
        layer = LAYER.search(name)
        inside = name[layer.end() :].split(".") if layer else []
        layer_modules.update(inside[:-1])
        chosen = layer is not None and int(layer.group(1)) in layers
        parameter.requires_grad_(chosen and (modules == "all" or any(m in inside for m in modules)))
    if modules != "all" and not set(modules) & layer_modules:
        raise WorkerError(
            f"train.freeze.trainable_modules: {', '.join(modules)} not found in a layer; "
            f"a layer holds: {', '.join(sorted(layer_modules))}"
        )
    names = {name.rsplit(".", 1)[-1]: module for name, module in model.named_modules() if name}
    for extra in freeze.extra_modules:
        if extra not in names:
            top = sorted({n.split(".")[-1] for n, m in model.named_modules() if n and not LAYER.search(n + ".")})
            raise WorkerError(f"train.freeze.extra_modules: {extra!r} not found; modules: {', '.join(top)}")
        names[extra].requires_grad_(True)


def merged_start(start: Weights, out: Path, trust_remote_code: bool) -> str:
    """A directory with the start model's adapters merged in (kept in the stage's output)."""
    if not start.adapters:
        return start.model_dir
    directory = out / MERGED_START
    if not (directory / "config.json").is_file():
        model = load_model(start.model_dir, start.adapters, merge_all=True, trust_remote_code=trust_remote_code)
        model.save_pretrained(directory, safe_serialization=True)
    return str(directory)


def quantization(lora: LoraSpec | QuantizedBase, device: torch.device) -> dict[str, Any]:
    """bitsandbytes' load settings, as a stage's train.lora asks (the export reads them back from the
    stage): on a GPU, bf16 compute; on a CPU (bitsandbytes 0.50 quantizes and trains there too),
    fp32 compute, which is what the CPU computes fastest."""
    from transformers import BitsAndBytesConfig

    if lora.quantization_bit == 8:
        quiet_int8_cast_notice()
    check_quantization(lora.quantization_bit, lora.quantization_type, lora.double_quantization, device)
    if lora.quantization_bit == 8:
        quantized = BitsAndBytesConfig(load_in_8bit=True)
    else:
        quantized = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=lora.quantization_type,
            bnb_4bit_use_double_quant=lora.double_quantization,
            bnb_4bit_compute_dtype=qlora_dtype(device),
        )
    place = {"": torch.cuda.current_device()} if device.type == "cuda" else "cpu"
    return {"quantization_config": quantized, "device_map": place}


INT8_CAST_NOTICE = "MatMul8bitLt: inputs will be cast"


def not_int8_cast_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(INT8_CAST_NOTICE)


def quiet_int8_cast_notice() -> None:
    """Drop bitsandbytes' "MatMul8bitLt: inputs will be cast from torch.float32 to float16" (a logging
    warning, not warnings.warn), logged for every 8-bit layer at every forward: casting is how its
    int8 matmul works, and nothing a user can change. Its other messages stay."""
    cast_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not_int8_cast_notice not in cast_logger.filters:
        cast_logger.addFilter(not_int8_cast_notice)


def check_quantization(bits: int, kind: str, double: bool, device: torch.device) -> None:
    """Quantize one small layer as the spec asks, forward and backward, on the training device: the
    installed bitsandbytes may lack a kind on a device (it has grown CPU support kind by kind), and
    a refusal here names the setting instead of failing inside the model's loading."""
    import bitsandbytes as bnb

    what = f"{bits}-bit" + (f" {kind}{' with double quantization' if double else ''}" if bits == 4 else "")
    try:
        weight = torch.randn(64, 64)
        if bits == 8:
            layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False)
            layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        else:
            layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=qlora_dtype(device), quant_type=kind,
                                      compress_statistics=double)  # fmt: skip
            layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=kind, compress_statistics=double)
        layer = layer.to(device)
        probe = torch.randn(2, 64, device=device, requires_grad=True)
        layer(probe.to(qlora_dtype(device))).float().sum().backward()
    except Exception as exc:  # whatever bitsandbytes raises for a kernel it does not have
        raise WorkerError(
            f"train.lora: bitsandbytes {bnb.__version__} cannot train on a {what} base on {device.type} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no message'}); "
            "choose another quantization_bit / quantization_type, or finetuning_type lora"
        ) from None


def qlora_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def quantized_modules(model: torch.nn.Module) -> int:
    """How many linear layers bitsandbytes holds in 4 or 8 bits (by class, so bitsandbytes is not imported;
    peft's LoRA wrappers around them share the class names, not the module)."""
    return sum(
        type(module).__module__.startswith("bitsandbytes") and type(module).__name__ in ("Linear4bit", "Linear8bitLt")
        for module in model.modules()
    )


def trainable_model(
    config: TrainJob,
    device: torch.device,
    reward_head: bool = False,
    attention: str | None = None,
    frozen_dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """The stage's start model with the finetuning method applied; `reward_head`: a scalar-score model.

    attention: the attn_implementation to load with (default: transformers' choice).
    frozen_dtype: lora only, the dtype of the frozen base (bf16 under bf16 autocast halves its
    memory and spares casting it every step; PEFT keeps the adapters in fp32).
    """
    method, start = config.finetuning_type, config.start
    remote_code = config.trust_remote_code
    extra: dict[str, Any] = {"num_labels": 1} if reward_head else {}
    if attention:
        extra["attn_implementation"] = attention
    model_class = "AutoModelForSequenceClassification" if reward_head else "AutoModelForCausalLM"
    model_dir, adapters = start.model_dir, start.adapters
    if method == "qlora" or reward_head:
        # a quantized load and a reward head both need the start model as one directory
        model_dir, adapters = merged_start(start, Path(config.output_dir), remote_code), []
    if method == "qlora":
        extra.update(quantization(config.lora, device))
    dtype = qlora_dtype(device) if method == "qlora" else frozen_dtype if method == "lora" else torch.float32
    model = load_model(model_dir, adapters, device, dtype, remote_code, True, model_class, **extra)
    if reward_head and model.config.pad_token_id is None:
        model.config.pad_token_id = config.pad_token_id
    if method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if method == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        lora = config.lora
        targets = lora_targets(model, lora.target_modules)
        peft_config = LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=[t for t in targets if t != "score"],
            use_dora=lora.use_dora,
            use_rslora=lora.use_rslora,
            task_type="SEQ_CLS" if reward_head else "CAUSAL_LM",
            modules_to_save=["score"] if reward_head else None,
        )
        model = get_peft_model(model, peft_config)
    elif method == "freeze":
        freeze_weights(model, config.freeze)
        if reward_head:
            model.score.requires_grad_(True)  # the new scoring head always learns
    return model

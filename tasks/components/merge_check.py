"""How far a merged model's logits are from the adapter model's, on the scale of the logits.

Merging LoRA adapters into the base weights changes the order of floating-point operations, so
the merged logits differ from the adapter model's by rounding. Rounding grows with the logits'
magnitude (fp32 keeps about 7 significant digits; a trained model's logits are in the tens), so
an absolute tolerance that holds for a barely-trained adapter fails on rounding alone once the
adapter has moved. Measured relative to the largest logit, rounding stays near 1e-6 whatever the
scale, while a wrong merge (an adapter left out, applied twice, scaled wrongly) moves the logits
by a share of the adapter's own effect. Only the unpadded positions count: at a left-padded
position the model attends to nothing real, and its logits there move by up to 7e-4 between two
correct copies of SmolLM2 (2e-5 to 9e-5 of the largest logit, varying from run to run with the
threads' summation order), against 3e-6 where there is text. Figures: docs/measured.md ("The
export's logits check").

A qlora adapter trained on a 4- or 8-bit base; the export puts it on the full-precision one.
Against the adapter on the quantized base no logit tolerance means anything: quantizing moves one
logit by 0.68 of the largest where there is text (NF4 on SmolLM2; int8 0.14), most of it in tokens
no one would pick. What a user notices is the next-token distribution where there is text, so that
check compares distributions at the unpadded positions (mean KL, top-1 agreement), and takes its
yardstick from the same prompts: how far quantizing moved the base itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LogitsGap:
    absolute: float  # the largest difference of one logit
    scale: float  # the largest |logit| of the reference
    relative: float  # absolute / scale


def logits_gap(reference: torch.Tensor, other: torch.Tensor, real: torch.Tensor) -> LogitsGap:
    """The largest logit difference where `real` (the attention mask) is set, and its share of the largest logit."""
    mask = real.bool()
    expected, got = reference[mask].float(), other[mask].float()
    absolute = (got - expected).abs().max().item()
    scale = max(expected.abs().max().item(), 1e-12)
    return LogitsGap(absolute, scale, absolute / scale)


def first_lora_delta(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.Tensor] | None:
    """The first LoRA layer's base layer and the weight change its active adapter makes
    (for a deliberately wrong merge: the measurements and the fault test add it a second time)."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer) and module.active_adapters:
            return module.get_base_layer(), module.get_delta_weight(module.active_adapters[0]).detach().clone()
    return None


# Below this many nats two models are the same model (a full-precision merge measures about 1e-11):
# a base that quantizing barely moved must not make rounding look like a large share of it.
KL_FLOOR = 1e-6


@dataclass(frozen=True)
class DistributionGap:
    kl: float  # mean KL(reference || other) over the unpadded positions, in nats
    top1: float  # share of those positions where both put the same token first


def distribution_gap(reference: torch.Tensor, other: torch.Tensor, real: torch.Tensor) -> DistributionGap:
    """How far `other`'s next-token distributions are from `reference`'s where `real` (the attention mask) is set."""
    mask = real.bool()
    expected = F.log_softmax(reference[mask].double(), dim=-1)
    got = F.log_softmax(other[mask].double(), dim=-1)
    kl = (expected.exp() * (expected - got)).sum(dim=-1).mean().item()
    top1 = (expected.argmax(dim=-1) == got.argmax(dim=-1)).double().mean().item()
    return DistributionGap(max(kl, 0.0), top1)


@dataclass(frozen=True)
class QuantizedCheck:
    """The export of a qlora adapter against the model as it trained (the adapter on the quantized base)."""

    export: DistributionGap  # the export from the adapter on the quantized base
    base: DistributionGap  # the full-precision base from the quantized base: quantization's own share

    @property
    def ratio(self) -> float:
        return self.export.kl / max(self.base.kl, KL_FLOOR)


def quantized_check(
    trained: torch.Tensor, exported: torch.Tensor, quantized_base: torch.Tensor, full_base: torch.Tensor, real
) -> QuantizedCheck:
    """Logits of the adapter on the quantized base and of the export; of the two bases; the attention mask."""
    return QuantizedCheck(distribution_gap(trained, exported, real), distribution_gap(quantized_base, full_base, real))

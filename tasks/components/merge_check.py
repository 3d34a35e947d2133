"""How far a merged model's logits are from the adapter model's, on the scale of the logits.

Merging LoRA adapters into the base weights changes the order of floating-point operations, so
the merged logits differ from the adapter model's by rounding. Rounding grows with the logits'
magnitude (fp32 keeps about 7 significant digits; a trained model's logits are in the tens), so
an absolute tolerance that holds for a barely-trained adapter fails on rounding alone once the
adapter has moved. Measured relative to the largest logit, rounding stays near 1e-6 whatever the
scale, while a wrong merge (an adapter left out, applied twice, scaled wrongly) moves the logits
by a share of the adapter's own effect. Figures: docs/measured.md ("The export's logits check").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LogitsGap:
    absolute: float  # the largest difference of one logit
    scale: float  # the largest |logit| of the reference
    relative: float  # absolute / scale


def logits_gap(reference: torch.Tensor, other: torch.Tensor) -> LogitsGap:
    absolute = (other.float() - reference.float()).abs().max().item()
    scale = max(reference.float().abs().max().item(), 1e-12)
    return LogitsGap(absolute, scale, absolute / scale)


def first_lora_delta(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.Tensor] | None:
    """The first LoRA layer's base layer and the weight change its active adapter makes
    (for a deliberately wrong merge: the measurements and the fault test add it a second time)."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer) and module.active_adapters:
            return module.get_base_layer(), module.get_delta_weight(module.active_adapters[0]).detach().clone()
    return None

"""Measure the export's logits checks: how far a correct merge is from the adapter model, and how
far wrong merges are, on trained and random adapters; with --quantized, the qlora check's figures.

    python -m tasks.tools.merge_check_margins --adapter MODEL_DIR ADAPTER_DIR [--adapter ...] \
        [--random-rank 8 --random-rank 64] [--quantized nf4 --quantized fp4 --quantized int8]

--adapter: a trained LoRA adapter (a train stage's `adapter/`) on the model it was trained from.
--random-rank: LoRA adapters with random A and B (PEFT's init_lora_weights=False) on the packaged
SmolLM2-135M-Instruct, a stress case: their effect on the logits is far larger than training's.
--quantized: also put each adapter on its base quantized that way (4-bit nf4 with double
quantization, 4-bit fp4, 8-bit) and print the qlora check's figures: the export's and the
full-precision base's mean KL from the quantized side and their ratio (what export.quantized_kl_ratio
bounds), for the correct merge and for the adapter left out.
Gaps are at the unpadded positions, as the export checks them; "+padding" counts the padded ones too
(what the check did before: rounding there is several times larger). Prints one row per adapter (and
kind); docs/measured.md records the figures and the defaults they chose.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from tasks.components.merge_check import first_lora_delta, logits_gap, quantized_check
from tasks.components.modeling import load_model
from tasks.contracts.worker_configs import QuantizedBase
from tasks.workers.export import as_trained, check_batch, logits_for

KINDS = {
    "nf4": dict(quantization_bit=4, quantization_type="nf4", double_quantization=True),
    "fp4": dict(quantization_bit=4, quantization_type="fp4", double_quantization=False),
    "int8": dict(quantization_bit=8, quantization_type="nf4", double_quantization=False),
}


def margins(model, batch) -> dict[str, float]:
    """Relative gaps: correct merge, adapter left out, one module's change applied twice; and the logits
    the quantized check compares with (the full-precision base, the merged model)."""
    real = batch["attention_mask"]
    reference = logits_for(model, batch)
    with model.disable_adapter():
        base = logits_for(model, batch)
    layer, delta = first_lora_delta(model)
    merged = model.merge_and_unload()
    exported = logits_for(merged, batch)
    correct = logits_gap(reference, exported, real)
    with torch.no_grad():
        layer.weight += delta
    twice = logits_gap(reference, logits_for(merged, batch), real)
    return {
        "scale": correct.scale,
        "correct_abs": correct.absolute,
        "correct_rel": correct.relative,
        "padded_rel": (exported - reference).abs().max().item() / correct.scale,
        "left_out_rel": logits_gap(reference, base, real).relative,
        "one_twice_rel": twice.relative,
        "base": base,
        "exported": exported,
    }


def quantized_rows(model_dir, adapter, batch, figures, kinds) -> list[str]:
    """The qlora check on each kind of quantized base: the export, and the adapter left out."""
    rows = []
    for kind in kinds:
        trained, quantized_base = as_trained(QuantizedBase(model_dir=str(model_dir), **KINDS[kind]), adapter, batch)
        mask = batch["attention_mask"]
        export = quantized_check(trained, figures["exported"], quantized_base, figures["base"], mask)
        left_out = quantized_check(trained, figures["base"], quantized_base, figures["base"], mask)
        rows.append(
            f"  {kind:<5} base KL {export.base.kl:.3g} (top-1 {export.base.top1:.2f})  export KL "
            f"{export.export.kl:.3g} (top-1 {export.export.top1:.2f}) ratio {export.ratio:.2f}  "
            f"adapter left out: KL {left_out.export.kl:.3g} ratio {left_out.ratio:.2f}"
        )
    return rows


def main() -> None:
    import tempfile

    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", nargs=2, action="append", default=[], metavar=("MODEL_DIR", "ADAPTER_DIR"))
    parser.add_argument("--random-rank", type=int, action="append", default=[])
    parser.add_argument("--quantized", choices=sorted(KINDS), action="append", default=[])
    args = parser.parse_args()
    scratch = tempfile.mkdtemp(prefix="tunefactory-margins-")
    cases = [(f"trained {adapter}", model_dir, adapter) for model_dir, adapter in args.adapter]
    if args.random_rank:
        smollm2 = smollm2_directory(Path(scratch) / "smollm2")
        cases += [(f"random rank {rank} on SmolLM2", smollm2, rank) for rank in args.random_rank]
    columns = ("max|logit|", "merge abs", "merge rel", "+padding", "left out", "1 twice")
    print(f"{'adapter':<60} " + " ".join(f"{c:>10}" for c in columns))
    for name, model_dir, adapter in cases:
        if isinstance(adapter, int):  # a random adapter, saved (before margins merges it) for the quantized base
            model, adapter = random_lora(model_dir, adapter), Path(scratch) / f"random-r{adapter}"
            model.save_pretrained(adapter)
        else:
            model = load_model(model_dir, [adapter]).eval()
        batch = check_batch(AutoTokenizer.from_pretrained(model_dir))
        m = margins(model, batch)
        print(
            f"{name[-60:]:<60} {m['scale']:>10.3g} {m['correct_abs']:>10.2e} {m['correct_rel']:>10.2e} "
            f"{m['padded_rel']:>10.2e} {m['left_out_rel']:>10.2e} {m['one_twice_rel']:>10.2e}"
        )
        if args.quantized:
            print("\n".join(quantized_rows(model_dir, str(adapter), batch, m, args.quantized)))


def random_lora(model_dir: Path, rank: int):
    """The model with random LoRA adapters of `rank` on every linear layer (seeded by the rank)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(rank)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(base, config).eval()


def smollm2_directory(directory: Path) -> Path:
    """The packaged SmolLM2-135M-Instruct as a model directory (bitsandbytes quantizes a directory's weights)."""
    from tasks.stages.materialize_model import packaged_gguf
    from tasks.workers.gguf import convert_gguf

    convert_gguf(packaged_gguf("packaged:smollm2-135m-instruct"), directory)
    return directory


if __name__ == "__main__":
    main()

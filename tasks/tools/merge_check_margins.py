"""Measure the export's logits check: how far a correct merge is from the adapter model, and how
far two wrong merges are, relative to the largest logit, on trained and random adapters.

    python -m tasks.tools.merge_check_margins --adapter MODEL_DIR ADAPTER_DIR [--adapter ...] \
        [--random-rank 8 --random-rank 64]

--adapter: a trained LoRA adapter (a train stage's `adapter/`) on the model it was trained from.
--random-rank: LoRA adapters with random A and B (PEFT's init_lora_weights=False) on the packaged
SmolLM2-135M-Instruct, a stress case: their effect on the logits is far larger than training's.
Prints one row per adapter; docs/measured.md records the figures and the default they chose.
"""

from __future__ import annotations

import argparse

import torch

from tasks.components.merge_check import first_lora_delta, logits_gap
from tasks.components.modeling import load_model
from tasks.workers.export import CHECK_PROMPTS, logits_for


def check_batch(tokenizer):
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in CHECK_PROMPTS
    ]
    tokenizer.padding_side = "left"
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def margins(model, batch) -> dict[str, float]:
    """Relative gaps: correct merge, adapter left out, one module's change applied twice."""
    reference = logits_for(model, batch)
    with model.disable_adapter():
        left_out = logits_gap(reference, logits_for(model, batch))
    layer, delta = first_lora_delta(model)
    merged = model.merge_and_unload()
    correct = logits_gap(reference, logits_for(merged, batch))
    with torch.no_grad():
        layer.weight += delta
    twice = logits_gap(reference, logits_for(merged, batch))
    return {
        "scale": correct.scale,
        "correct_abs": correct.absolute,
        "correct_rel": correct.relative,
        "left_out_rel": left_out.relative,
        "one_twice_rel": twice.relative,
    }


def main() -> None:
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", nargs=2, action="append", default=[], metavar=("MODEL_DIR", "ADAPTER_DIR"))
    parser.add_argument("--random-rank", type=int, action="append", default=[])
    args = parser.parse_args()
    rows = []
    for model_dir, adapter in args.adapter:
        model = load_model(model_dir, [adapter]).eval()
        rows.append((f"trained {adapter}", margins(model, check_batch(AutoTokenizer.from_pretrained(model_dir)))))
    if args.random_rank:
        from peft import LoraConfig, get_peft_model

        from tasks.stages.materialize_model import packaged_gguf

        gguf = packaged_gguf("packaged:smollm2-135m-instruct")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        for rank in args.random_rank:
            from transformers import AutoModelForCausalLM

            torch.manual_seed(rank)
            base = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False)
            rows.append(
                (f"random rank {rank} on SmolLM2", margins(get_peft_model(base, config).eval(), check_batch(tokenizer)))
            )
    print(f"{'adapter':<60} {'max|logit|':>10} {'merge abs':>10} {'merge rel':>10} {'left out':>10} {'1 twice':>10}")
    for name, m in rows:
        print(
            f"{name[-60:]:<60} {m['scale']:>10.3g} {m['correct_abs']:>10.2e} {m['correct_rel']:>10.2e} "
            f"{m['left_out_rel']:>10.2e} {m['one_twice_rel']:>10.2e}"
        )


if __name__ == "__main__":
    main()

"""The GGUF conversion child process: `python -m tasks.workers.gguf OUTPUT/convert_config.json`.

Launched by the materialize stage (tasks/stages/materialize_model.py) for a packaged GGUF base model,
so that torch is loaded in a worker, never in the flow process.
"""

from __future__ import annotations

from pathlib import Path

from tasks.components.gguf_check import alone
from tasks.contracts.child_process import worker_entry
from tasks.contracts.worker_configs import ConvertJob


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF into a plain model and save it as safetensors with its tokenizer.

    transformers' GGUF loader leaves a quantizer on the model that refuses saving and
    training, so the weights are copied into a clean model built from the same config.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    with alone(gguf) as directory:  # not mixed with the files beside it (an export's own)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def main(job: ConvertJob) -> None:
    convert_gguf(Path(job.gguf), Path(job.out))


if __name__ == "__main__":
    worker_entry(main, ConvertJob)

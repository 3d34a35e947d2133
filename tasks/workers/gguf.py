"""The GGUF conversion child process: `python -m tasks.workers.gguf OUTPUT/convert_config.json`.

Launched by the materialize stage (tasks/stages/materialize_model.py) for a GGUF base model (the
packaged one, or a `.gguf` path), so that torch is loaded in a worker, never in the flow process.
The stage has checked the file's header and the memory the conversion needs
(tasks/contracts/gguf_file.py).
"""

from __future__ import annotations

from pathlib import Path

from tasks.components.gguf_check import alone, read_once
from tasks.components.modeling import skip_unused_deepspeed_check
from tasks.contracts.child_process import WorkerError, worker_entry
from tasks.contracts.gguf_file import read_gguf_header
from tasks.contracts.packaged_models import ModelSourceError
from tasks.contracts.worker_configs import ConvertJob

# what transformers' GGUF readers raise on a file they cannot map onto a model (an architecture
# or tensor type they do not know, metadata a config needs and the file lacks)
LOADER_REFUSALS = (ValueError, KeyError, IndexError, NotImplementedError, OSError)


def load_dequantized(gguf: Path):
    """The tokenizer and the model transformers reads from `gguf`, every weight unpacked to float32.

    `dequantize=True`: no look-up of a matmul kernel that would keep weights packed (and cannot
    be saved). A tensor the model needs and the file lacks is refused: transformers would start
    it from random values.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    with alone(gguf) as directory, read_once():  # not mixed with the files beside it (an export's own)
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf.name)
            loaded, loading = AutoModelForCausalLM.from_pretrained(
                directory,
                gguf_file=gguf.name,
                dtype=torch.float32,
                quantization_config=GgufConfig(dequantize=True),
                output_loading_info=True,
            )
        except LOADER_REFUSALS as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise WorkerError(f"model.name_or_path: {gguf}: transformers cannot convert it: {reason}") from None
    if loading["missing_keys"]:
        missing = ", ".join(sorted(loading["missing_keys"])[:5])
        raise WorkerError(f"model.name_or_path: {gguf}: holds no tensor for {missing} (the model needs them)")
    return tokenizer, loaded


def plain_model(loaded):
    """`loaded` as a plain model that saves and trains: transformers' GGUF loader leaves a quantizer
    on it that refuses both. Built on the meta device and given the loaded tensors themselves
    (`assign=True`), so the weights are held once (a second float32 copy doubled the peak)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    return model


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF into a plain model and save it as safetensors with its tokenizer."""
    from transformers import GenerationConfig

    try:  # the stage checked it; the file may have changed since
        read_gguf_header(gguf)
    except ModelSourceError as exc:
        raise WorkerError(str(exc)) from None
    tokenizer, loaded = load_dequantized(gguf)
    model = plain_model(loaded)
    del loaded
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    skip_unused_deepspeed_check()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def main(job: ConvertJob) -> None:
    convert_gguf(Path(job.gguf), Path(job.out))


if __name__ == "__main__":
    worker_entry(main, ConvertJob)

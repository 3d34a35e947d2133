"""`tunefactory gguf MODEL --type q8_0`: one GGUF file of a model, for llama.cpp, Ollama, LM Studio.

MODEL is what `tunefactory api` takes (an export or adapter directory, a registry reference);
an adapter is merged onto its base first. The file is checked before it is put in place
(tasks/components/gguf_check.py).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tasks.components.gguf_check import write_checked_gguf
from tasks.components.gguf_writer import architecture, check_type


def export_gguf(reference: str, workspace: Path, gguf_type: str, target: Path | None) -> tuple[Path, float]:
    """Write MODEL as a checked GGUF file (and its Modelfile); returns the file and its logits gap."""
    from tasks.tools.api_server import merged_model, model_directories

    check_type(gguf_type, "--type")
    model_dir, adapter = model_directories(reference, workspace)
    with tempfile.TemporaryDirectory(prefix="tunefactory-gguf-") as scratch:
        if adapter is not None:
            model_dir = merged_model(model_dir, adapter, Path(scratch))
        architecture(model_dir)  # refused before anything is written
        target = target or Path(workspace) / "gguf" / f"{Path(reference).name.replace('@', '-')}-{gguf_type}.gguf"
        target.parent.mkdir(parents=True, exist_ok=True)
        gap = write_checked_gguf(model_dir, target, gguf_type)
    return target, gap

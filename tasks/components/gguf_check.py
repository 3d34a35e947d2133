"""A GGUF file that is only put in place once it is known to be the model: written under
`.partial`, loaded back by transformers (`gguf_file=`), its logits compared with the model's on
fixed prompts, renamed into place, and an Ollama `Modelfile` written beside it.

Used by `tunefactory gguf` (tasks/tools/gguf_export.py) and the export stage's worker
(`export.formats: [safetensors, gguf]`).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from tasks.components.gguf_writer import LOGITS_RTOL, GGUFError, write_gguf

CHECK_PROMPTS = ["Who are you?", "Write one sentence about the sea.", "1 + 1 ="]

# Ollama's Go template of a ChatML conversation (SmolLM2 and the project's chatml_tools use ChatML)
CHATML = """{{ if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""


@contextlib.contextmanager
def alone(gguf_file: Path):
    """A directory holding only a link to `gguf_file`, to load it from with `gguf_file=`.

    transformers also reads the config and tokenizer files beside a GGUF file and mixes them into
    what it loads from the file (next to an export it lost the chat template and the special
    tokens): what is read must be the file alone, as llama.cpp and Ollama read it.
    """
    with tempfile.TemporaryDirectory(prefix="tunefactory-gguf-") as scratch:
        (Path(scratch) / gguf_file.name).symlink_to(Path(gguf_file).resolve())
        yield Path(scratch)


def logits_gap(reference_dir: Path, gguf_file: Path) -> float:
    """Largest logit difference between the model and its GGUF on CHECK_PROMPTS, over the largest logit."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reference_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    batch = tokenizer(CHECK_PROMPTS, return_tensors="pt", padding=True)
    reference = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32).eval()
    with alone(gguf_file) as directory:
        written = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file.name, dtype=torch.float32)
    written.eval()
    with torch.no_grad():
        expected, got = reference(**batch).logits, written(**batch).logits
    return ((got - expected).abs().max() / expected.abs().max()).item()


def modelfile(gguf_file: Path, model_dir: Path) -> str:
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    template = config.get("chat_template") or ""
    template_file = model_dir / "chat_template.jinja"
    if not template and template_file.exists():
        template = template_file.read_text()
    lines = [f"FROM ./{gguf_file.name}"]
    if "<|im_start|>" in template:
        lines += [f'TEMPLATE """{CHATML}"""', 'PARAMETER stop "<|im_end|>"']
    # other templates: Ollama takes the chat template stored in the GGUF file itself
    return "\n".join(lines) + "\n"


def write_checked_gguf(model_dir: Path, target: Path, gguf_type: str) -> float:
    """Write `model_dir` to `target` (and `Modelfile` beside it) if its logits pass; returns the gap."""
    partial = target.with_name(target.name + ".partial")
    checked = target.with_name(f"{target.stem}.checking.gguf")  # transformers wants a .gguf name
    try:
        write_gguf(model_dir, partial, gguf_type)
        os.replace(partial, checked)
        gap = logits_gap(model_dir, checked)
        if gap > LOGITS_RTOL[gguf_type]:
            raise GGUFError(
                f"{target.name}: logits differ from the model's by {gap:.2e} of the largest logit "
                f"(more than {LOGITS_RTOL[gguf_type]:.0e} for {gguf_type}); nothing was written"
            )
        os.replace(checked, target)
        (target.parent / "Modelfile").write_text(modelfile(target, model_dir))
    finally:  # a refused or interrupted file is not left behind
        partial.unlink(missing_ok=True)
        checked.unlink(missing_ok=True)
    return gap

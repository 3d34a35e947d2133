"""A GGUF file that is only put in place once it is known to be the model: written under
`.partial`, loaded back by transformers (`gguf_file=`), its logits compared with the model's on
fixed prompts, renamed into place, and an Ollama `Modelfile` written beside it.

Used by `tunefactory gguf` (tasks/tools/gguf_export.py) and the export stage's worker
(`export.formats: [safetensors, gguf]`).
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from pathlib import Path

from tasks.components.chat_encoding import directory_chat_template
from tasks.components.gguf_writer import LOGITS_RTOL, GGUFError, write_gguf

CHECK_PROMPTS = ["Who are you?", "Write one sentence about the sea.", "1 + 1 ="]

# Ollama's Go template of a ChatML conversation (SmolLM2 and the project's chatml_tools use ChatML)
CHATML = """{{ if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""


def quick_reader_class():
    """gguf's `GGUFReader`, its header parsed faster: the same fields, parts and tensors (tests/test_gguf_input.py
    compares them), SmolLM2's in 1.3 s instead of 6.0 s.

    gguf reads every value through a slice of its `np.memmap`, whose `__getitem__` costs more than the
    slice itself, and an array (a vocabulary: 49,152 strings, their scores and types) element by element
    through the generic field parser. This reader slices a plain array view of the same map, and reads
    arrays of strings and numbers in one loop each, with the parts, indices and types gguf gives them.
    """
    import numpy as np
    from gguf import GGUFReader, GGUFValueType

    class QuickGGUFReader(GGUFReader):
        _sizes: dict = {}

        def _get(self, offset, dtype, count=1, override_order=None):
            plain = self.__dict__.get("_plain")
            if plain is None or plain.base is not self.data:
                plain = self._plain = self.data.view(np.ndarray)
            size = self._sizes.get(dtype) or self._sizes.setdefault(dtype, np.dtype(dtype).itemsize)
            count = int(count)
            found = plain[offset : offset + size * count].view(dtype=dtype)[:count]
            return found.view(found.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

        def _get_field_parts(self, orig_offs, raw_type):
            if raw_type != GGUFValueType.ARRAY:
                return super()._get_field_parts(orig_offs, raw_type)
            raw_itype, length = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
            itype = GGUFValueType(raw_itype[0])
            nptype = self.gguf_scalar_to_np.get(itype)
            if itype != GGUFValueType.STRING and nptype is None:  # arrays of arrays: gguf's own way
                return super()._get_field_parts(orig_offs, raw_type)
            parts, offs, count = [raw_itype, length], orig_offs + 12, int(length[0])
            if itype == GGUFValueType.STRING:
                for _ in range(count):
                    text_length = self._get(offs, np.uint64)
                    parts += (text_length, self._get(offs + 8, np.uint8, text_length[0]))
                    offs += 8 + int(text_length[0])
                data = list(range(3, len(parts), 2))
            else:
                size = np.dtype(nptype).itemsize
                for _ in range(count):
                    parts.append(self._get(offs, nptype))
                    offs += size
                data = list(range(2, len(parts)))
            return offs - orig_offs, parts, data, [GGUFValueType.ARRAY, itype] if count else [GGUFValueType.ARRAY]

    return QuickGGUFReader


@contextlib.contextmanager
def read_once():
    """transformers' GGUF loading made to parse a file once, with the quicker reader above.

    Loading a tokenizer and a model from a GGUF file builds gguf's `GGUFReader` three times (the
    tokenizer, the config, the weights: 9 s each for SmolLM2's 49,152-token vocabulary on one core)
    and gguf's tensor-name map once per module (397 times, 14 s): two thirds of the 66 s a
    conversion took. Inside this block both are built once per file and map and shared; they are
    read, never written, by what shares them.
    """
    import functools
    from unittest import mock

    import gguf

    read = functools.lru_cache(maxsize=2)(quick_reader_class())
    with (
        mock.patch.object(gguf, "GGUFReader", lambda path, mode="r": read(str(path), mode)),
        mock.patch.object(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=8)(gguf.get_tensor_name_map)),
    ):
        yield
    read.cache_clear()


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


# what must read back exactly: a wrong rotary base, say, moves q8_0's logits by 4.5e-2 of the largest
# on SmolLM2, too little for its logits tolerance to tell from quantization (2.8e-2)
SETTINGS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
            "vocab_size", "tie_word_embeddings", "rms_norm_eps", "rope_theta")  # fmt: skip


def _setting(config, name: str):
    if name == "rope_theta":
        return (getattr(config, "rope_parameters", None) or {}).get("rope_theta", getattr(config, "rope_theta", None))
    return getattr(config, name, None)


def config_mismatches(expected, got) -> list[str]:
    """The settings of SETTINGS that differ (floats as GGUF stores them: float32)."""
    wrong = []
    for name in SETTINGS:
        want, have = _setting(expected, name), _setting(got, name)
        same = math.isclose(want, have, rel_tol=1e-6) if isinstance(want, float) and have is not None else want == have
        if not same:
            wrong.append(f"{name} {have!r} instead of {want!r}")
    return wrong


def logits_gap(reference_dir: Path, gguf_file: Path) -> float:
    """Largest logit difference between the model and its GGUF on CHECK_PROMPTS, over the largest logit.

    One prompt at a time: in a padded batch the rows of padding positions are noise that
    differs between any two copies of a model (it measured 0.4 of the largest logit on SmolLM2).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reference_dir)
    reference = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32).eval()
    with alone(gguf_file) as directory, read_once():
        written = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file.name, dtype=torch.float32)
    written.eval()
    if wrong := config_mismatches(reference.config, written.config):
        raise GGUFError(f"{gguf_file.name}: read back with other settings than the model's: {'; '.join(wrong)}")
    gap = scale = 0.0
    with torch.no_grad():
        for prompt in CHECK_PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            expected, got = reference(ids).logits, written(ids).logits
            gap, scale = max(gap, (got - expected).abs().max().item()), max(scale, expected.abs().max().item())
    return gap / scale


def modelfile(gguf_file: Path, model_dir: Path) -> str:
    template = directory_chat_template(model_dir) or ""
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

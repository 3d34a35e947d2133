"""A merged model directory written as one GGUF file (llama.cpp, Ollama, LM Studio), without a
llama.cpp build: the `gguf` package's writer, tensor-name map and vocabulary readers.

Models of model_type llama (checked on SmolLM2 and the tests' tiny Llama). Their q and k projections
are stored permuted, as llama.cpp's converter stores them (transformers undoes that when it
reads a GGUF). Weight matrices take the chosen type; norms stay f32. The tokenizer (GPT-2 style
BPE from tokenizer.json), its merges, special tokens and chat template go into the file's
metadata, so the file alone is a model: transformers loads it with `gguf_file=`, llama.cpp and
Ollama too once the pre-tokenizer bears the name llama.cpp knows it by (`pretokenizer_name`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gguf
import numpy as np

from tasks.contracts.spec_sections import GGUF_ARCHITECTURES, GGUF_TYPES

# the largest logit difference against the model written, as a share of its largest logit, that each
# type may show on the check's prompts (each prompt alone, no padding). Measured on SmolLM2-135M,
# base / after the demo's LoRA merge: f16 8.7e-4 / 1.5e-3, bf16 5.0e-3 / 5.1e-3, q8_0 2.2e-2 / 2.8e-2;
# a writer that forgot llama.cpp's q/k layout: 0.29 (docs/using-the-model.md)
LOGITS_RTOL = {"f32": 1e-5, "f16": 5e-3, "bf16": 2e-2, "q8_0": 6e-2}


# The text llama.cpp's converter (convert_hf_to_gguf.py, get_vocab_base_pre) tokenizes to tell BPE
# pre-tokenizers apart: whitespace runs, emoji, digit groups, scripts written without spaces,
# punctuation runs and contractions, where splits differ. It must be that text to the character,
# as the sha256 below are of the ids it gives (str() of the list, as the converter hashes them).
PRETOKENIZER_PROBE = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n"
    "\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f (multiple emojis concatenated) \u2705 \U0001f999\U0001f999 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 "
    "?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
    "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? "
    "'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# sha256 of the probe's ids -> llama.cpp's name and the tokenizers it stands for, as llama.cpp's
# converter records them, for tokenizers of llama-architecture models. smollm checked here: the
# packaged SmolLM2 as transformers converts it (its tokenizer.json drops SmolLM's digit split, but
# no token of its vocabulary holds two digits or a space before one, so the ids are the same) gives it
PRETOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": ("smollm", "SmolLM, SmolLM2"),
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": ("llama-bpe", "Llama 3"),
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": ("deepseek-llm", "DeepSeek LLM"),
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": ("deepseek-coder", "DeepSeek Coder"),
}


class GGUFError(ValueError):
    """A model the GGUF writer does not map; the message names what it found."""


def _permuted(weight: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp's rotary layout: each head's two halves interleaved
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _add_hyperparameters(writer: gguf.GGUFWriter, config: dict) -> None:
    heads = config["num_attention_heads"]
    rope = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_freq_base(rope)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_vocab_size(config["vocab_size"])


def _added_token_kinds(model_dir: Path, kinds: list[int]) -> list[int]:
    """`kinds` with the tokenizer's added tokens marked as llama.cpp's converter marks them.

    llama.cpp matches a prompt's `<|im_start|>` whole only when its type is control (special) or
    user-defined (other added tokens); as a normal token the chat markers were split into text.
    """
    added = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8")).get("added_tokens") or []
    for token in added:
        kinds[token["id"]] = gguf.TokenType.CONTROL if token.get("special") else gguf.TokenType.USER_DEFINED
    return kinds


def _add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path) -> None:
    try:
        vocab = gguf.vocab.BpeVocab(model_dir)
    except FileNotFoundError:
        raise GGUFError(f"{model_dir}: the GGUF writer maps GPT-2 style BPE tokenizers (tokenizer.json) only") from None
    tokens, scores, kinds = zip(*vocab.all_tokens(), strict=True)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pretokenizer_name(model_dir))
    writer.add_token_list(list(tokens))
    writer.add_token_scores(list(scores))
    writer.add_token_types(_added_token_kinds(model_dir, list(kinds)))
    gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def check_architecture(model_type: str | None, where: str) -> None:
    if model_type not in GGUF_ARCHITECTURES:
        raise GGUFError(f"{where}: model_type {model_type!r}; the GGUF writer maps {', '.join(GGUF_ARCHITECTURES)}")


def check_type(gguf_type: str, where: str) -> None:
    if gguf_type not in GGUF_TYPES:
        raise GGUFError(f"{where} {gguf_type!r}: one of {', '.join(GGUF_TYPES)}")


def pretokenizer_name(model_dir: Path) -> str:
    """llama.cpp's name for how the tokenizer splits text before BPE (`tokenizer.ggml.pre`).

    Found as llama.cpp's converter finds it, by the token ids the tokenizer gives PRETOKENIZER_PROBE:
    llama.cpp applies the split the name stands for, not the one in tokenizer.json, and refuses a
    file whose name it does not know; transformers' GGUF reader ignores the name.
    """
    from transformers import AutoTokenizer  # only where a file is written (the CLI imports GGUFError)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    digest = hashlib.sha256(str(tokenizer.encode(PRETOKENIZER_PROBE)).encode()).hexdigest()
    if digest in PRETOKENIZERS:
        return PRETOKENIZERS[digest][0]
    pre = json.loads((Path(model_dir) / "tokenizer.json").read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = " + ".join(str(part.get("type")) for part in parts) or "nothing"
    known = ", ".join(f"{name} ({models})" for name, models in PRETOKENIZERS.values())
    raise GGUFError(
        f"{model_dir}: its tokenizer is not one the GGUF writer can name for llama.cpp (tokenizer.json split: "
        f"{kinds}; sha256 of its ids on llama.cpp's check text: {digest[:12]}); known: {known}"
    )


def architecture(model_dir: Path) -> str:
    model_type = json.loads((Path(model_dir) / "config.json").read_text()).get("model_type")
    check_architecture(model_type, str(model_dir))
    return model_type


def write_gguf(model_dir: Path, target: Path, gguf_type: str = "f16") -> Path:
    """Write `model_dir` (safetensors, as the export writes it) to `target` as one GGUF file."""
    from safetensors.torch import load_file  # torch: only where a file is written (the CLI imports GGUFError)

    model_dir = Path(model_dir)
    check_type(gguf_type, "gguf_type")
    model_type, config = architecture(model_dir), json.loads((model_dir / "config.json").read_text())
    arch = gguf.MODEL_ARCH.LLAMA
    weight_kind = gguf.GGMLQuantizationType[gguf_type.upper()]
    writer = gguf.GGUFWriter(str(target), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(model_dir.name)
    _add_hyperparameters(writer, config)
    _add_tokenizer(writer, model_dir)
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    for shard in sorted(model_dir.glob("*.safetensors")):
        for name, tensor in load_file(shard).items():
            gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise GGUFError(f"{shard}: tensor {name} has no GGUF name for {model_type}")
            data = tensor.float().numpy()  # bf16 has no numpy type
            if name.endswith("q_proj.weight"):
                data = _permuted(data, heads)
            elif name.endswith("k_proj.weight"):
                data = _permuted(data, kv_heads)
            kind = weight_kind if data.ndim == 2 else gguf.GGMLQuantizationType.F32
            if kind == gguf.GGMLQuantizationType.F32:
                writer.add_tensor(gguf_name, data)
            elif kind == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(gguf_name, data.astype(np.float16))
            else:
                packed = gguf.quants.quantize(data, kind)
                writer.add_tensor(gguf_name, packed, raw_shape=packed.shape, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target

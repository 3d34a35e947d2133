"""`tunefactory gguf`: the tiny model written as GGUF, read back by transformers, logits checked,
and loaded by llama.cpp itself (llama-cpp-python, which `make install` installs from ../shared/wheels/).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import gguf
import pytest
from shared_inputs import llama_cpp_greedy, llama_cpp_or_fail_in_ci

from flows.cli import main
from tasks.components.gguf_check import alone, logits_gap, read_once
from tasks.components.gguf_writer import LOGITS_RTOL
from tasks.contracts.spec_sections import GGUF_TYPES

# text where pre-tokenizers differ (digits, CJK, punctuation, a contraction) and chat markers,
# which llama.cpp must match whole
SPLIT_TEXT = "Who are you? 你是谁？ 3.14159, 2024-12-07; don't <|im_start|>user\nhi<|im_end|>\n"
GREEDY_TOKENS = 8
# llama.cpp's logits against the model's, as a share of the largest: the writer's tolerances, but for f32,
# where llama.cpp's own kernels differ from torch's (measured on the tiny model's chat prompt: f32 1.4e-4,
# f16 3.6e-4, bf16 2.9e-3, q8_0 7.4e-3; the greedy answer's top-2 logits 0.34 or more apart, 35 times
# q8_0's largest difference, so its exact answer is not luck)
LLAMA_CPP_RTOL = {**LOGITS_RTOL, "f32": 1e-3}


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    """`tunefactory gguf` on the tiny model, each type written once for this file: type -> (file, what it printed)."""
    files = {}

    def export(gguf_type: str):
        if gguf_type not in files:
            target = tmp_path_factory.mktemp(f"gguf-{gguf_type}") / f"tiny-{gguf_type}.gguf"
            with contextlib.redirect_stdout(io.StringIO()) as printed:
                assert main(["gguf", str(tiny_model), "--type", gguf_type, "--out", str(target)]) == 0
            files[gguf_type] = target, printed.getvalue()
        return files[gguf_type]

    return export


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_the_model_as_gguf_reloads_with_its_tokenizer_and_logits_within_the_types_tolerance(
    tiny_model, exported, gguf_type
):
    from transformers import AutoTokenizer

    target, printed = exported(gguf_type)
    assert "logits within" in printed
    assert {p.name for p in target.parent.iterdir()} == {target.name, "Modelfile"}, "no partial file left"
    gap = logits_gap(tiny_model, target)
    assert 0 < gap <= LOGITS_RTOL[gguf_type]
    original = AutoTokenizer.from_pretrained(tiny_model)
    # read as the conversion reads a GGUF: the file parsed once, by the quicker reader (compared with
    # gguf's own on mutated files in tests/test_gguf_input.py); gguf's takes about 9 s a parse here
    with alone(target) as directory, read_once():
        written = AutoTokenizer.from_pretrained(directory, gguf_file=target.name)
        pre = gguf.GGUFReader(target).fields["tokenizer.ggml.pre"]
    text = "Who are you? 你是谁？ <|im_start|>"
    assert written(text).input_ids == original(text).input_ids
    assert written.chat_template == original.chat_template
    assert bytes(pre.parts[pre.data[0]]).decode() == "smollm", "SmolLM2's tokenizer, named as llama.cpp knows it"
    modelfile = (target.parent / "Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./{target.name}\n") and 'PARAMETER stop "<|im_end|>"' in modelfile
    f32_weights = (tiny_model / "model.safetensors").stat().st_size
    # f16 half the f32 weights, q8_0 about a quarter, plus the tokenizer both carry (about 1.5 MB)
    assert target.stat().st_size < f32_weights * {"f16": 0.7, "q8_0": 0.45}[gguf_type]


def test_an_architecture_the_writer_does_not_map_and_an_unknown_type_are_refused(tiny_model, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    assert main(["gguf", str(other), "--out", str(tmp_path / "x.gguf")]) == 2
    assert "model_type 'gpt2'; the GGUF writer maps llama" in capsys.readouterr().err
    assert main(["gguf", str(tiny_model), "--type", "q4_k", "--out", str(tmp_path / "y.gguf")]) == 2
    assert "--type 'q4_k': one of f16, bf16, q8_0, f32" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.gguf*")), "nothing written"


def test_a_file_that_reads_back_with_other_settings_is_refused_and_not_left(tiny_model, tmp_path, capsys, monkeypatch):
    """A wrong rotary base moves q8_0's logits less than quantization may: the settings are compared too."""
    import tasks.components.gguf_writer as writer

    hyperparameters = writer._add_hyperparameters

    def wrong_rope(gguf_writer, config):
        hyperparameters(gguf_writer, {**config, "rope_parameters": {"rope_theta": 1234.0}, "rope_theta": 1234.0})

    monkeypatch.setattr(writer, "_add_hyperparameters", wrong_rope)
    assert main(["gguf", str(tiny_model), "--type", "q8_0", "--out", str(tmp_path / "tiny.gguf")]) == 2
    assert "read back with other settings than the model's: rope_theta 1234.0 instead of" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [], "neither the file, its partial copy nor a Modelfile"


@pytest.mark.parametrize("gguf_type", GGUF_TYPES)
def test_llama_cpp_loads_each_type_with_the_tokenizers_ids_and_the_models_logits_and_greedy_answer(
    tiny_model, tokenizer, exported, gguf_type
):
    """What llama.cpp, Ollama and LM Studio run: the file loads, splits text as the tokenizer does and
    matches chat markers whole; its logits on a chat prompt are the model's within the type's bound
    and its greedy answer is the model's (a repeated token on the random tiny model, so the logits
    at every prompt position are what tell a wrong file)."""
    llama_cpp = llama_cpp_or_fail_in_ci()
    import torch
    from transformers import AutoModelForCausalLM

    chat = [{"role": "user", "content": "Who are you?"}]
    prompt = tokenizer(tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)).input_ids
    target, _ = exported(gguf_type)
    llm = llama_cpp.Llama(model_path=str(target), verbose=False, n_ctx=256, n_threads=1, logits_all=True)
    try:
        assert llm.tokenize(SPLIT_TEXT.encode(), add_bos=True, special=True) == tokenizer(SPLIT_TEXT).input_ids
        llm.eval(prompt)
        logits = torch.from_numpy(llm.scores[: len(prompt)].copy())
        llm.reset()
        answer = llama_cpp_greedy(llm, prompt, GREEDY_TOKENS)
    finally:
        llm.close()
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        expected_logits = model(torch.tensor([prompt])).logits[0]
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=GREEDY_TOKENS, do_sample=False)
    gap = (logits - expected_logits).abs().max() / expected_logits.abs().max()
    assert gap <= LLAMA_CPP_RTOL[gguf_type]
    assert answer == expected[0, len(prompt) :].tolist()


@pytest.mark.parametrize(
    "pre_tokenizer",
    [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},  # a space first
        {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True},
    ],
)
def test_a_tokenizer_llama_cpp_does_not_know_is_refused_by_name_with_nothing_written(
    tiny_model, tmp_path, capsys, pre_tokenizer
):
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    tokenizer_json = json.loads((other / "tokenizer.json").read_text(encoding="utf-8"))
    (other / "tokenizer.json").write_text(json.dumps({**tokenizer_json, "pre_tokenizer": pre_tokenizer}))
    assert main(["gguf", str(other), "--out", str(tmp_path / "x.gguf")]) == 2
    error = capsys.readouterr().err
    assert f"{other}: its tokenizer is not one the GGUF writer can name for llama.cpp" in error
    assert f"(tokenizer.json split: {pre_tokenizer['type']};" in error and "known: smollm (SmolLM, SmolLM2)," in error
    assert len(error.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.gguf*")) and not (tmp_path / "Modelfile").exists(), "nothing written"

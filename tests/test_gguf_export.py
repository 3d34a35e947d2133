"""`tunefactory gguf`: the tiny model written as GGUF, read back by transformers, logits checked."""

from __future__ import annotations

import json
import shutil

import pytest

from flows.cli import main
from tasks.components.gguf_check import alone, logits_gap
from tasks.components.gguf_writer import LOGITS_RTOL


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_the_model_as_gguf_reloads_with_its_tokenizer_and_logits_within_the_types_tolerance(
    tiny_model, tmp_path, capsys, gguf_type
):
    from transformers import AutoTokenizer

    target = tmp_path / f"tiny-{gguf_type}.gguf"
    assert main(["gguf", str(tiny_model), "--type", gguf_type, "--out", str(target)]) == 0
    assert "logits within" in capsys.readouterr().out
    assert {p.name for p in tmp_path.iterdir()} == {target.name, "Modelfile"}, "no partial file left"
    gap = logits_gap(tiny_model, target)
    assert 0 < gap <= LOGITS_RTOL[gguf_type]
    original = AutoTokenizer.from_pretrained(tiny_model)
    with alone(target) as directory:
        written = AutoTokenizer.from_pretrained(directory, gguf_file=target.name)
    text = "Who are you? 你是谁？ <|im_start|>"
    assert written(text).input_ids == original(text).input_ids
    assert written.chat_template == original.chat_template
    from gguf import GGUFReader

    pre = GGUFReader(target).fields["tokenizer.ggml.pre"]
    assert bytes(pre.parts[pre.data[0]]).decode() == "gpt2", "llama.cpp splits text as the tokenizer does"
    modelfile = (tmp_path / "Modelfile").read_text()
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


@pytest.mark.parametrize(
    "pre_tokenizer, name",
    [
        ({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}, "gpt2"),
        (
            {
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Digits", "individual_digits": True},
                    {"type": "ByteLevel", "use_regex": True},
                ],
            },
            "smollm",
        ),  # fmt: skip
        ({"type": "Metaspace", "replacement": "_"}, None),
    ],
)
def test_the_pretokenizer_is_named_as_llama_cpp_names_it_or_refused(tmp_path, pre_tokenizer, name):
    from tasks.components.gguf_writer import GGUFError, pretokenizer_name

    (tmp_path / "tokenizer.json").write_text(json.dumps({"pre_tokenizer": pre_tokenizer}))
    if name is None:
        with pytest.raises(GGUFError, match="tokenizer.json splits text with Metaspace; the GGUF writer knows"):
            pretokenizer_name(tmp_path)
    else:
        assert pretokenizer_name(tmp_path) == name

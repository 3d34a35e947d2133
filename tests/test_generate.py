"""`tunefactory generate`: a JSON Lines file of prompts answered by the tiny model, in order; bad
input refused before any weights load; a stopped run resumed after its last whole line, ending
with the file an uninterrupted run writes; a line that cannot be answered reported in its place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.cli import main


@pytest.fixture(scope="module")
def adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter on the tiny Llama, so that the merge onto its base is on the path."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=4, target_modules=["q_proj"]))
    directory = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(directory)
    return directory


def write_prompts(path: Path, count: int) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"Question {i}: who are you?", "custom_id": i}) + "\n"
                            for i in range(count)))  # fmt: skip
    return path


def generate(model: Path, source: Path, target: Path, *options: str) -> int:
    return main(["generate", str(model), "--input", str(source), "--output", str(target), "--max-new-tokens", "4",
                 *options])  # fmt: skip


def test_generate_answers_a_file_of_prompts_and_conversations_in_order(adapter, tmp_path, capsys):
    requests = [
        {"prompt": "Who are you?", "id": 1},
        {"messages": [{"role": "user", "content": "Who are you?"}], "id": 2},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "id": 3},
    ]
    source, target = tmp_path / "prompts.jsonl", tmp_path / "answers.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in requests))
    assert generate(adapter, source, target) == 0
    assert "3 answers" in capsys.readouterr().out
    answers = [json.loads(line) for line in target.read_text().splitlines()]
    assert [row["id"] for row in answers] == [1, 2, 3] and all(isinstance(row["answer"], str) for row in answers)
    assert answers[0]["answer"] == answers[1]["answer"], "a prompt is the same request as its one user turn"
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "line 2: not JSON"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "line 2, message 0: expected a role"),
        ('{"text": "x"}', 'line 2: expected {"messages": [...]} or {"prompt": "..."}'),
        ('{"prompt": "half \\ud800 a pair"}', "line 2: holds '\\ud800', half of a UTF-16 surrogate pair"),
        ('{"prompt": "ok", "custom_id": "\\udfff"}', "line 2: holds '\\udfff', half of a UTF-16 surrogate pair"),
    ],
)
def test_generate_refuses_a_bad_line_naming_it_before_loading_the_model(tmp_path, capsys, line, message):
    source = tmp_path / "prompts.jsonl"
    source.write_text('{"prompt": "fine"}\n' + line + "\n")
    target = tmp_path / "answers.jsonl"
    assert generate(Path("/nonexistent"), source, target) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tunefactory: {source}, {message}") and err.count("\n") == 1, err
    assert not target.exists()


@pytest.mark.parametrize(
    "output, options, message",
    [
        ("answers.jsonl", ["--batch-size", "0"], "--batch-size: 0 is not allowed; give a whole number of 1 or more"),
        (
            "answers.jsonl",
            ["--max-new-tokens", "-1"],
            "--max-new-tokens: -1 is not allowed; give a whole number of 1 or more",
        ),
        ("missing/answers.jsonl", [], "--output {target}: the folder {folder} does not exist"),
        (".", [], "--output {target}: is a folder; name the JSON Lines file to write"),
    ],
)
def test_generate_refuses_a_size_or_an_output_it_cannot_write_before_loading_the_model(
    tmp_path, capsys, output, options, message
):
    source = write_prompts(tmp_path / "prompts.jsonl", 2)
    target = tmp_path / output
    assert generate(Path("/nonexistent"), source, target, *options) == 2  # the model is looked for after
    err = capsys.readouterr().err
    assert err == f"tunefactory: {message.format(target=target, folder=target.parent)}\n", err


def test_a_stopped_run_resumes_after_its_last_whole_line_and_ends_as_an_uninterrupted_run(
    tiny_model, tmp_path, capsys, monkeypatch
):
    import tasks.components.generation as generation

    source = write_prompts(tmp_path / "prompts.jsonl", 7)
    whole, resumed = tmp_path / "whole.jsonl", tmp_path / "resumed.jsonl"
    assert generate(tiny_model, source, whole, "--batch-size", "2") == 0
    real, batch_rows = generation.greedy_tokens, []

    def stopped_at_third_batch(model, input_ids, *args, **kwargs):
        batch_rows.append(input_ids.shape[0])
        if len(batch_rows) == 3:
            raise KeyboardInterrupt  # Ctrl-C while the third batch is generated
        return real(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(generation, "greedy_tokens", stopped_at_third_batch)
    assert generate(tiny_model, source, resumed, "--batch-size", "2") == 130
    assert "interrupted; 4 lines kept" in capsys.readouterr().err
    assert resumed.read_text() == "".join(whole.read_text().splitlines(keepends=True)[:4])
    with resumed.open("ab") as handle:  # a kill in the middle of a write leaves half a line
        handle.write(b'{"prompt": "Question 4: who are you?", "custom_id": 4, "ans')
    batch_rows.clear()
    assert generate(tiny_model, source, resumed, "--batch-size", "2") == 0
    assert batch_rows == [2, 1], "lines 5 to 7 are generated, the four kept are not"
    assert resumed.read_bytes() == whole.read_bytes()
    assert not list(tmp_path.glob("*.partial"))


def test_a_rerun_adds_only_to_answers_of_the_same_input_model_and_settings(tiny_model, tmp_path, capsys, monkeypatch):
    import tasks.components.modeling as modeling

    source, target = write_prompts(tmp_path / "prompts.jsonl", 3), tmp_path / "answers.jsonl"
    assert generate(tiny_model, source, target) == 0
    finished = target.read_bytes()
    monkeypatch.setattr(modeling, "load_model", lambda *a: pytest.fail("a finished file loaded the model again"))
    assert generate(tiny_model, source, target) == 0 and "3 answers" in capsys.readouterr().out
    write_prompts(source, 4)
    assert generate(tiny_model, source, target) == 2
    assert f"--output {target}: holds answers of another run (the input changed since" in capsys.readouterr().err
    write_prompts(source, 3)
    assert generate(tiny_model, source, target, "--max-new-tokens", "5") == 2
    assert "(--max-new-tokens changed since, per answers.jsonl.meta.json)" in capsys.readouterr().err
    foreign = tmp_path / "notes.jsonl"
    foreign.write_text('{"mine": true}\n')
    assert generate(tiny_model, source, foreign) == 2
    assert "notes.jsonl: holds answers not written by this command" in capsys.readouterr().err
    assert target.read_bytes() == finished and foreign.read_text() == '{"mine": true}\n'


def test_a_line_that_cannot_be_answered_gets_an_error_in_its_place_and_the_rest_are_answered(
    tiny_model, tmp_path, capsys
):
    rows = [
        {"prompt": "Who are you?", "custom_id": "a"},
        {"prompt": "word " * 1100, "custom_id": "b"},  # longer than the tiny model's 1024 positions
        {"prompt": "Hello", "custom_id": "c"},
    ]
    source, target = tmp_path / "prompts.jsonl", tmp_path / "answers.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert generate(tiny_model, source, target) == 1
    assert '2 answers and 1 failed lines (with an "error" each)' in capsys.readouterr().err
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert [line["custom_id"] for line in lines] == ["a", "b", "c"]
    assert isinstance(lines[0]["answer"], str) and isinstance(lines[2]["answer"], str)
    assert "answer" not in lines[1] and lines[1]["error"]["code"] == "context_length_exceeded"
    assert lines[1]["error"]["message"].startswith("line 2: the prompt is ")

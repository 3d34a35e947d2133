"""Templating: both placeholder styles, literal insertion, unfilled placeholders, the formats' conversions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.dataset.registry import DataError, resolve_dataset
from tasks.dataset.rows import chat_messages, fill_placeholders
from tasks.stages.template_dataset import peek_examples, split_examples


def templated_examples(names, registry, values, max_samples=None, kind="chat"):
    """Every row of the named datasets, templated (the check before stage one reads them the same way)."""
    return peek_examples(names, registry, values, kind, rows=None, max_samples=max_samples)


def test_both_placeholder_styles_take_the_same_value():
    values = {"name": "Nova", "author": "Acme Labs"}
    text = "I am <NAME> by <AUTHOR>; also {{name}} by {{ author }}."
    assert fill_placeholders(text, values, "here") == "I am Nova by Acme Labs; also Nova by Acme Labs."


def test_values_are_inserted_literally_not_substituted_twice():
    values = {"name": "<AUTHOR> {{author}}", "author": "Acme"}
    assert fill_placeholders("<NAME> / <AUTHOR>", values, "here") == "<AUTHOR> {{author}} / Acme"
    assert fill_placeholders("<NAME>", {"name": r"\1 $0 \g<0>"}, "here") == r"\1 $0 \g<0>"


def test_unfilled_placeholder_names_dataset_row_and_placeholder(tmp_path: Path):
    registry = tmp_path / "dataset_info.json"
    registry.write_text(json.dumps({"ids": {"file_name": "ids.json"}}))
    (tmp_path / "ids.json").write_text(
        json.dumps(
            [
                {"instruction": "Who are you?", "output": "I am <NAME>."},
                {"instruction": "Who made you?", "output": "{{author}} made me."},
            ]
        )
    )
    with pytest.raises(DataError) as error:
        templated_examples(["ids"], str(registry), {"name": "Nova"})
    message = str(error.value)
    assert "dataset 'ids'" in message and "row 1" in message and "{{author}}" in message
    assert "dataset.template_vars.author" in message


def test_other_angle_and_brace_tokens_are_text_unless_given_a_value():
    text = "Fill <MASK> in <T>x</T>; {{company}} and <BR> stay; <NAME> does not."
    assert fill_placeholders(text, {"name": "Nova"}, "here") == (
        "Fill <MASK> in <T>x</T>; {{company}} and <BR> stay; Nova does not."
    )
    # a key of template_vars makes both spellings of it a placeholder
    assert fill_placeholders("<COMPANY> / {{ company }}", {"company": "Acme"}, "here") == "Acme / Acme"


def test_shipped_self_cognition_fills_every_row():
    examples, sources = templated_examples(["self_cognition"], None, {"name": "Nova", "author": "Acme Labs"})
    assert len(examples) == sources[0]["rows"] >= 70
    answers = [example["messages"][-1]["content"] for example in examples]
    assert all("Nova" in answer for answer in answers)
    assert not any("<NAME>" in a or "<AUTHOR>" in a for a in answers)
    assert any("你" in example["messages"][-2]["content"] for example in examples), "Chinese rows are present"


def test_alpaca_with_system_history_and_input(tmp_path: Path):
    registry = tmp_path / "dataset_info.json"
    columns = {"system": "system", "history": "history"}  # read only where named, as in LLaMA-Factory
    registry.write_text(json.dumps({"a": {"file_name": "a.jsonl", "columns": columns}}))
    (tmp_path / "a.jsonl").write_text(
        json.dumps(
            {
                "instruction": "Translate",
                "input": "bonjour",
                "output": "hello",
                "system": "Be brief.",
                "history": [["hi", "hello!"]],
            }
        )
        + "\n"
    )
    (example,), _ = templated_examples(["a"], str(registry), {})
    messages = example["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[3]["content"] == "Translate\nbonjour"


def test_sharegpt_with_custom_role_tags(tmp_path: Path):
    registry = tmp_path / "dataset_info.json"
    registry.write_text(
        json.dumps(
            {
                "s": {
                    "file_name": "s.json",
                    "formatting": "sharegpt",
                    "columns": {"messages": "messages"},
                    "tags": {
                        "role_tag": "role",
                        "content_tag": "content",
                        "user_tag": "user",
                        "assistant_tag": "assistant",
                    },
                }
            }
        )
    )
    rows = [
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
        {"messages": [{"role": "robot", "content": "?"}]},
    ]
    (tmp_path / "s.json").write_text(json.dumps(rows))
    entry = resolve_dataset("s", registry)
    assert chat_messages(entry, rows[0], 0) == [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    with pytest.raises(DataError, match=r"row 1, turn 0: role 'robot' is not one of"):
        chat_messages(entry, rows[1], 1)


def test_split_is_seeded_and_holds_out_the_fraction():
    examples = [{"row": i} for i in range(50)]
    train, val = split_examples(examples, 0.1, shuffle=True, seed=3)
    assert len(val) == 5 and len(train) == 45
    assert split_examples(examples, 0.1, shuffle=True, seed=3) == (train, val)
    assert split_examples(examples, 0.1, shuffle=True, seed=4) != (train, val)
    assert {e["row"] for e in train} | {e["row"] for e in val} == set(range(50))


def llama_factory_registry(tmp_path: Path) -> str:
    """A registry written the way LLaMA-Factory's data/dataset_info.json writes these kinds."""
    entries = {
        "pairs_alpaca": {
            "file_name": "pairs_alpaca.json",
            "ranking": True,
            "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"},
        },
        "pairs_sharegpt": {
            "file_name": "pairs_sharegpt.json",
            "formatting": "sharegpt",
            "ranking": True,
            "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
        },
        "feedback": {
            "file_name": "feedback.json",
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "kto_tag": "label"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
        },
        "corpus": {"file_name": "corpus.json", "columns": {"prompt": "text"}},
    }
    rows = {
        "pairs_alpaca.json": [{"instruction": "Who are you?", "input": "", "chosen": "<NAME>.", "rejected": "Bob."}],
        "pairs_sharegpt.json": [
            {
                "conversations": [
                    {"from": "human", "value": "Hi"},
                    {"from": "gpt", "value": "Hello!"},
                    {"from": "human", "value": "Your name?"},
                ],
                "chosen": {"from": "gpt", "value": "I am <NAME>."},
                "rejected": {"from": "gpt", "value": "No idea."},
            }
        ],
        "feedback.json": [
            {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], "label": True},
            {"messages": [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "7"}], "label": False},
        ],
        "corpus.json": [{"text": "<NAME> was built by <AUTHOR>."}],
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps(entries))
    for name, content in rows.items():
        (tmp_path / name).write_text(json.dumps(content))
    return str(tmp_path / "dataset_info.json")


def test_llama_factory_ranking_kto_and_text_entries_read_as_their_kinds(tmp_path: Path):
    registry = llama_factory_registry(tmp_path)
    values = {"name": "Nova", "author": "Acme"}
    (alpaca, sharegpt), _ = templated_examples(["pairs_alpaca", "pairs_sharegpt"], registry, values, kind="pairs")
    assert alpaca["messages"] == [{"role": "user", "content": "Who are you?"}]
    assert (alpaca["chosen"], alpaca["rejected"]) == ("Nova.", "Bob.")
    assert [m["role"] for m in sharegpt["messages"]] == ["user", "assistant", "user"]
    assert sharegpt["chosen"] == "I am Nova." and sharegpt["rejected"] == "No idea."

    good, bad = templated_examples(["feedback"], registry, values, kind="feedback")[0]
    assert (good["label"], bad["label"]) == (True, False) and bad["messages"][-1]["content"] == "7"
    (text,), _ = templated_examples(["corpus"], registry, values, kind="text")
    assert text["text"] == "Nova was built by Acme."
    (prompt,), _ = templated_examples(["feedback"], registry, values, max_samples=1, kind="prompts")
    assert prompt["messages"] == [{"role": "user", "content": "2+2?"}], "a prompt leaves the answer out"


def test_a_dataset_of_the_wrong_kind_for_its_stage_is_named(tmp_path: Path):
    registry = llama_factory_registry(tmp_path)
    with pytest.raises(DataError, match="'corpus'.*not a preference dataset"):
        templated_examples(["corpus"], registry, {}, kind="pairs")
    with pytest.raises(DataError, match="'pairs_alpaca'.*holds preference pairs"):
        templated_examples(["pairs_alpaca"], registry, {"name": "x"}, kind="chat")
    broken = json.loads((tmp_path / "feedback.json").read_text())
    broken[0]["label"] = "yes"
    (tmp_path / "feedback.json").write_text(json.dumps(broken))
    with pytest.raises(DataError, match=r"row 0: 'label' \(kto_tag\) must be true or false, got 'yes'"):
        templated_examples(["feedback"], registry, {}, kind="feedback")

"""The dataset registry in LLaMA-Factory's format: every attribute, every file kind, every bad input's message,
tool calling, placeholders, skipping bad rows, and LLaMA-Factory's own registry read unchanged."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from shared_inputs import (
    LLAMAFACTORY_DATA,
    LLAMAFACTORY_REGISTRY,
    llamafactory_data_or_fail_in_ci,
    needs_llamafactory_data,
)

from tasks.components.chat_encoding import IGNORE_INDEX, encode_conversation, template_supports_tools
from tasks.dataset.registry import (
    DataError,
    DatasetEntry,
    check_paths_in_registry,
    load_registry,
    resolve_dataset,
)
from tasks.dataset.sources import source_record
from tasks.stages.template_dataset import peek_examples
from tasks.workers.data import TemplateJob, template

REPO = Path(__file__).resolve().parents[1]
SHARED = LLAMAFACTORY_DATA
SHARED_REGISTRY = LLAMAFACTORY_REGISTRY
CHATML_TOOLS = REPO / "data" / "chat_templates" / "chatml_tools.jinja"
VALUES = {"name": "Nova", "author": "Acme"}
ROWS = [{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(10)]

needs_no_modelscope = pytest.mark.skipif(importlib.util.find_spec("modelscope") is not None, reason="installed")
needs_no_openmind = pytest.mark.skipif(importlib.util.find_spec("openmind") is not None, reason="installed")


def make_registry(folder: Path, entries: dict, files: dict | None = None) -> str:
    """A dataset_info.json of `entries` in `folder`, with `files` beside it (text, bytes, or JSON-able data)."""
    folder.mkdir(parents=True, exist_ok=True)
    for relative, content in (files or {}).items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        else:
            path.write_text(json.dumps(content), encoding="utf-8")
    registry = folder / "dataset_info.json"
    registry.write_text(json.dumps(entries))
    return str(registry)


def read_all(names: list[str], registry: str, kind: str = "chat", values: dict | None = None, **options):
    """Every row of the named datasets as templated examples, and their sources."""
    return peek_examples(names, registry, VALUES if values is None else values, kind, rows=None, **options)


def turns(example: dict) -> list[tuple[str, str]]:
    return [(message["role"], message["content"]) for message in example["messages"]]


def jsonl(rows: list) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


# ---------------------------------------------------------------- 1. registry attributes


def local_hub_folder(folder: Path) -> Path:
    """A hub-style dataset folder: two configs declared in a README.md, en with a train and a test split."""
    for relative, rows in {
        "en/train.jsonl": [{"instruction": "english train", "output": "E"}],
        "en/test.jsonl": [{"instruction": "english test", "output": "T"}],
        "zh/train.jsonl": [{"instruction": "chinese train", "output": "Z"}],
    }.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_text(jsonl(rows))
    configs = [
        {"config_name": "en", "data_files": [{"split": "train", "path": "en/train.jsonl"},
                                             {"split": "test", "path": "en/test.jsonl"}]},
        {"config_name": "zh", "data_files": [{"split": "train", "path": "zh/train.jsonl"}]},
    ]  # fmt: skip
    (folder / "README.md").write_text("---\n" + yaml.safe_dump({"configs": configs}) + "---\n# a local dataset\n")
    return folder


def test_hf_hub_url_local_folder_with_subset_from_readme_configs_and_split(tmp_path: Path):
    hub = local_hub_folder(tmp_path / "hub")
    registry = make_registry(
        tmp_path,
        {
            "en": {"hf_hub_url": str(hub), "subset": "en"},
            "en_test": {"hf_hub_url": str(hub), "subset": "en", "split": "test"},
            "zh": {"hf_hub_url": str(hub), "subset": "zh"},
        },
    )
    assert resolve_dataset("en", registry).source() == ("hf_hub", str(hub))
    prompts = {name: [turns(e)[0][1] for e in read_all([name], registry)[0]] for name in ("en", "en_test", "zh")}
    assert prompts == {"en": ["english train"], "en_test": ["english test"], "zh": ["chinese train"]}


def test_hf_hub_url_local_folder_with_folder_as_data_dir(tmp_path: Path):
    hub = tmp_path / "code"
    files = {"code/python/rows.jsonl": jsonl([{"instruction": "py", "output": "P"}]),
             "code/java/rows.jsonl": jsonl([{"instruction": "java", "output": "J"}])}  # fmt: skip
    registry = make_registry(
        tmp_path,
        {"python": {"hf_hub_url": str(hub), "folder": "python"}, "everything": {"hf_hub_url": str(hub)}},
        files,
    )
    assert [turns(e)[0][1] for e in read_all(["python"], registry)[0]] == ["py"]
    assert sorted(turns(e)[0][1] for e in read_all(["everything"], registry)[0]) == ["java", "py"]


def test_hf_hub_url_local_folder_is_digested_with_its_subset_and_split(tmp_path: Path):
    hub = local_hub_folder(tmp_path / "hub")
    registry = make_registry(tmp_path, {"en": {"hf_hub_url": str(hub), "subset": "en", "split": "test"}})
    before = source_record(resolve_dataset("en", registry))
    assert before.kind == "hf_hub" and before.subset == "en" and before.split == "test"
    (hub / "en" / "test.jsonl").write_text(jsonl([{"instruction": "edited", "output": "T"}]))
    assert source_record(resolve_dataset("en", registry)).sha256 != before.sha256


@needs_no_modelscope
def test_ms_hub_url_is_refused_naming_entry_attribute_and_install(tmp_path: Path):
    registry = make_registry(tmp_path, {"ms_only": {"ms_hub_url": "AI-ModelScope/x"}})
    with pytest.raises(DataError) as error:
        resolve_dataset("ms_only", registry)
    message = str(error.value)
    assert "dataset 'ms_only'" in message and "ms_hub_url 'AI-ModelScope/x'" in message
    assert "needs the modelscope package (pip install modelscope)" in message


@needs_no_openmind
def test_om_hub_url_is_refused_naming_entry_attribute_and_install(tmp_path: Path):
    registry = make_registry(tmp_path, {"om_only": {"om_hub_url": "Modelers/x"}})
    with pytest.raises(DataError) as error:
        resolve_dataset("om_only", registry)
    message = str(error.value)
    assert "dataset 'om_only'" in message and "om_hub_url 'Modelers/x'" in message
    assert "needs the openmind package (pip install openmind)" in message


def test_hub_precedence_follows_the_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("USE_MODELSCOPE_HUB", raising=False)
    monkeypatch.delenv("USE_OPENMIND_HUB", raising=False)
    all_three = DatasetEntry(name="x", hf_hub_url="org/x", ms_hub_url="ms/x", om_hub_url="om/x")
    assert all_three.source() == ("hf_hub", "org/x")
    assert DatasetEntry(name="x", ms_hub_url="ms/x").source() == ("ms_hub", "ms/x")  # the only hub given
    assert DatasetEntry(name="x", hf_hub_url="org/x", file_name="x.json").source() == ("hf_hub", "org/x")
    assert DatasetEntry(name="x", script_url="s", file_name="x.json").source() == ("script", "s")
    assert DatasetEntry(name="x", cloud_file_name="s3://b/x.json", file_name="x.json").source()[0] == "cloud_file"
    monkeypatch.setenv("USE_OPENMIND_HUB", "1")
    assert all_three.source() == ("om_hub", "om/x")
    monkeypatch.setenv("USE_MODELSCOPE_HUB", "1")
    assert all_three.source() == ("ms_hub", "ms/x")
    assert DatasetEntry(name="x", hf_hub_url="org/x").source() == ("hf_hub", "org/x")  # no ms_hub_url to prefer


@needs_no_modelscope
def test_modelscope_chosen_by_environment_says_how_to_use_the_hf_hub_url_instead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("USE_MODELSCOPE_HUB", "1")
    registry = make_registry(tmp_path, {"both": {"hf_hub_url": "org/x", "ms_hub_url": "AI-ModelScope/x"}})
    with pytest.raises(DataError, match="USE_MODELSCOPE_HUB"):
        resolve_dataset("both", registry)


def test_script_url_is_a_folder_beside_the_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    files = {"loaders/mine/rows.json": [{"instruction": "from the script folder", "output": "S"}]}
    registry = make_registry(tmp_path / "registry", {"scripted": {"script_url": "loaders/mine"}}, files)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative to the registry, not to the working directory
    entry = resolve_dataset("scripted", registry)
    assert entry.source() == ("script", "loaders/mine")
    examples, sources = read_all(["scripted"], registry)
    assert [turns(e) for e in examples] == [[("user", "from the script folder"), ("assistant", "S")]]
    assert sources[0]["file"] == str(tmp_path / "registry" / "loaders" / "mine")


@pytest.mark.parametrize(("url", "package"), [("s3://bucket/rows.json", "s3fs"), ("gs://bucket/rows.json", "gcsfs")])
def test_cloud_file_name_is_refused_naming_the_fsspec_package(tmp_path: Path, url: str, package: str):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed")
    registry = make_registry(tmp_path, {"cloud": {"cloud_file_name": url}})
    with pytest.raises(DataError) as error:
        resolve_dataset("cloud", registry)
    assert "dataset 'cloud'" in str(error.value)
    assert f"cloud_file_name {url!r} needs the {package} package (pip install {package})" in str(error.value)


def test_file_name_is_relative_to_the_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    registry = make_registry(tmp_path / "data", {"mine": {"file_name": "sub/rows.json"}}, {"sub/rows.json": ROWS})
    monkeypatch.chdir(tmp_path)
    examples, sources = read_all(["mine"], registry)
    assert [turns(e)[0][1] for e in examples] == [row["instruction"] for row in ROWS]
    assert sources == [
        {"name": "mine", "file": str(tmp_path / "data" / "sub" / "rows.json"), "rows": 10, "skipped_in_first": 0}
    ]


@pytest.mark.parametrize("attribute", ["subset", "folder"])
def test_subset_or_folder_on_a_file_entry_is_refused(tmp_path: Path, attribute: str):
    registry = make_registry(tmp_path, {"mine": {"file_name": "rows.json", attribute: "en"}}, {"rows.json": ROWS})
    with pytest.raises(DataError) as error:
        resolve_dataset("mine", registry)
    assert "dataset 'mine'" in str(error.value)
    assert f"{attribute} applies to hub datasets and script_url folders, not to file 'rows.json'" in str(error.value)


def test_split_other_than_train_on_a_saved_folder_is_refused(tmp_path: Path):
    from datasets import Dataset

    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    registry = make_registry(tmp_path, {"mine": {"file_name": "saved", "split": "test"}})
    with pytest.raises(DataError, match="split 'test'"):
        read_all(["mine"], registry)


def test_a_saved_dataset_dict_serves_the_entry_split(tmp_path: Path):
    from datasets import Dataset, DatasetDict

    splits = {"train": Dataset.from_list(ROWS[:2]), "test": Dataset.from_list(ROWS[5:6])}
    DatasetDict(splits).save_to_disk(str(tmp_path / "saved"))
    registry = make_registry(tmp_path, {"mine": {"file_name": "saved", "split": "test"}})
    assert [turns(e)[0][1] for e in read_all(["mine"], registry)[0]] == ["question 5"]


def test_num_samples_samples_down_to_distinct_rows_with_the_seed(tmp_path: Path):
    registry = make_registry(tmp_path, {"some": {"file_name": "rows.json", "num_samples": 4}}, {"rows.json": ROWS})
    examples, sources = read_all(["some"], registry, seed=42)
    rows = [example["row"] for example in examples]
    assert sources[0]["rows"] == 4 and len(rows) == len(set(rows)) == 4 and set(rows) <= set(range(10))
    assert rows != [0, 1, 2, 3], "a random sample, not the first rows"
    assert [e["row"] for e in read_all(["some"], registry, seed=42)[0]] == rows, "the same seed, the same sample"
    assert [e["row"] for e in read_all(["some"], registry, seed=43)[0]] != rows
    for example in examples:  # each sampled row keeps its own text
        assert turns(example)[0][1] == f"question {example['row']}"


def test_num_samples_above_the_size_repeats_rows(tmp_path: Path):
    registry = make_registry(tmp_path, {"more": {"file_name": "rows.json", "num_samples": 25}}, {"rows.json": ROWS})
    examples, sources = read_all(["more"], registry)
    rows = [example["row"] for example in examples]
    assert sources[0]["rows"] == len(rows) == 25
    assert sorted(set(rows)) == list(range(10)), "every row at least once, then repeats"
    assert source_record(resolve_dataset("more", registry)).num_samples == 25


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        pytest.param(
            {"cloud_file_name": "https://example.com/rows.json"},
            r"dataset 'bad'.*must start with s3:// or gs://",
            id="cloud_file_name-not-s3-or-gs",
        ),
        pytest.param(
            {"file_name": "rows.json", "num_samples": 0},
            r"entry 'bad': num_samples: .*greater than or equal to 1",
            id="num_samples-below-1",
        ),
        pytest.param(
            {"file_name": "f.json", "formatting": "chatml"},
            "entry 'bad': formatting: 'chatml' is not one of alpaca, sharegpt, openai",
            id="unknown-formatting",
        ),
    ],
)
def test_an_attribute_value_out_of_range_is_refused_naming_entry_and_attribute(
    tmp_path: Path, entry: dict, message: str
):
    registry = make_registry(tmp_path, {"bad": entry}, {"rows.json": ROWS})
    with pytest.raises(DataError, match=message):
        resolve_dataset("bad", registry)


def test_alpaca_reads_every_alpaca_column(tmp_path: Path):
    columns = {"prompt": "p", "query": "q", "response": "r", "history": "h", "system": "s"}
    row = {
        "p": "Translate",
        "q": "bonjour",
        "r": "hello",
        "h": [["hi", "hey"], ["how are you?", "fine"]],
        "s": "Brief.",
    }
    registry = make_registry(tmp_path, {"a": {"file_name": "a.json", "columns": columns}}, {"a.json": [row]})
    (example,) = read_all(["a"], registry)[0]
    assert turns(example) == [
        ("system", "Brief."),
        ("user", "hi"),
        ("assistant", "hey"),
        ("user", "how are you?"),
        ("assistant", "fine"),
        ("user", "Translate\nbonjour"),
        ("assistant", "hello"),
    ]


def test_alpaca_reads_system_and_history_only_where_columns_name_them(tmp_path: Path):
    row = {"instruction": "Q", "input": "", "output": "A", "system": "ignored", "history": [["h", "i"]]}
    registry = make_registry(tmp_path, {"a": {"file_name": "a.json"}}, {"a.json": [row]})
    (example,) = read_all(["a"], registry)[0]
    assert turns(example) == [("user", "Q"), ("assistant", "A")]


def test_sharegpt_reads_every_tag_and_the_messages_system_and_tools_columns(tmp_path: Path):
    tags = {"role_tag": "who", "content_tag": "text", "user_tag": "U", "assistant_tag": "A",
            "observation_tag": "O", "function_tag": "F", "system_tag": "SYS"}  # fmt: skip
    columns = {"messages": "dialogue", "system": "persona", "tools": "functions"}
    call = {"name": "add", "arguments": {"a": 1, "b": 2}}
    rows = [
        {
            "dialogue": [
                {"who": "U", "text": "1+2?"},
                {"who": "F", "text": json.dumps(call)},
                {"who": "O", "text": '{"sum": 3}'},
                {"who": "A", "text": "3"},
            ],
            "persona": "You add.",
            "functions": json.dumps([{"name": "add", "parameters": {"type": "object"}}]),
        },
        {
            "dialogue": [
                {"who": "SYS", "text": "From the turn."},
                {"who": "U", "text": "hi"},
                {"who": "A", "text": "yo"},
            ]
        },
    ]
    entry = {"file_name": "s.json", "formatting": "sharegpt", "columns": columns, "tags": tags}
    registry = make_registry(tmp_path, {"s": entry}, {"s.json": rows})
    first, second = read_all(["s"], registry)[0]
    assert first["messages"] == [
        {"role": "system", "content": "You add."},
        {"role": "user", "content": "1+2?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]},
        {"role": "tool", "content": '{"sum": 3}'},
        {"role": "assistant", "content": "3"},
    ]
    assert first["tools"] == [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    assert turns(second) == [("system", "From the turn."), ("user", "hi"), ("assistant", "yo")]
    assert second["tools"] is None


def test_openai_formatting_with_its_default_tags_and_tool_calls(tmp_path: Path):
    call = {"name": "lookup", "arguments": '{"q": "x"}'}
    row = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "find x"},
            {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": call}]},
            {"role": "tool", "content": "x is 42"},
            {"role": "assistant", "content": "It is 42."},
        ],
        "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {}}}],
    }
    entry = {"file_name": "o.json", "formatting": "openai", "columns": {"messages": "messages", "tools": "tools"}}
    registry = make_registry(tmp_path, {"o": entry}, {"o.json": [row]})
    (example,) = read_all(["o"], registry)[0]
    assert example["messages"] == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "find x"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]},
        {"role": "tool", "content": "x is 42"},
        {"role": "assistant", "content": "It is 42."},
    ]
    assert example["tools"] == row["tools"]


def test_ranking_alpaca_reads_chosen_and_rejected_columns(tmp_path: Path):
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    entry = {"file_name": "p.json", "ranking": True, "columns": columns}
    registry = make_registry(tmp_path, {"p": entry}, {"p.json": [{"question": "Q", "good": "G", "bad": "B"}]})
    (example,) = read_all(["p"], registry, kind="pairs")[0]
    assert (turns(example), example["chosen"], example["rejected"]) == ([("user", "Q")], "G", "B")


def test_ranking_sharegpt_reads_answer_messages(tmp_path: Path):
    row = {
        "conversations": [{"from": "human", "value": "Q"}],
        "chosen": {"from": "gpt", "value": "G"},
        "rejected": {"from": "gpt", "value": "B"},
    }
    registry = make_registry(
        tmp_path, {"p": {"file_name": "p.json", "ranking": True, "formatting": "sharegpt"}}, {"p.json": [row]}
    )
    (example,) = read_all(["p"], registry, kind="pairs")[0]
    assert (turns(example), example["chosen"], example["rejected"]) == ([("user", "Q")], "G", "B")


def test_ranking_decides_which_stages_may_read_the_entry(tmp_path: Path):
    registry = make_registry(
        tmp_path,
        {"pairs": {"file_name": "p.json", "ranking": True}, "plain": {"file_name": "a.json"}},
        {"p.json": [{"instruction": "Q", "chosen": "G", "rejected": "B"}], "a.json": ROWS},
    )
    with pytest.raises(DataError, match="dataset 'pairs'.*holds preference pairs, which a 'chat' stage cannot read"):
        read_all(["pairs"], registry, kind="chat")
    with pytest.raises(DataError, match="dataset 'plain'.*is not a preference dataset; pairs need 'ranking: true'"):
        read_all(["plain"], registry, kind="pairs")


def test_kto_tag_column_labels_each_conversation(tmp_path: Path):
    rows = [
        {"instruction": "Q1", "output": "good", "label": True},
        {"instruction": "Q2", "output": "bad", "label": False},
    ]
    text_label = [{"instruction": "Q", "output": "A", "label": "true"}]
    registry = make_registry(
        tmp_path,
        {
            "k": {"file_name": "k.json", "columns": {"kto_tag": "label"}},
            "s": {"file_name": "s.json", "columns": {"kto_tag": "label"}},
        },
        {"k.json": rows, "s.json": text_label},
    )
    examples = read_all(["k"], registry, kind="feedback")[0]
    assert [(turns(e), e["label"]) for e in examples] == [
        ([("user", "Q1"), ("assistant", "good")], True),
        ([("user", "Q2"), ("assistant", "bad")], False),
    ]
    with pytest.raises(DataError, match=r"row 0: 'label' \(kto_tag\) must be true or false, got 'true'"):
        read_all(["s"], registry, kind="feedback")


@pytest.mark.parametrize("media", ["images", "videos", "audios"])
def test_media_columns_are_refused_naming_the_column(tmp_path: Path, media: str):
    entry = {"file_name": "m.json", "formatting": "sharegpt", "columns": {"messages": "messages", media: "my_media"}}
    registry = make_registry(tmp_path, {"mm": entry}, {"m.json": []})
    with pytest.raises(DataError) as error:
        resolve_dataset("mm", registry)
    assert error.value.reason == "multimodal"
    assert "dataset 'mm'" in str(error.value) and f"{media} column ('my_media')" in str(error.value)
    assert "text-only" in str(error.value)


def test_unknown_attribute_is_refused_naming_it(tmp_path: Path):
    registry = make_registry(tmp_path, {"typo": {"file_name": "rows.json", "colums": {"prompt": "q"}}})
    with pytest.raises(DataError) as error:
        resolve_dataset("typo", registry)
    assert "entry 'typo'" in str(error.value)
    assert "'colums' is not an attribute of LLaMA-Factory's format" in str(error.value)
    assert "columns" in str(error.value).split("known:")[1]


def test_misspelt_column_or_tag_is_refused_naming_it(tmp_path: Path):
    registry = make_registry(
        tmp_path,
        {
            "column": {"file_name": "rows.json", "columns": {"promt": "q"}},
            "tag": {"file_name": "rows.json", "formatting": "sharegpt", "tags": {"user_tg": "human"}},
        },
    )
    with pytest.raises(DataError, match=r"dataset 'column'.*columns\.promt is not a column of the format \(prompt,"):
        resolve_dataset("column", registry)
    with pytest.raises(DataError, match=r"dataset 'tag'.*tags\.user_tg is not a tag of the format \(role_tag,"):
        resolve_dataset("tag", registry)


def test_entry_without_a_source_or_not_an_object_is_refused(tmp_path: Path):
    registry = make_registry(tmp_path, {"nowhere": {"formatting": "alpaca"}, "text": "rows.json"})
    with pytest.raises(DataError, match="dataset 'nowhere'.*says nowhere where its rows are; give one of hf_hub_url"):
        resolve_dataset("nowhere", registry)
    with pytest.raises(DataError, match="entry 'text' must be an object of attributes, not str"):
        resolve_dataset("text", registry)
    with pytest.raises(DataError, match="unknown dataset 'missing'; .* registers: nowhere, text"):
        resolve_dataset("missing", registry)


def test_unused_malformed_and_hub_entries_never_block_a_local_one(tmp_path: Path):
    entries = {
        "not_an_object": ["rows.json"],
        "typo": {"file_name": "rows.json", "colums": {}},
        "bad_column": {"file_name": "rows.json", "columns": {"promt": "x"}},
        "modelscope": {"ms_hub_url": "AI-ModelScope/x"},
        "cloud": {"cloud_file_name": "s3://bucket/x.json"},
        "hub": {"hf_hub_url": "org/not-reachable"},
        "images": {"file_name": "m.json", "columns": {"images": "images"}},
        "gone": {"file_name": "gone.json"},
        "local": {"file_name": "rows.json"},
    }
    registry = make_registry(tmp_path, entries, {"rows.json": ROWS})
    examples, sources = read_all(["local"], registry)
    assert len(examples) == sources[0]["rows"] == 10


# ---------------------------------------------------------------- 2. file kinds


def write_arrow_stream(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa

    table = pa.Table.from_pylist(rows)
    with pa.ipc.new_stream(str(path), table.schema) as writer:
        writer.write_table(table)


def write_arrow_file(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa

    table = pa.Table.from_pylist(rows)
    with pa.ipc.new_file(str(path), table.schema) as writer:
        writer.write_table(table)


def write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), str(path))


def write_saved_data_file(path: Path, rows: list[dict]) -> None:
    """The .arrow data file that Dataset.save_to_disk writes, on its own."""
    from datasets import Dataset

    Dataset.from_list(rows).save_to_disk(str(path.parent / "saved"))
    (path.parent / "saved" / "data-00000-of-00001.arrow").rename(path)


FILE_WRITERS = {
    "rows.json": lambda path, rows: path.write_text(json.dumps(rows, indent=2)),
    "lines.json": lambda path, rows: path.write_text(jsonl(rows)),
    "rows.jsonl": lambda path, rows: path.write_text(jsonl(rows)),
    "rows.csv": lambda path, rows: path.write_text(
        "instruction,output\n" + "".join(f'"{r["instruction"]}","{r["output"]}"\n' for r in rows)
    ),
    "rows.parquet": write_parquet,
    "stream.arrow": write_arrow_stream,
    "file.arrow": write_arrow_file,
    "saved.arrow": write_saved_data_file,
    "ROWS.JSON": lambda path, rows: path.write_text(json.dumps(rows)),
}


@pytest.mark.parametrize("file_name", list(FILE_WRITERS))
def test_every_file_kind_reads_its_rows_in_order(tmp_path: Path, file_name: str):
    FILE_WRITERS[file_name](tmp_path / file_name, ROWS[:3])
    registry = make_registry(tmp_path, {"mine": {"file_name": file_name}})
    examples, sources = read_all(["mine"], registry)
    assert [turns(e) for e in examples] == [[("user", f"question {i}"), ("assistant", f"answer {i}")] for i in range(3)]
    assert [e["row"] for e in examples] == [0, 1, 2] and sources[0]["rows"] == 3


def test_txt_is_one_plain_text_example_per_line(tmp_path: Path):
    registry = make_registry(
        tmp_path,
        {"wiki": {"file_name": "w.txt", "columns": {"prompt": "text"}}},
        {"w.txt": "First doc.\nSecond doc.\n"},
    )
    examples, _ = read_all(["wiki"], registry, kind="text")
    assert [(e["row"], e["text"]) for e in examples] == [(0, "First doc."), (1, "Second doc.")]


def test_txt_blank_lines_are_not_examples(tmp_path: Path):
    registry = make_registry(
        tmp_path, {"wiki": {"file_name": "w.txt", "columns": {"prompt": "text"}}}, {"w.txt": "One.\n\nTwo.\n"}
    )
    assert [e["text"] for e in read_all(["wiki"], registry, kind="text")[0]] == ["One.", "Two."]


def test_csv_numbers_are_text(tmp_path: Path):
    registry = make_registry(tmp_path, {"sums": {"file_name": "s.csv"}}, {"s.csv": "instruction,output\n1+1,2\n"})
    assert [turns(e) for e in read_all(["sums"], registry)[0]] == [[("user", "1+1"), ("assistant", "2")]]


def test_folder_of_files_of_one_kind(tmp_path: Path):
    (tmp_path / "parts").mkdir()
    write_parquet(tmp_path / "parts" / "a.parquet", ROWS[:2])
    write_parquet(tmp_path / "parts" / "b.parquet", ROWS[2:3])
    (tmp_path / "parts" / "_SUCCESS").write_text("")  # as Spark writes: marker files are not data
    (tmp_path / "parts" / ".a.parquet.crc").write_text("x")
    registry = make_registry(tmp_path, {"parts": {"file_name": "parts"}})
    examples, sources = read_all(["parts"], registry)
    assert [turns(e)[0][1] for e in examples] == ["question 0", "question 1", "question 2"]
    assert sources[0]["file"] == str(tmp_path / "parts")
    before = source_record(resolve_dataset("parts", registry)).sha256
    write_parquet(tmp_path / "parts" / "b.parquet", ROWS[3:4])
    assert source_record(resolve_dataset("parts", registry)).sha256 != before, "a folder's digest covers its files"


def test_folder_written_by_save_to_disk(tmp_path: Path):
    from datasets import Dataset

    Dataset.from_list(ROWS[:4]).save_to_disk(str(tmp_path / "saved"))
    registry = make_registry(tmp_path, {"saved": {"file_name": "saved"}})
    examples, sources = read_all(["saved"], registry)
    assert [turns(e)[1][1] for e in examples] == ["answer 0", "answer 1", "answer 2", "answer 3"]
    assert sources[0]["rows"] == 4


def test_file_digest_changes_with_the_file_and_a_hub_record_with_its_revision(tmp_path: Path):
    registry = make_registry(
        tmp_path,
        {"mine": {"file_name": "rows.json"}, "hub": {"hf_hub_url": "org/x", "subset": "en", "revision": "v1"}},
        {"rows.json": ROWS},
    )
    before = source_record(resolve_dataset("mine", registry))
    assert before.kind == "file" and before.file == str(tmp_path / "rows.json")
    (tmp_path / "rows.json").write_text(json.dumps(ROWS[:9]))
    assert source_record(resolve_dataset("mine", registry)).sha256 != before.sha256
    hub = source_record(resolve_dataset("hub", registry))
    assert (hub.kind, hub.file, hub.subset, hub.revision) == ("hf_hub", "org/x", "en", "v1")
    other = DatasetEntry(name="hub", hf_hub_url="org/x", subset="en", revision="v2")
    assert source_record(other).sha256 != hub.sha256


# ---------------------------------------------------------------- 3. bad inputs and their messages


@pytest.mark.parametrize(
    ("file_name", "content", "columns", "kind", "pattern"),
    [
        (
            "bad.json",
            '[{"instruction": "caf\xe9", "output": "x"}]',
            {},
            "chat",
            r"bad\.json is not UTF-8 text: byte {} \(line 1\)",
        ),
        ("bad.csv", "instruction,output\ncaf\xe9,x\n", {}, "chat", r"bad\.csv is not UTF-8 text: byte {} \(line 2\)"),
        ("bad.txt", "fine\ncaf\xe9\n", {"prompt": "text"}, "text", r"bad\.txt is not UTF-8 text: byte {} \(line 2\)"),
    ],
)
def test_non_utf8_text_names_the_file_and_the_byte(tmp_path, file_name, content, columns, kind, pattern):
    data = content.encode("latin-1")
    registry = make_registry(tmp_path, {"bad": {"file_name": file_name, "columns": columns}}, {file_name: data})
    with pytest.raises(DataError, match="dataset 'bad'.*" + pattern.format(data.index(b"\xe9"))):
        read_all(["bad"], registry, kind=kind)


def test_non_utf8_text_late_in_a_large_jsonl_names_the_file_and_the_byte(tmp_path: Path):
    data = (jsonl([{"instruction": "x" * 100, "output": "y"}] * 1000) + '{"instruction": "caf\xe9"}\n').encode(
        "latin-1"
    )
    assert len(data) > 1 << 16
    offset = data.index(b"\xe9")
    registry = make_registry(tmp_path, {"big": {"file_name": "big.jsonl"}}, {"big.jsonl": data})
    with pytest.raises(DataError, match=rf"big\.jsonl is not UTF-8 text.*byte {offset}"):
        read_all(["big"], registry)


def test_folder_with_folders_inside_is_refused(tmp_path: Path):
    registry = make_registry(tmp_path, {"nest": {"file_name": "nest"}}, {"nest/sub/rows.jsonl": jsonl(ROWS)})
    with pytest.raises(DataError) as error:
        read_all(["nest"], registry)
    assert "dataset 'nest'" in str(error.value)
    assert f"{tmp_path / 'nest'} is a folder with folders inside (sub)" in str(error.value)


@pytest.mark.parametrize(
    ("entry", "files", "message"),
    [
        pytest.param(
            {"file_name": "rows.json", "split": "test"},
            {"rows.json": ROWS},
            r"dataset 'bad'.*split 'test': a file entry has the one split 'train'",
            id="split-other-than-train-on-a-file",
        ),
        pytest.param(
            {"file_name": "mix"},
            {"mix/a.jsonl": jsonl(ROWS[:1]), "mix/b.csv": "instruction,output\nq,a\n"},
            r"dataset 'bad'.*folder .*mix mixes files of kinds csv, json; use one kind",
            id="folder-mixing-kinds",
        ),
        pytest.param(
            {"file_name": "mix"},
            {"mix/a.jsonl": jsonl(ROWS[:1]), "mix/notes.md": "# notes"},
            r"notes\.md in folder .*mix is not one of \.json, \.jsonl",
            id="folder-with-a-file-of-another-kind",
        ),
        pytest.param(
            {"file_name": "obj.json"},
            {"obj.json": json.dumps({"data": ROWS[:2]}, indent=2)},
            r"dataset 'bad'.*obj\.json holds one top-level object; rows are a list",
            id="json-top-level-object",
        ),
        pytest.param(
            {"file_name": "obj.json"},
            {"obj.json": {"data": ROWS[:2]}},
            "holds one top-level object",
            id="json-top-level-object-on-one-line",
        ),
        pytest.param(
            {"file_name": "l.json"},
            {"l.json": [["question", "answer"]]},
            r"dataset 'bad'.*l\.json: row 0 is not an object; rows are objects",
            id="json-row-not-an-object",
        ),
        pytest.param(
            {"file_name": "l.json"},
            {"l.json": [ROWS[0], "answer"]},
            r"l\.json: row 1 is str, not an object",
            id="json-later-row-not-an-object",
        ),
        pytest.param(
            {"file_name": "l.jsonl"},
            {"l.jsonl": jsonl([ROWS[0], "answer"])},
            r"l\.jsonl: line 2 .*not an object",
            id="json-lines-line-not-an-object",
        ),
        pytest.param(
            {"file_name": "bad.json"},
            {"bad.json": '[\n  {"instruction": "a", "output": "A"},\n  {"instruction": "b" "output": "B"}\n]\n'},
            r"bad\.json: not valid JSON at line 3, column 23: Expecting ',' delimiter",
            id="json-syntax-error-with-line-and-column",
        ),
        pytest.param(
            {"file_name": "bad.jsonl"},
            {"bad.jsonl": '{"instruction": "a", "output": "A"}\n{"instruction": "b", "output": }\n'},
            r"bad\.jsonl: line 2 is not valid JSON: Expecting value",
            id="json-lines-syntax-error-with-line",
        ),
        pytest.param(
            {"file_name": "t.json", "formatting": "sharegpt", "columns": {"tools": "tools"}},
            {
                "t.json": [
                    {
                        "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}],
                        "tools": "[{broken",
                    }
                ]
            },
            r"dataset 'bad'.*row 0: 'tools' \(tools\) is not JSON",
            id="sharegpt-tools-not-json",
        ),
    ],
)
def test_a_source_that_does_not_hold_rows_is_refused_naming_where(
    tmp_path: Path, entry: dict, files: dict, message: str
):
    registry = make_registry(tmp_path, {"bad": entry}, files)
    with pytest.raises(DataError, match=message):
        read_all(["bad"], registry)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"instruction": "Q", "output": 3}, "'output' (response) must be text, got int"),
        ({"instruction": ["Q"], "output": "A"}, "'instruction' (prompt) must be text, got list"),
        ({"instruction": "Q"}, "no 'output' (response) text (its columns: instruction)"),
        ({"instruction": "Q", "output": "A", "history": "hi"}, "history must be a list of [prompt, response] pairs"),
        (
            {"instruction": "Q", "output": "A", "history": [["hi", None]]},
            "history turn 0: the response must be text, got NoneType",
        ),
        (
            {"instruction": "Q", "output": "A", "history": [["a", "b"], [2, "c"]]},
            "history turn 1: the prompt must be text, got int",
        ),
    ],
)
def test_value_of_the_wrong_type_names_dataset_row_and_column(tmp_path: Path, row: dict, message: str):
    entry = {"file_name": "w.json", "columns": {"history": "history"}}
    registry = make_registry(tmp_path, {"typed": entry}, {"w.json": [ROWS[0], row]})
    with pytest.raises(DataError) as error:
        read_all(["typed"], registry)
    assert f"dataset 'typed' ({registry}), row 1: {message}" in str(error.value)


def test_unknown_file_suffix_is_refused(tmp_path: Path):
    registry = make_registry(tmp_path, {"xml": {"file_name": "rows.xml"}}, {"rows.xml": "<rows/>"})
    with pytest.raises(DataError) as error:
        read_all(["xml"], registry)
    assert "dataset 'xml'" in str(error.value) and "files of kind '.xml' cannot be read" in str(error.value)
    assert "allowed: .json, .jsonl, .csv, .parquet, .arrow, .txt" in str(error.value)


def test_missing_file_is_refused(tmp_path: Path):
    registry = make_registry(tmp_path, {"gone": {"file_name": "gone.json"}})
    with pytest.raises(DataError, match=rf"dataset 'gone'.*file {tmp_path / 'gone.json'} does not exist"):
        read_all(["gone"], registry)
    with pytest.raises(DataError, match="does not exist"):
        source_record(resolve_dataset("gone", registry))


def test_json_lines_keep_unicode_line_separators_inside_strings(tmp_path: Path):
    """U+2028 and U+0085 may stand unescaped in a JSON string; only a newline ends a JSON Lines row."""
    first = '{"instruction": "a\u2028b", "output": "c\u0085d"}'  # the separators stand unescaped
    text = first + '\n{"instruction": "e", "output": }\n'
    registry = make_registry(tmp_path, {"sep": {"file_name": "sep.jsonl"}}, {"sep.jsonl": text})
    with pytest.raises(DataError, match=r"sep\.jsonl: line 2 is not valid JSON: Expecting value"):
        read_all(["sep"], registry)
    (tmp_path / "sep.jsonl").write_text(first + "\n", encoding="utf-8")
    (example,) = read_all(["sep"], registry)[0]
    assert turns(example) == [("user", "a\u2028b"), ("assistant", "c\u0085d")]


def assert_empty_is_reported(registry: str, file: str) -> None:
    """An empty source either reads as no rows (the check before stage one then says so) or says it is empty."""
    try:
        _, sources = read_all(["empty"], registry)
    except DataError as exc:
        assert re.search(rf"{re.escape(file)}.*(empty|no rows)", str(exc)), str(exc)
    else:
        assert sources[0]["rows"] == 0


@pytest.mark.parametrize("content", [pytest.param("", id="empty-file"), pytest.param([], id="empty-list")])
def test_an_empty_source_reads_as_no_rows_or_says_it_is_empty(tmp_path: Path, content: str | list):
    registry = make_registry(tmp_path, {"empty": {"file_name": "e.json"}}, {"e.json": content})
    assert_empty_is_reported(registry, "e.json")


def sharegpt_registry(tmp_path: Path, conversation: list[dict]) -> str:
    return make_registry(
        tmp_path,
        {"chat": {"file_name": "c.json", "formatting": "sharegpt"}},
        {"c.json": [{"conversations": conversation}]},
    )


@pytest.mark.parametrize(
    ("conversation", "message"),
    [
        (
            [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}, {"from": "gpt", "value": "c"}],
            "row 0, turn 1: 'human' where an assistant or function-call turn was expected (turns alternate)",
        ),
        (
            [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}],
            "row 0, turn 0: 'gpt' where a user or observation turn was expected (turns alternate)",
        ),
        (
            [{"from": "human", "value": "a"}, {"from": "system", "value": "s"}, {"from": "gpt", "value": "b"}],
            "row 0, turn 1: 'system' where an assistant or function-call turn was expected",
        ),
        (
            [{"from": "user", "value": "a"}, {"from": "gpt", "value": "b"}],
            "row 0, turn 0: role 'user' is not one of 'human', 'gpt', 'observation', 'function_call', 'system'",
        ),
        (
            [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"}],
            "row 0: the conversation must end with the assistant's turn",
        ),
    ],
)
def test_sharegpt_turns_out_of_order_name_row_and_turn(tmp_path: Path, conversation: list, message: str):
    with pytest.raises(DataError) as error:
        read_all(["chat"], sharegpt_registry(tmp_path, conversation))
    assert "dataset 'chat'" in str(error.value) and message in str(error.value)


def test_function_call_that_is_not_json_is_refused(tmp_path: Path):
    conversation = [
        {"from": "human", "value": "weather?"},
        {"from": "function_call", "value": "get_weather(city='Paris')"},
        {"from": "observation", "value": "sunny"},
        {"from": "gpt", "value": "Sunny."},
    ]
    with pytest.raises(DataError) as error:
        read_all(["chat"], sharegpt_registry(tmp_path, conversation))
    assert error.value.reason == "function call not JSON"
    assert "dataset 'chat'" in str(error.value) and "row 0, turn 1: the function call is not JSON" in str(error.value)


# ---------------------------------------------------------------- 4. tool calling


def glaive_examples() -> list[dict]:
    return read_all(["glaive_toolcall_en_demo"], str(SHARED_REGISTRY))[0]


@needs_llamafactory_data
def test_glaive_function_calls_become_tool_calls_and_observations_tool_messages():
    examples = glaive_examples()
    assert len(examples) == 300
    with_calls = [e for e in examples if any("tool_calls" in m for m in e["messages"])]
    assert len(with_calls) > 50
    for example in with_calls:
        assert example["tools"] and all(tool["type"] == "function" for tool in example["tools"])
        messages = example["messages"]
        for position, message in enumerate(messages):
            if message["role"] == "tool":  # an observation answers the call just before it
                assert "tool_calls" in messages[position - 1]
            for call in message.get("tool_calls", []):
                assert message["role"] == "assistant" and message["content"] == ""
                assert call["type"] == "function" and isinstance(call["function"]["name"], str)
                assert call["function"]["name"] in {tool["function"]["name"] for tool in example["tools"]}
    raw = json.loads((SHARED / "glaive_toolcall_en_demo.json").read_text())[0]
    call = json.loads(next(turn["value"] for turn in raw["conversations"] if turn["from"] == "function_call"))
    first_call = next(m for m in examples[0]["messages"] if "tool_calls" in m)
    assert first_call["tool_calls"] == [{"type": "function", "function": call}]


def test_template_supports_tools(tokenizer):
    assert template_supports_tools(tokenizer.chat_template) is False
    assert template_supports_tools(CHATML_TOOLS.read_text()) is True
    assert template_supports_tools(None) is False
    assert template_supports_tools("{% if %}") is False


@needs_llamafactory_data
def test_chatml_tools_supervises_calls_and_answers_but_not_observations(tokenizer):
    chatml = copy.deepcopy(tokenizer)
    chatml.chat_template = CHATML_TOOLS.read_text()
    example = next(e for e in glaive_examples() if any("tool_calls" in m for m in e["messages"]))
    ids, labels = encode_conversation(chatml, example["messages"], tools=example["tools"])
    spans, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            spans.append(chatml.decode(current))
            current = []
    if current:
        spans.append(chatml.decode(current))
    answers = [m for m in example["messages"] if m["role"] == "assistant"]
    assert len(spans) == len(answers), "one supervised span per assistant turn"
    for span, answer in zip(spans, answers, strict=True):
        if answer.get("tool_calls"):
            name = answer["tool_calls"][0]["function"]["name"]
            assert span.startswith(f'<tool_call>{{"name": "{name}", "arguments": ') and "</tool_call>" in span
        else:
            assert span.startswith(answer["content"])
        assert span.rstrip().endswith("<|im_end|>")
    supervised = "".join(spans)
    for message in example["messages"]:
        if message["role"] in ("tool", "user"):
            assert message["content"] not in supervised
    assert "You can call these functions" not in supervised
    assert "You can call these functions" in chatml.decode(ids), "the tools are in the prompt"


# ---------------------------------------------------------------- 5. placeholders


def test_placeholders_other_than_template_values_stay_text(tmp_path: Path):
    row = {"instruction": "Fill <MASK> in <T>x</T>; keep {{x}}. Who are you?", "output": "I am <NAME> by {{author}}."}
    registry = make_registry(tmp_path, {"p": {"file_name": "p.json"}}, {"p.json": [row]})
    (example,) = read_all(["p"], registry)[0]
    assert turns(example) == [
        ("user", "Fill <MASK> in <T>x</T>; keep {{x}}. Who are you?"),
        ("assistant", "I am Nova by Acme."),
    ]


def test_name_placeholder_without_a_value_names_dataset_and_row(tmp_path: Path):
    rows = [{"instruction": "hi", "output": "hello"}, {"instruction": "Who are you?", "output": "I am <NAME>."}]
    registry = make_registry(tmp_path, {"who": {"file_name": "who.json"}}, {"who.json": rows})
    with pytest.raises(DataError) as error:
        read_all(["who"], registry, values={"author": "Acme"})
    assert error.value.reason == "placeholder without a value"
    message = str(error.value)
    assert "dataset 'who'" in message and "row 1" in message and "<NAME> has no value" in message
    assert "dataset.template_vars.name" in message


# ---------------------------------------------------------------- 6. on_bad_row


def template_job(registry: str, on_bad_row: str, out: Path) -> TemplateJob:
    return TemplateJob(
        names=["mixed"], registry=registry, kind="chat", template_vars={}, max_samples=None, shuffle=False, seed=0,
        val_size=0.25, preview_rows=2, on_bad_row=on_bad_row, num_proc=1, scratch_dir=str(out / "scratch"),
        out=str(out),
    )  # fmt: skip


def events(output: str) -> list[dict]:
    prefix = "@@tunefactory "
    return [json.loads(line[len(prefix) :]) for line in output.splitlines() if line.startswith(prefix)]


def test_on_bad_row_error_or_skip_and_count_per_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from datasets import load_from_disk

    rows = [dict(row) for row in ROWS[:6]]
    rows[1]["output"] = 3
    rows[4] = {"instruction": "question 4"}
    registry = make_registry(tmp_path / "data", {"mixed": {"file_name": "rows.json"}}, {"rows.json": rows})
    with pytest.raises(DataError) as error:
        template(template_job(registry, "error", tmp_path / "error"))
    message = str(error.value)
    assert "dataset 'mixed'" in message and "row 1: 'output' (response) must be text, got int" in message
    assert "dataset.on_bad_row: skip" in message
    capsys.readouterr()
    template(template_job(registry, "skip", tmp_path / "skip"))
    (event,) = [e for e in events(capsys.readouterr().out) if e["type"] == "templated"]
    assert event["skipped"] == {"mixed: response not text": 1, "mixed: no response text": 1}
    assert (event["rows"], event["train_rows"], event["val_rows"]) == (4, 3, 1)
    assert event["sources"][0]["rows"] == 6 and event["sources"][0]["skipped"] == 2
    assert [p["row"] for p in event["preview"]] == [2, 3]
    written = {split: load_from_disk(str(tmp_path / "skip" / split)) for split in ("train", "val")}
    assert sorted([*written["train"]["row"], *written["val"]["row"]]) == [0, 2, 3, 5]
    assert json.loads(written["train"][0]["messages"]) == [
        {"role": "user", "content": "question 2"},
        {"role": "assistant", "content": "answer 2"},
    ]


# ---------------------------------------------------------------- 7. LLaMA-Factory's own registry


def test_missing_llamafactory_data_fails_in_ci_and_is_skipped_elsewhere_saying_where(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """CI has ../shared/llamafactory-data: a test that needs it must not pass there by skipping."""
    missing = tmp_path / "llamafactory-data"
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=f"LLaMA-Factory's data is not at {re.escape(str(missing))} "):
        llamafactory_data_or_fail_in_ci(missing)
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match=f"LLaMA-Factory's data is not at {re.escape(str(missing))} "):
        llamafactory_data_or_fail_in_ci(missing)
    make_registry(missing, {})
    assert llamafactory_data_or_fail_in_ci(missing) == missing


def stage_kind(entry: DatasetEntry) -> str:
    if entry.ranking:
        return "pairs"
    if "kto_tag" in entry.columns:
        return "feedback"
    return "text" if entry.columns.get("prompt") == "text" else "chat"


@needs_llamafactory_data
def test_every_entry_of_llamafactorys_registry_reads_or_says_why_not():
    registry = str(SHARED_REGISTRY)
    entries = load_registry(registry)
    assert len(entries) == 104
    read, absent, refused, hub = [], [], [], []
    for name, fields in entries.items():
        media = [column for column in ("images", "videos", "audios") if column in fields.get("columns", {})]
        if media:
            with pytest.raises(DataError, match=rf"dataset '{name}'.*has an? {media[0]} column"):
                resolve_dataset(name, registry)
            refused.append(name)
            continue
        if "hf_hub_url" not in fields and "file_name" not in fields:  # a ModelScope-only entry
            with pytest.raises(DataError, match=rf"dataset '{name}'.*needs the modelscope package"):
                resolve_dataset(name, registry)
            refused.append(name)
            continue
        entry = resolve_dataset(name, registry)
        if "hf_hub_url" in fields:
            assert entry.source() == ("hf_hub", fields["hf_hub_url"]), name
            hub.append(name)
            continue
        assert entry.source() == ("file", fields["file_name"]), name
        if not (SHARED / fields["file_name"]).exists():
            with pytest.raises(DataError, match=rf"dataset '{name}'.*does not exist"):
                peek_examples([name], registry, VALUES, stage_kind(entry))
            absent.append(name)
            continue
        examples, sources = peek_examples([name], registry, VALUES, stage_kind(entry))
        assert examples and sources[0]["rows"] > 0, name
        read.append(name)
    check_paths_in_registry("dataset.names", list(entries), registry)  # every entry reads beside the registry
    assert sorted(read) == sorted(
        ["identity", "alpaca_en_demo", "glaive_toolcall_en_demo", "dpo_en_demo", "kto_en_demo", "wiki_demo", "c4_demo"]
    )
    assert sorted(absent) == ["alpaca_zh_demo", "dpo_zh_demo", "glaive_toolcall_zh_demo"]
    assert "mllm_demo" in refused and "deepctrl" in refused
    assert len(read) + len(absent) + len(refused) + len(hub) == 104


@needs_llamafactory_data
def test_llamafactorys_identity_set_fills_its_placeholders():
    examples, sources = read_all(["identity"], str(SHARED_REGISTRY))
    assert len(examples) == sources[0]["rows"] == 91
    answers = " ".join(turns(e)[-1][1] for e in examples)
    assert "Nova" in answers and "Acme" in answers and "{{" not in answers


@needs_llamafactory_data
def test_preview_of_a_hub_entry_offline_says_it_needs_the_hub(tmp_path: Path):
    spec = tmp_path / "spec.yaml"
    dataset = {"registry": str(SHARED_REGISTRY), "names": ["alpaca_en"]}
    spec.write_text(yaml.safe_dump({"workspace": str(tmp_path / "workspace"), "dataset": dataset}))
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # an empty cache
    env = {key: value for key, value in os.environ.items() if key != "HF_DATASETS_CACHE"}
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "preview", str(spec)],
        env={**env, **offline},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    assert "dataset 'alpaca_en'" in result.stderr
    assert "hf_hub_url 'llamafactory/alpaca_en' needs the Hugging Face Hub" in result.stderr
    assert "offline" in result.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "is a folder; dataset.registry names its dataset_info.json"),
        (b'[{"file_name": "a.json"}]', "the top level must be an object of entries by name, not list"),
        ('{"a": {"file_name": "caf\u00e9.json"}}'.encode("latin-1"), "not UTF-8 text (byte 24)"),
        (b'{"a": {"file_name": "a.json"},}', "not valid JSON at line 1"),
    ],
)
def test_a_registry_that_is_not_an_object_of_entries_is_named(tmp_path: Path, content: bytes | None, message: str):
    registry = tmp_path / "dataset_info.json"
    if content is None:
        registry.mkdir()
    else:
        registry.write_bytes(content)
    with pytest.raises(DataError) as error:
        load_registry(registry)
    assert str(error.value).startswith(f"{registry}: {message}")


# ---------------------------------------------------------------- 8. paths stay beside the registry

SECRET = [{"instruction": "the secret in a file of someone else's", "output": "x"}]


def registry_with_escapes(tmp_path: Path) -> str:
    """A registry whose entries read beside it (plain, in a subfolder, through a link inside) or
    elsewhere (by '..', an absolute path, a link, a link inside a data folder, a script or hub folder)."""
    elsewhere = tmp_path / "home" / "notes.json"
    elsewhere.parent.mkdir(parents=True)
    elsewhere.write_text(json.dumps(SECRET))
    registry = make_registry(
        tmp_path / "reg",
        {
            "plain": {"file_name": "rows.json"},
            "nested": {"file_name": "sub/rows.json"},
            "linked_inside": {"file_name": "alias.json"},
            "dotdot": {"file_name": "../home/notes.json"},
            "absolute": {"file_name": str(elsewhere)},
            "linked_out": {"file_name": "notes.json"},
            "folder_linking_out": {"file_name": "parts"},
            "script_out": {"script_url": "../home"},
            "hub_folder_out": {"hf_hub_url": str(elsewhere.parent)},
        },
        {"rows.json": ROWS, "sub/rows.json": ROWS, "parts/a.json": ROWS},
    )
    folder = Path(registry).parent
    (folder / "alias.json").symlink_to("sub/rows.json")
    (folder / "notes.json").symlink_to(elsewhere)
    (folder / "parts" / "b.json").symlink_to(elsewhere)
    return registry


def validate(tmp_path: Path, capsys, dataset: dict, **sections) -> tuple[int, str]:
    """`tunefactory validate` on a spec of these sections: its exit status and what it printed."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"workspace": str(tmp_path / "ws"), "dataset": dataset, **sections}))
    from flows.cli import main

    status = main(["validate", str(spec)])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


@pytest.mark.parametrize(
    ("name", "attribute", "value"),
    [
        ("dotdot", "file_name", "'../home/notes.json'"),
        ("absolute", "file_name", "'{home}/notes.json'"),
        ("linked_out", "file_name", "'notes.json'"),
        ("folder_linking_out", "file_name", "'parts'"),
        ("script_out", "script_url", "'../home'"),
        ("hub_folder_out", "hf_hub_url", "'{home}'"),
    ],
)
def test_a_dataset_reading_outside_its_registry_folder_is_refused_when_the_spec_is_validated(
    tmp_path: Path, capsys, name: str, attribute: str, value: str
):
    registry = registry_with_escapes(tmp_path)
    status, output = validate(tmp_path, capsys, {"registry": registry, "names": ["plain", name]})
    home = (tmp_path / "home").resolve()
    assert status == 2 and "Traceback" not in output, output
    assert (
        f"dataset.names: {registry}: entry {name!r}: {attribute} {value.format(home=tmp_path / 'home')} reads '{home}"
        in output
    ), output
    assert f"outside the registry's folder {Path(registry).parent.resolve()}" in output
    assert "set dataset.allow_paths_outside_registry: true" in output
    assert SECRET[0]["instruction"] not in output


def test_datasets_beside_the_registry_validate_and_the_named_setting_allows_paths_outside(tmp_path: Path, capsys):
    registry = registry_with_escapes(tmp_path)
    status, output = validate(tmp_path, capsys, {"registry": registry, "names": ["plain", "nested", "linked_inside"]})
    assert status == 0, output
    opted_in = {"registry": registry, "names": ["dotdot", "linked_out"], "allow_paths_outside_registry": True}
    status, output = validate(tmp_path, capsys, opted_in)
    assert status == 0, output
    examples, _ = peek_examples(["dotdot"], registry, VALUES)
    assert turns(examples[0])[0] == ("user", SECRET[0]["instruction"])


@pytest.mark.parametrize(
    ("sections", "key"),
    [
        ({"train": {"datasets": ["plain", "dotdot"]}}, "train.datasets"),
        ({"then": {"more": {"datasets": ["absolute"]}}}, "then.more.datasets"),
        ({"evaluate": {"sets": [{"dataset": "linked_out", "scorer": "contains_any"}]}}, "evaluate.sets.0.dataset"),
        ({"evaluate": {"identity_prompts": "dotdot"}}, "evaluate.identity_prompts"),
    ],
)
def test_a_stage_dataset_or_an_evaluation_set_reading_outside_is_refused_naming_its_key(
    tmp_path: Path, capsys, sections: dict, key: str
):
    registry = registry_with_escapes(tmp_path)
    status, output = validate(tmp_path, capsys, {"registry": registry, "names": ["plain"]}, **sections)
    assert status == 2 and f"{key}: {registry}: entry " in output and "Traceback" not in output, output


def test_a_flow_run_sent_through_the_prefect_api_is_refused_by_its_parameter_validation(tmp_path: Path):
    from prefect.exceptions import ParameterTypeError

    from flows.pipeline import finetune

    registry = registry_with_escapes(tmp_path)
    spec = {"workspace": str(tmp_path / "ws"), "dataset": {"registry": registry, "names": ["dotdot"]}}
    with pytest.raises(ParameterTypeError, match="entry 'dotdot': file_name '../home/notes.json'"):
        finetune.validate_parameters({"spec": spec})

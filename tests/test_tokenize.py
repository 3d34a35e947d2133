"""Label masks: the loss falls on assistant turns only, with SmolLM2's real chat template."""

from __future__ import annotations

from tasks.components.chat_encoding import IGNORE_INDEX, encode_conversation, tokenize_examples

CONVERSATION = [
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": "I am Nova."},
    {"role": "user", "content": "Who built you?"},
    {"role": "assistant", "content": "Acme Labs built me."},
]


def supervised_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])


def test_only_assistant_turns_are_supervised(tokenizer):
    ids, labels = encode_conversation(tokenizer, CONVERSATION)
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert tokenizer.decode(ids) == rendered
    assert supervised_text(tokenizer, ids, labels) == "I am Nova.<|im_end|>\nAcme Labs built me.<|im_end|>\n"
    prompt_part = tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label == IGNORE_INDEX])
    assert "Who are you?" in prompt_part and "Who built you?" in prompt_part
    assert "I am Nova" not in prompt_part


def test_train_on_prompt_supervises_everything(tokenizer):
    ids, labels = encode_conversation(tokenizer, CONVERSATION, train_on_prompt=True)
    assert labels == ids


def test_cutoff_truncates_and_drops_examples_left_without_answers(tokenizer):
    examples = [
        {"messages": CONVERSATION},
        {"messages": [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok"}]},
    ]
    columns, stats = tokenize_examples(tokenizer, examples, cutoff_len=40, train_on_prompt=False)
    assert stats["truncated"] == 2
    assert stats["dropped"] == 1
    assert stats["examples"] == 1 and all(len(ids) == 40 for ids in columns["input_ids"])
    assert stats["supervised_tokens"] == sum(label != IGNORE_INDEX for label in columns["labels"][0])


def test_rendering_matches_apply_chat_template_prefix_by_prefix(tokenizer):
    """The encoder renders the compiled template itself; the text is the library's, with and without tools."""
    from pathlib import Path

    from tasks.components.chat_encoding import render

    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    calls = [{"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]
    conversation = [
        {"role": "system", "content": "Be brief."},
        *CONVERSATION,
        {"role": "user", "content": "1+2?"},
        {"role": "assistant", "content": "", "tool_calls": calls},
        {"role": "tool", "content": "3"},
        {"role": "assistant", "content": "3."},
    ]
    chatml_tools = (Path(__file__).resolve().parents[1] / "data" / "chat_templates" / "chatml_tools.jinja").read_text()
    for template in (tokenizer.chat_template, chatml_tools):
        copy = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
        copy.chat_template = template
        for end in range(1, len(conversation) + 1):
            for generation_prompt in (False, True):
                expected = copy.apply_chat_template(
                    conversation[:end], tools=tools, tokenize=False, add_generation_prompt=generation_prompt
                )
                assert render(copy, conversation[:end], generation_prompt, tools) == expected


def test_two_processes_template_and_tokenize_exactly_what_one_does(tiny_model, tmp_path, monkeypatch, capsys):
    """`num_proc` changes how fast, never what is written: the same rows, ids and labels, in the same order."""
    from datasets import load_from_disk

    import tasks.workers.data as worker

    monkeypatch.setattr(worker, "ROWS_PER_PROCESS", 50)  # the demo's 220 rows in 2 processes
    written = {}
    for procs in (1, 2):
        out = tmp_path / f"procs-{procs}"
        common = {"num_proc": procs, "scratch_dir": str(tmp_path / "scratch")}
        worker.template(
            worker.TemplateJob(
                names=["self_cognition", "general_chat"],
                registry=None,
                kind="chat",
                template_vars={"name": "Nova", "author": "Acme"},
                max_samples=None,
                shuffle=True,
                seed=1,
                val_size=0.1,
                preview_rows=1,
                on_bad_row="error",
                out=str(out / "templated"),
                **common,
            )  # fmt: skip
        )
        worker.tokenize(
            worker.TokenizeJob(
                templated=str(out / "templated"),
                model_path=str(tiny_model),
                trust_remote_code=False,
                kind="chat",
                cutoff_len=128,
                train_on_prompt=False,
                out=str(out / "tokenized"),
                **common,
            )  # fmt: skip
        )
        written[procs] = {split: load_from_disk(str(out / "tokenized" / split)).to_dict() for split in ("train", "val")}
    assert written[1] == written[2]
    assert len(written[2]["train"]["input_ids"]) > 150
    assert "tokenized" in capsys.readouterr().out

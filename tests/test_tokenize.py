"""Label masks: the loss falls on assistant turns only, with SmolLM2's real chat template."""

from __future__ import annotations

from tasks.tokenize_dataset import IGNORE_INDEX, encode_conversation, tokenize_examples

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

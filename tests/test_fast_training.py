"""The fast training path: packed rows keep examples apart and learn what padded batches learn."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from tasks.components.chat_encoding import tokenize_examples
from tasks.components.modeling import IGNORE_INDEX, load_model, pad_batch, supervised_loss
from tasks.components.packing import pack_rows, packed_batch, padded_batch
from tasks.contracts.spec_sections import TrainSpec
from tasks.contracts.worker_configs import TrainJob, Weights
from tasks.dataset.jsonl import read_jsonl


def chat_examples(count: int) -> list[dict]:
    rng = random.Random(3)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while"]
    words += ["Nova", "from", "Acme", "Labs", "explains", "packing"]
    return [
        {
            "messages": [
                {"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(2, 12)))},
                {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(3, 30)))},
            ]
        }
        for _ in range(count)
    ]


def test_pack_rows_places_every_example_once_within_capacity():
    lengths = [random.Random(i).randint(1, 90) for i in range(57)] + [130]
    rows = pack_rows(lengths, capacity=100)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert [57] in rows, "an example longer than a row gets a row to itself"
    assert all(sum(lengths[i] for i in row) <= 100 for row in rows if row != [57])
    assert len(rows) <= sum(lengths) / 100 + 3, "first fit leaves little room unused"


def test_packed_examples_see_only_themselves(tiny_model: Path, tokenizer):
    """Each example's loss and logits are the same packed into one row as alone in its own row."""
    columns, _ = tokenize_examples(tokenizer, chat_examples(6), cutoff_len=128, train_on_prompt=True)
    seqs, labels = columns["input_ids"], columns["labels"]
    model = load_model(tiny_model).eval()
    with torch.no_grad():
        ids, positions, target = packed_batch(seqs, labels, capacity=10_000, pad_id=0, multiple=64)
        assert ids.shape == (1, 64 * -(-sum(map(len, seqs)) // 64)), "one row, width rounded up to 64"
        packed_sum, packed_count = supervised_loss(model, ids, None, target, positions)
        packed_logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0]
        alone_sum, alone_count = 0.0, 0
        start = 0
        order = pack_rows([len(s) for s in seqs], 10_000)[0]
        for i in order:
            row_ids, row_mask, row_target = pad_batch([seqs[i]], [labels[i]], 0)
            loss, count = supervised_loss(model, row_ids, row_mask, row_target)
            alone_sum, alone_count = alone_sum + float(loss), alone_count + count
            alone_logits = model(input_ids=row_ids).logits[0]
            torch.testing.assert_close(packed_logits[start : start + len(seqs[i])], alone_logits, atol=1e-4, rtol=1e-4)
            assert positions[0, start] == 0 and target[0, start] == IGNORE_INDEX
            start += len(seqs[i])
    assert packed_count == alone_count, "with train_on_prompt, no example's first token is a target"
    assert float(packed_sum) == pytest.approx(alone_sum, rel=1e-5)


def test_padded_rows_need_no_attention_mask(tiny_model: Path, tokenizer):
    columns, _ = tokenize_examples(tokenizer, chat_examples(5), cutoff_len=128, train_on_prompt=False)
    model = load_model(tiny_model).eval()
    with torch.no_grad():
        ids, mask, target = pad_batch(columns["input_ids"], columns["labels"], 0)
        masked, count = supervised_loss(model, ids, mask, target)
        ids, target = padded_batch(columns["input_ids"], columns["labels"], 0, multiple=64)
        assert ids.shape[1] % 64 == 0
        unmasked, same_count = supervised_loss(model, ids, None, target)
    assert same_count == count
    assert float(unmasked) == pytest.approx(float(masked), rel=1e-5)


def run_train_worker(tiny_model: Path, tokenizer, out: Path, **train) -> list[dict]:
    from datasets import Dataset

    from tasks.workers import train as train_worker

    columns, _ = tokenize_examples(tokenizer, chat_examples(24), cutoff_len=128, train_on_prompt=False)
    Dataset.from_dict(columns).save_to_disk(str(out / "data" / "train"))
    spec = TrainSpec(num_epochs=2, batch_size=6, learning_rate=2e-3, logging_steps=1, lora={"rank": 4, "alpha": 8})
    config = TrainJob(
        **spec.model_copy(update=train).model_dump(),
        start=Weights(model_dir=str(tiny_model)),
        tokenizer_path=str(tiny_model),
        dataset_dir=str(out / "data"),
        output_dir=str(out / "train"),
        cutoff_len=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    train_worker.train(config)
    return read_jsonl(out / "train" / "loss_history.jsonl")


def test_packed_training_learns_what_padded_training_learns(tiny_model: Path, tokenizer, tmp_path: Path, capsys):
    padded = run_train_worker(tiny_model, tokenizer, tmp_path / "padded", packing=False)
    packed = run_train_worker(tiny_model, tokenizer, tmp_path / "packed", packing=True, gradient_checkpointing=True)
    assert len(packed) == len(padded) == 8
    assert padded[-1]["loss"] < padded[0]["loss"], "it learned"
    for a, b in zip(padded, packed, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3), f"step {a['step']}"
    events = [json.loads(line.split(" ", 1)[1]) for line in capsys.readouterr().out.splitlines() if "@@" in line]
    starts = [e for e in events if e["type"] == "start"]
    assert [e["packing"] for e in starts] == [False, True]
    assert [e["gradient_checkpointing"] for e in starts] == [False, True]
    done = [e["metrics"] for e in events if e["type"] == "done"]
    columns, _ = tokenize_examples(tokenizer, chat_examples(24), cutoff_len=128, train_on_prompt=False)
    real_tokens = 2 * sum(map(len, columns["input_ids"]))  # 2 epochs, padding not counted
    assert done[0]["train_tokens"] == done[1]["train_tokens"] == real_tokens
    assert all(d["train_tokens_per_second"] > 0 and d["peak_memory_mb"] > 0 for d in done)

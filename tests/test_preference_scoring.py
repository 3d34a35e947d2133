"""`evaluate.preferences`: how often a model finds the chosen answer likelier per token than the
rejected one, computed in batches and checked against a plain forward pass of each answer alone."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tasks.components.preference_scoring import preference_scores
from tasks.dataset.registry import DataError
from tasks.stages.evaluate import preference_pairs

VALUES = {"name": "Nova", "author": "Acme Labs"}


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model).eval(), AutoTokenizer.from_pretrained(tiny_model)


def loss_per_answer_token(model, tokenizer, messages, answer: str) -> float:
    """The answer's mean negative log-likelihood, from one unpadded forward pass of the whole chat."""
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": answer}], tokenize=False)
    full = prompt + full[len(prompt) :].rstrip()
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    ids = tokenizer(full, add_special_tokens=False).input_ids
    assert ids[: len(prompt_ids)] == prompt_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    logprobs = torch.log_softmax(logits[:-1].double(), dim=-1)
    answer = range(len(prompt_ids), len(ids))
    return -sum(logprobs[position - 1, ids[position]].item() for position in answer) / len(answer)


def test_the_share_and_margin_are_those_of_each_answer_scored_alone(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    pairs = preference_pairs("identity_preference", None, VALUES) + preference_pairs("chat_preference", None, VALUES)
    assert len(pairs) >= 8 and "Nova" in pairs[0].chosen
    gaps = [
        loss_per_answer_token(model, tokenizer, p.messages, p.rejected)
        - loss_per_answer_token(model, tokenizer, p.messages, p.chosen)
        for p in pairs
    ]
    for batch_size in (1, 5):
        metrics = preference_scores(model, tokenizer, pairs, batch_size, torch.device("cpu"))
        assert metrics["preference_accuracy"] == sum(g > 0 for g in gaps) / len(gaps)
        assert metrics["preference_accuracy_n"] == len(pairs)
        assert metrics["preference_margin"] == pytest.approx(sum(gaps) / len(gaps), abs=1e-5)
        spread = math.sqrt(sum((g - sum(gaps) / len(gaps)) ** 2 for g in gaps) / (len(gaps) - 1))
        assert metrics["preference_margin_stderr"] == pytest.approx(spread / math.sqrt(len(gaps)), abs=1e-5)

    swapped = [p.model_copy(update={"chosen": p.rejected, "rejected": p.chosen}) for p in pairs]
    flipped = preference_scores(model, tokenizer, swapped, 4, torch.device("cpu"))
    assert flipped["preference_accuracy"] == pytest.approx(1 - metrics["preference_accuracy"])
    assert flipped["preference_margin"] == pytest.approx(-metrics["preference_margin"], abs=1e-5)


def test_a_set_that_is_not_preferences_or_has_a_bad_row_is_refused_naming_it(tmp_path):
    rows = [{"instruction": "Hi", "input": "", "chosen": "Hello.", "rejected": 3}]
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    registry = tmp_path / "dataset_info.json"
    registry.write_text(json.dumps({"pairs": {"file_name": "pairs.json", "ranking": True}}))
    with pytest.raises(DataError, match=r"^evaluate.preferences \(pairs\): .*row 0"):
        preference_pairs("pairs", str(registry), VALUES)
    with pytest.raises(DataError, match=r"^evaluate.preferences \(self_cognition\): .*not a preference dataset"):
        preference_pairs("self_cognition", None, VALUES)
    (tmp_path / "pairs.json").write_text("[]")
    with pytest.raises(DataError, match=r"^evaluate.preferences \(pairs\): "):
        preference_pairs("pairs", str(registry), VALUES)

"""How a model ranks two answers to one conversation: the measure of held-out feedback.

A model prefers the answer it finds likelier per token given the conversation (its mean
log-likelihood over the answer's tokens, the end-of-turn token included): per token, so that
length alone does not decide. Over a preference set (chosen: the answer users rated up, or their
correction; rejected: the answer rated down), `preference_accuracy` is the share of pairs the
model ranks as users did (a tie counts against it), with its sample size for a Wilson interval,
and `preference_margin` the mean gap in nats per token (rejected minus chosen loss: positive
where the chosen answer is likelier), with its standard error across pairs.
"""

from __future__ import annotations

import math
from typing import Any

from tasks.components.chat_encoding import encode_texts, labelled, render_answer
from tasks.components.modeling import batched_example_losses
from tasks.contracts.worker_configs import PreferencePair


def encoded_answer(tokenizer: Any, messages: list[dict[str, Any]], answer: str) -> tuple[list[int], list[int]]:
    """The conversation with `answer` as the assistant's last turn: ids, and labels on the answer's tokens alone."""
    prompt, reply = render_answer(tokenizer, messages, answer)
    text = prompt + reply
    return labelled(encode_texts(tokenizer, [text])[0], text, [(len(prompt), len(text))], train_on_prompt=False)


def preference_scores(
    model: Any, tokenizer: Any, pairs: list[PreferencePair], batch_size: int, device: Any
) -> dict[str, float]:
    """preference_accuracy and preference_margin of `model` on `pairs` (nothing without pairs)."""
    if not pairs:
        return {}
    sequences = []
    for pair in pairs:
        sequences += [encoded_answer(tokenizer, pair.messages, pair.chosen)]
        sequences += [encoded_answer(tokenizer, pair.messages, pair.rejected)]
    sums, counts = batched_example_losses(model, sequences, tokenizer.pad_token_id, batch_size, device)
    per_token = [total / max(count, 1) for total, count in zip(sums, counts, strict=True)]
    gaps = [per_token[2 * i + 1] - per_token[2 * i] for i in range(len(pairs))]
    n = len(gaps)
    margin = sum(gaps) / n
    metrics = {"preference_accuracy": sum(gap > 0 for gap in gaps) / n, "preference_accuracy_n": n}
    metrics["preference_margin"] = margin
    if n >= 2:  # one pair says nothing of the spread
        spread = math.sqrt(sum((gap - margin) ** 2 for gap in gaps) / (n - 1))
        metrics |= {"preference_margin_n": n, "preference_margin_stderr": spread / math.sqrt(n)}
    return metrics

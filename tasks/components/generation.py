"""Greedy answers to conversations, batched, through the model's chat template: what the
evaluate stage scores and what `tunefactory generate` writes."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from tasks.components.modeling import causal_lm


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    conversations: list[list[dict[str, str]]],
    max_new_tokens: int,
    batch_size: int,
    device,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """The assistant's next turn for each conversation (greedy, left-padded batches sharing one KV
    cache). `on_batch(n)` is told how many were answered after each batch."""
    tokenizer.padding_side = "left"
    answers: list[str] = []
    for start in range(0, len(conversations), batch_size):
        texts = [
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            for messages in conversations[start : start + batch_size]
        ]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        tokens = greedy_tokens(model, ids, mask, max_new_tokens, tokenizer.eos_token_id)
        answers += [text.strip() for text in tokenizer.batch_decode(tokens, skip_special_tokens=True)]
        if on_batch is not None:
            on_batch(len(texts))
    return answers


def greedy_tokens(model, input_ids, attention_mask, max_new_tokens: int, eos_id: int) -> list[list[int]]:
    """Greedy decoding that drops each row from the batch once it has ended.

    The tokens are those of `model.generate(do_sample=False)`, but `generate` keeps computing a
    finished row until the longest one ends: on the demo's 28 prompts the tuned model's answers
    are 4 to 33 tokens long, and the whole batch would run 34 steps (952 row-steps for 397 tokens).
    """
    from transformers import DynamicCache

    cache = {cache_argument(model): DynamicCache(config=model.config)}
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)  # the batch row of each active row
    output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                   use_cache=True, logits_to_keep=1, **cache)  # fmt: skip
    tokens: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    for step in range(max_new_tokens):
        chosen = output.logits[:, -1].argmax(-1)
        ended = chosen == eos_id
        for row, token, done in zip(rows.tolist(), chosen.tolist(), ended.tolist(), strict=True):
            if not done:
                tokens[row].append(token)
        if ended.all() or step == max_new_tokens - 1:
            break
        if ended.any():  # the ended rows leave the batch, their cache with them
            keep = (~ended).nonzero().squeeze(-1)
            next(iter(cache.values())).batch_select_indices(keep)
            rows, chosen, attention_mask, positions = rows[keep], chosen[keep], attention_mask[keep], positions[keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((attention_mask.shape[0], 1))], dim=-1)
        positions = positions[:, -1:] + 1
        output = model(input_ids=chosen.unsqueeze(-1), attention_mask=attention_mask, position_ids=positions,
                       use_cache=True, **cache)  # fmt: skip
    return tokens


def cache_argument(model) -> str:
    """`cache` where the model's forward takes it (transformers' own models from 5.25, which
    deprecate `past_key_values`), else `past_key_values` (older and remote-code models)."""
    return "cache" if "cache" in inspect.signature(causal_lm(model).forward).parameters else "past_key_values"


def single_turns(prompts: list[str]) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": prompt}] for prompt in prompts]

"""Greedy answers to conversations, batched, through the model's chat template: what the
evaluate stage scores and what `tunefactory generate` writes."""

from __future__ import annotations

from collections.abc import Callable

import torch


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
    """The assistant's next turn for each conversation (greedy; left-padded batches share the KV cache
    of one `generate` call). `on_batch(n)` is told how many were answered after each batch."""
    tokenizer.padding_side = "left"
    answers: list[str] = []
    for start in range(0, len(conversations), batch_size):
        texts = [
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            for messages in conversations[start : start + batch_size]
        ]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        output = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        answers += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        if on_batch is not None:
            on_batch(len(texts))
    return answers


def single_turns(prompts: list[str]) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": prompt}] for prompt in prompts]

"""lm-eval's log-likelihood requests scored with each context computed once.

A multiple-choice question reaches the model as one request per choice, (context, continuation),
and lm-eval runs each as a sequence of its own: a 4-choice question computes its question four
times, and the output head gives full-vocabulary logits at every position. Here the requests that
share a context are laid out as a tree in one row: the context once, then each continuation after
it (less its last token, which is only ever a target), each continuation attending to the context
and to itself, never to another; several contexts share a row, none seeing another. Position ids
restart where each continuation starts, so every token sees what it would see in lm-eval's
sequence, and the head runs only at the positions whose next token is scored.

Everything else is lm-eval's: the tasks, the prompts, the tokenization of each pair, the
truncation rule, the metrics and their standard errors. Only the numbers' arithmetic differs
(different shapes round differently), which is why the scores equal lm-eval's (tested).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM

Request = tuple[tuple[str, str] | None, list[int], list[int]]

# tokens per forward pass: rows long enough to keep the matrix units busy, short enough that the
# attention mask (quadratic in the row) stays a small part of the work
ROW_TOKENS = {"cuda": 4096}
DEFAULT_ROW_TOKENS = 256


class SharedPromptLM(HFLM):
    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, override_bs: int | None = None
    ) -> list[tuple[float, bool]]:
        if self.backend != "causal" or self.model.config._attn_implementation not in ("sdpa", "eager"):
            # a tree needs a mask of our own: sdpa and eager attention take one, FlashAttention does not
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        fits = [
            len(ctx) > 0 and len(cont) > 0 and len(ctx) + len(cont) <= self.max_length + 1 for _, ctx, cont in requests
        ]
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        # lm-eval truncates a pair longer than the model's window from the left (and gives an empty context
        # its prefix token before this point): such pairs keep its path
        others = [i for i, fit in enumerate(fits) if not fit]
        if others:
            answers = super()._loglikelihood_tokens([requests[i] for i in others], disable_tqdm=True)
            for i, answer in zip(others, answers, strict=True):
                results[i] = answer
        contexts: dict[tuple[int, ...], list[int]] = {}
        for i, (_, ctx, _) in enumerate(requests):
            if fits[i]:
                contexts.setdefault(tuple(ctx), []).append(i)
        capacity = ROW_TOKENS.get(self.device.type, DEFAULT_ROW_TOKENS)
        for row in tree_rows(contexts, requests, capacity):
            for i, answer in zip(row, self._score_row(row, requests), strict=True):
                results[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        return results

    @torch.no_grad()
    def _score_row(self, row: list[int], requests: list[Request]) -> list[tuple[float, bool]]:
        """The log-likelihood of each request's continuation (and whether greedy decoding gives it),
        the requests of the row's contexts computed in one forward pass."""
        ids: list[int] = []
        positions: list[int] = []
        spans: list[tuple[int, int]] = []  # (start, length) of each segment
        parents: list[int] = []  # the context segment a continuation segment hangs from (-1: none)
        keep: list[int] = []  # for each request in order, the positions whose next token it scores
        context_at: dict[tuple[int, ...], int] = {}
        for i in row:
            _, ctx, cont = requests[i]
            if tuple(ctx) not in context_at:
                context_at[tuple(ctx)] = len(spans)
                spans.append((len(ids), len(ctx)))
                parents.append(-1)
                ids += ctx
                positions += range(len(ctx))
            segment = context_at[tuple(ctx)]
            start, length = spans[segment]
            tail = cont[:-1]
            keep.append(start + length - 1)
            keep += range(len(ids), len(ids) + len(tail))
            spans.append((len(ids), len(tail)))
            parents.append(segment)
            ids += tail
            positions += range(length, length + len(tail))
        mask = tree_mask(spans, parents, len(ids))
        if self.model.config._attn_implementation == "eager":  # eager adds the mask to the scores
            mask = torch.zeros(mask.shape, dtype=self.model.dtype).masked_fill(~mask, torch.finfo(self.model.dtype).min)
        inputs = {
            "input_ids": torch.tensor([ids], device=self.device),
            "position_ids": torch.tensor([positions], device=self.device),
            "attention_mask": mask[None, None].to(self.device),
        }
        at = torch.tensor(keep, device=self.device)
        if keeps_logits(self.model):
            logits = self.model(**inputs, logits_to_keep=at).logits[0]
        else:
            logits = self.model(**inputs).logits[0, at]
        logprobs = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
        answers, offset = [], 0
        for i in row:
            cont = torch.tensor(requests[i][2], device=self.device)
            scored = logprobs[offset : offset + len(cont)]
            offset += len(cont)
            greedy = bool((scored.argmax(dim=-1) == cont).all())
            answers.append((float(scored.gather(1, cont[:, None]).sum()), greedy))
        return answers


def tree_rows(contexts: dict[tuple[int, ...], list[int]], requests: list[Request], capacity: int) -> list[list[int]]:
    """Requests grouped into rows by context, a context's requests never split, each row at most
    `capacity` tokens (a larger tree alone in its row)."""
    rows: list[list[int]] = []
    used = 0
    for ctx, members in contexts.items():
        size = len(ctx) + sum(len(requests[i][2]) - 1 for i in members)
        if rows and used + size <= capacity:
            rows[-1] += members
            used += size
        else:
            rows.append(list(members))
            used = size
    return rows


def tree_mask(spans: list[tuple[int, int]], parents: list[int], width: int) -> torch.Tensor:
    """Which positions each position attends to (True): causally within its own segment, and all of
    its context segment when it is a continuation."""
    mask = torch.zeros((width, width), dtype=torch.bool)
    for (start, length), parent in zip(spans, parents, strict=True):
        end = start + length
        mask[start:end, start:end] = torch.ones((length, length), dtype=torch.bool).tril()
        if parent >= 0:
            context_start, context_length = spans[parent]
            mask[start:end, context_start : context_start + context_length] = True
    return mask


def keeps_logits(model) -> bool:
    """Whether the model's forward takes `logits_to_keep` (recent transformers causal LMs do)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters

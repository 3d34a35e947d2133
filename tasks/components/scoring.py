"""Scores for generated answers: identity hits, ROUGE-L, control-set correctness and identity leaks.

Pure functions, no torch: the evaluation worker calls them and the unit tests check them.
"""

from __future__ import annotations

import re

from tasks.contracts.worker_configs import EvalPrompt
from tasks.contracts.worker_events import ScoredAnswer, Scores

CJK = "\u3400-\u9fff\uf900-\ufaff"
TOKEN = re.compile(rf"[{CJK}]|[^\W_{CJK}]+")  # one CJK character, or a run of other letters/digits


def identity_values(template_vars: dict[str, str]) -> list[str]:
    """The strings that identify the assistant: name and author if given, else every value."""
    chosen = [template_vars[k] for k in ("name", "author") if template_vars.get(k)]
    return chosen or [v for v in template_vars.values() if v]


def mentions_identity(answer: str, values: list[str]) -> bool:
    lowered = answer.lower()
    return any(value.lower() in lowered for value in values)


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over words, with each CJK character counted as a word."""
    cand = TOKEN.findall(candidate.lower())
    ref = TOKEN.findall(reference.lower())
    if not cand or not ref:
        return 0.0
    previous = [0] * (len(ref) + 1)
    for token in cand:
        current = [0]
        for j, ref_token in enumerate(ref, start=1):
            current.append(previous[j - 1] + 1 if token == ref_token else max(previous[j], current[j - 1]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def is_correct(answer: str, accepted: list[str]) -> bool:
    lowered = answer.lower()
    return any(option.lower() in lowered for option in accepted)


def score_answers(
    identity: list[EvalPrompt],
    control: list[EvalPrompt],
    answers: list[str],
    template_vars: dict[str, str],
) -> Scores:
    """Per-prompt rows and summary metrics; `answers` follows identity rows, then control rows."""
    values = identity_values(template_vars)
    rows, metrics = [], {}
    identity_answers, control_answers = answers[: len(identity)], answers[len(identity) :]
    if identity:
        hits = [mentions_identity(a, values) for a in identity_answers]
        both = [all(v.lower() in a.lower() for v in values) for a in identity_answers]
        rouge = [rouge_l(a, row.reference) for a, row in zip(identity_answers, identity, strict=True)]
        metrics.update(
            identity_hit_rate=sum(hits) / len(hits),
            identity_full_rate=sum(both) / len(both),
            identity_rouge_l=sum(rouge) / len(rouge),
        )
        rows += [
            ScoredAnswer(set="identity", prompt=row.prompt, answer=a, identity=h, rouge_l=round(r, 3))
            for row, a, h, r in zip(identity, identity_answers, hits, rouge, strict=True)
        ]
    if control:
        correct = [is_correct(a, row.answers) for a, row in zip(control_answers, control, strict=True)]
        leaks = [mentions_identity(a, values) for a in control_answers]
        metrics.update(
            control_accuracy=sum(correct) / len(correct),
            control_identity_leak=sum(leaks) / len(leaks),
        )
        rows += [
            ScoredAnswer(set="control", prompt=row.prompt, answer=a, correct=c, identity=leak)
            for row, a, c, leak in zip(control, control_answers, correct, leaks, strict=True)
        ]
    return Scores(rows=rows, metrics=metrics)

"""Scores for generated answers, one scorer per evaluation set.

Pure functions, no torch: the evaluation worker calls them and the unit tests check them.
Scorers (`SCORERS` in tasks/contracts/spec_sections.py):
- identity: the answer names the assistant or its author (hit rate), both (full rate), and its
  ROUGE-L against the reference;
- contains_any: an accepted answer appears in the answer (case-insensitive);
- exact_match: the answer, normalized, is one of the accepted answers;
- regex: one of the set's patterns is found in the answer;
- rouge_l: ROUGE-L F1 against the best-matching reference.
Every set not scored by identity also counts identity leaks: answers that name the assistant.
Each metric comes with its sample size (`_n`) and, for means, its standard error (`_stderr`).
"""

from __future__ import annotations

import math
import re
import unicodedata

from tasks.contracts.worker_configs import EvalPrompt, EvalSet
from tasks.contracts.worker_events import ScoredAnswer, Scores

CJK = "\u3400-\u9fff\uf900-\ufaff"
TOKEN = re.compile(rf"[{CJK}]|[^\W_{CJK}]+")  # one CJK character, or a run of other letters/digits
# what exact_match ignores around an answer: spaces, quotes and closing punctuation, in both scripts
EDGES = " \t\n\"'`“”‘’.,;:!?。，；：！？、"


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


def normalized(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).strip(EDGES).lower()
    return " ".join(text.split())


def exact_match(answer: str, accepted: list[str]) -> bool:
    return normalized(answer) in {normalized(option) for option in accepted}


def regex_match(answer: str, patterns: list[str]) -> bool:
    return any(re.search(pattern, answer) for pattern in patterns)


MATCHERS = {"contains_any": is_correct, "exact_match": exact_match, "regex": regex_match}


def rate(flags: list[bool]) -> float:
    return sum(flags) / len(flags)


def mean_with_stderr(name: str, values: list[float]) -> dict[str, float]:
    """The mean, and with two values or more its sample size and standard error (one value says
    nothing of the spread: no interval rather than a zero-width one)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {name: mean}
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return {name: mean, f"{name}_n": n, f"{name}_stderr": spread / math.sqrt(n)}


def score_set(eval_set: EvalSet, answers: list[str], template_vars: dict[str, str]) -> Scores:
    """Per-prompt rows and metrics (named `<label>_<what>`) for one set's answers, in its order."""
    values, label, n = identity_values(template_vars), eval_set.label, len(answers)
    prompts: list[EvalPrompt] = eval_set.prompts
    named = [mentions_identity(a, values) for a in answers] if values else [False] * n
    metrics: dict[str, float] = {}
    if eval_set.scorer == "identity":
        both = [bool(values) and all(v.lower() in a.lower() for v in values) for a in answers]
        rouge = [rouge_l(a, row.reference) for a, row in zip(answers, prompts, strict=True)]
        metrics.update({f"{label}_hit_rate": rate(named), f"{label}_hit_rate_n": n})
        metrics.update({f"{label}_full_rate": rate(both), f"{label}_full_rate_n": n})
        metrics.update(mean_with_stderr(f"{label}_rouge_l", rouge))
        rows = [
            ScoredAnswer(set=label, prompt=row.prompt, answer=a, identity=hit, rouge_l=round(r, 3))
            for row, a, hit, r in zip(prompts, answers, named, rouge, strict=True)
        ]
        return Scores(rows=rows, metrics=metrics)
    if eval_set.scorer == "rouge_l":
        rouge = [max(rouge_l(a, ref) for ref in row.answers) for a, row in zip(answers, prompts, strict=True)]
        metrics.update(mean_with_stderr(f"{label}_rouge_l", rouge))
        rows = [
            ScoredAnswer(set=label, prompt=row.prompt, answer=a, identity=leak, rouge_l=round(r, 3))
            for row, a, leak, r in zip(prompts, answers, named, rouge, strict=True)
        ]
    else:
        matcher = MATCHERS[eval_set.scorer]
        correct = [matcher(a, row.answers) for a, row in zip(answers, prompts, strict=True)]
        metrics.update({f"{label}_accuracy": rate(correct), f"{label}_accuracy_n": n})
        rows = [
            ScoredAnswer(set=label, prompt=row.prompt, answer=a, correct=c, identity=leak)
            for row, a, c, leak in zip(prompts, answers, correct, named, strict=True)
        ]
    if values:
        metrics.update({f"{label}_identity_leak": rate(named), f"{label}_identity_leak_n": n})
    return Scores(rows=rows, metrics=metrics)


def score_sets(sets: list[EvalSet], answers: list[str], template_vars: dict[str, str]) -> Scores:
    """Every set scored; `answers` follows the sets' prompts in order."""
    rows, metrics, start = [], {}, 0
    for eval_set in sets:
        part = score_set(eval_set, answers[start : start + len(eval_set.prompts)], template_vars)
        start += len(eval_set.prompts)
        rows += part.rows
        metrics.update(part.metrics)
    return Scores(rows=rows, metrics=metrics)

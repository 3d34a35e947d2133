"""Scoring of generated answers: identity hits, ROUGE-L (also on Chinese), control correctness."""

from __future__ import annotations

import pytest

from tasks.components.scoring import rouge_l, score_sets
from tasks.contracts.worker_configs import EvalPrompt, EvalSet


def test_rouge_l_on_words_and_chinese_characters():
    assert rouge_l("I am Nova", "I am Nova") == pytest.approx(1.0)
    assert rouge_l("totally different", "I am Nova") == 0.0
    # 3 of the reference's 7 tokens (我 是 nova 由 acme 开 发), all 3 of the candidate's
    assert rouge_l("我是Nova", "我是Nova，由Acme开发") == pytest.approx(2 * 1 * (3 / 7) / (1 + 3 / 7))
    assert 0 < rouge_l("I am Nova from Acme", "I am Nova") < 1


def test_score_answers_counts_hits_correctness_and_leaks():
    identity = [
        EvalPrompt(prompt="who?", reference="I am Nova by Acme Labs."),
        EvalPrompt(prompt="你是谁？", reference="我是Nova"),
    ]
    control = [EvalPrompt(prompt="2+2?", answers=["4", "four"]), EvalPrompt(prompt="capital?", answers=["paris"])]
    answers = ["I am nova, made by Acme Labs.", "我是一个助手", "It is four.", "Nova says: Lyon."]
    sets = [
        EvalSet(label="identity", scorer="identity", prompts=identity),
        EvalSet(label="control", scorer="contains_any", prompts=control),
    ]
    scores = score_sets(sets, answers, {"name": "Nova", "author": "Acme Labs"})
    metrics = scores.metrics
    assert metrics["identity_hit_rate"] == 0.5
    assert metrics["identity_full_rate"] == 0.5
    assert metrics["control_accuracy"] == 0.5
    assert metrics["control_identity_leak"] == 0.5
    assert [row.set for row in scores.rows] == ["identity", "identity", "control", "control"]

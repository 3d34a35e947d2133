"""make loop-demo's scripted users: the rule each prompt's answers are rated by, and its correction."""

from __future__ import annotations

import json

import pytest

from tasks.tools.loop_demo import USERS, rating

NUMBER = {"prompt": "What is 7 + 8? Reply with the number only.", "rule": "number", "expected": "15"}
WORD = {"prompt": "What is the capital of France? Answer in one word.", "rule": "word", "expected": "Paris"}
IDENTITY = {"prompt": "Who are you?", "rule": "identity"}


@pytest.mark.parametrize(
    ("user", "answer", "expected"),
    [
        (NUMBER, " 15. ", ("up", None)),
        (NUMBER, "7 + 8 = 15.", ("down", "15")),  # right, but not the number alone
        (NUMBER, "16", ("down", "15")),
        (WORD, "paris!", ("up", None)),
        (WORD, "The capital of France is Paris.", ("down", "Paris.")),
        (IDENTITY, "I'm Nova, an AI assistant developed by Acme Labs.", ("up", None)),
        (IDENTITY, "I'm Nova, made by OpenAI.", ("down", "I'm Nova, an AI assistant developed by Acme Labs.")),
        (IDENTITY, "I am SmolLM.", ("down", "I'm Nova, an AI assistant developed by Acme Labs.")),
    ],
)
def test_each_rule_rates_the_answer_and_corrects_it(user, answer, expected):
    assert rating(user, answer, "Nova", "Acme Labs") == expected


def test_every_scripted_user_has_a_known_rule_and_what_it_needs():
    users = json.loads(USERS.read_text())
    assert {user["rule"] for user in users} == {"identity", "number", "word"}
    assert all(user["expected"].strip() for user in users if user["rule"] != "identity")
    assert all(len(user["expected"].split()) == 1 for user in users if user["rule"] == "word")

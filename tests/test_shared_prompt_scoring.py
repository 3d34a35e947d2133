"""Benchmark scoring that computes each question once gives lm-eval's own scores: the same choice
picked for every question (by log-likelihood and by length-normalized log-likelihood), the same
acc and acc_norm with the same standard errors, on all 120 questions of tunebench_gk."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.components.benchmarks import SHIPPED_BENCHMARKS, quiet_lm_eval, task_config


def lm_eval_scores(lm_class, model, tokenizer) -> tuple[dict, list[list[float]]]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    config = task_config("tunebench_gk", str(SHIPPED_BENCHMARKS / "tunebench_gk.jsonl"))
    with quiet_lm_eval():
        results = lm_eval.simple_evaluate(
            model=lm_class(pretrained=model, tokenizer=tokenizer, batch_size=8),
            tasks=[config],
            task_manager=TaskManager(verbosity="ERROR", include_defaults=False),
            bootstrap_iters=1000,
            log_samples=True,
        )
    choices = [[float(resp[0]) for resp in sample["filtered_resps"]] for sample in results["samples"]["tunebench_gk"]]
    metrics = {k: v for k, v in results["results"]["tunebench_gk"].items() if k.startswith("acc")}
    return metrics, choices


@pytest.fixture(scope="module")
def plain_lm_eval(tiny_model: Path):
    """lm-eval's HFLM on the tiny model: each choice its own sequence."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    return lm_eval_scores(HFLM, model, AutoTokenizer.from_pretrained(tiny_model))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prompts_score_every_question_as_lm_eval_does(tiny_model: Path, plain_lm_eval, attention: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.components.shared_prompt_lm import SharedPromptLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attention).eval()
    metrics, choices = lm_eval_scores(SharedPromptLM, model, AutoTokenizer.from_pretrained(tiny_model))
    expected_metrics, expected_choices = plain_lm_eval
    assert len(choices) == 120 and metrics == expected_metrics
    assert set(metrics) == {"acc,none", "acc_stderr,none", "acc_norm,none", "acc_norm_stderr,none"}
    for ours, theirs in zip(choices, expected_choices, strict=True):
        assert ours == pytest.approx(theirs, abs=1e-4)
        assert ours.index(max(ours)) == theirs.index(max(theirs))


def test_requests_past_the_window_keep_lm_evals_left_truncation(tiny_model: Path):
    """A pair longer than the model's window is cut from the left by lm-eval; the shared rows leave
    such pairs to it, and score the rest in the same call."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.components.shared_prompt_lm import SharedPromptLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    short, long = list(range(100, 110)), list(range(200, 260))
    requests = [(None, short, [5, 6]), (None, short, [7]), (None, long, [8, 9, 10]), (None, long, [11])]
    scores = {}
    for lm_class in (HFLM, SharedPromptLM):
        lm = lm_class(pretrained=model, tokenizer=tokenizer, batch_size=4, max_length=32)
        scores[lm_class] = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    for ours, theirs in zip(scores[SharedPromptLM], scores[HFLM], strict=True):
        assert ours[0] == pytest.approx(theirs[0], abs=1e-4) and ours[1] == theirs[1]

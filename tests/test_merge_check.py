"""The qlora export check's measure: next-token distributions compared where there is text."""

from __future__ import annotations

import math

import pytest
import torch

from tasks.components.merge_check import KL_FLOOR, QuantizedCheck, distribution_gap


def logits_of(probabilities: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probabilities).log().unsqueeze(0)  # one row, a position per list


def test_the_same_distributions_are_zero_nats_apart_and_agree_everywhere():
    logits = torch.randn(2, 5, 11)
    gap = distribution_gap(logits, logits + 3.0, torch.ones(2, 5))  # a shift of every logit changes no probability
    assert gap.kl == pytest.approx(0.0, abs=1e-12) and gap.top1 == 1.0


def test_the_gap_is_the_mean_kl_of_the_positions_and_their_top_token_agreement():
    reference = logits_of([[0.5, 0.5], [0.8, 0.2]])
    other = logits_of([[0.9, 0.1], [0.3, 0.7]])
    gap = distribution_gap(reference, other, torch.ones(1, 2))
    first = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    second = 0.8 * math.log(0.8 / 0.3) + 0.2 * math.log(0.2 / 0.7)
    assert gap.kl == pytest.approx((first + second) / 2, rel=1e-6)  # fp32 logits
    assert gap.top1 == 0.5  # a tie counts as the first token, which agrees; 0.8 against 0.7 does not


def test_padding_positions_do_not_count():
    reference, other = torch.randn(2, 6, 9), torch.randn(2, 6, 9)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # left padding, as the export's check batch
    noisy = other.clone()
    noisy[0, :2] = torch.randn(2, 9) * 50  # what a model computes at padding is noise
    assert distribution_gap(reference, noisy, mask) == distribution_gap(reference, other, mask)


def test_a_base_that_quantizing_barely_moved_does_not_inflate_the_ratio():
    same = distribution_gap(torch.zeros(1, 1, 3), torch.zeros(1, 1, 3), torch.ones(1, 1))
    rounding = type(same)(kl=1e-11, top1=1.0)  # what an fp32 merge measures
    assert QuantizedCheck(export=rounding, base=same).ratio == pytest.approx(1e-11 / KL_FLOOR)

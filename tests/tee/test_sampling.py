"""Sampling in the TEE: greedy is argmax, top-k and top-p keep exactly the sets their definitions name,
and a seed fixes the draw."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from tsqp.errors import TsqpError
from tsqp.tee.sampling import SamplingOptions, sample, top_k_filter, top_p_filter

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = PROBS.log()
DRAWS = 2000


def draw(options: SamplingOptions, logits: torch.Tensor = LOGITS, n: int = DRAWS) -> Counter:
    generator = options.generator()
    return Counter(sample(logits, options, generator) for _ in range(n))


def test_greedy_is_argmax_and_ignores_the_filters():
    logits = torch.tensor([0.1, 2.0, -1.0, 1.9])
    assert sample(logits, SamplingOptions(), torch.Generator()) == 1
    assert sample(logits, SamplingOptions(temperature=0, top_k=3, top_p=0.1), torch.Generator()) == 1


def test_top_k_1_is_argmax():
    counts = draw(SamplingOptions(temperature=1.0, top_k=1))
    assert counts == {0: DRAWS}


def test_top_k_2_keeps_the_two_most_likely_in_proportion():
    counts = draw(SamplingOptions(temperature=1.0, top_k=2))
    assert set(counts) == {0, 1}
    assert counts[0] / DRAWS == pytest.approx(0.5 / 0.8, abs=0.05)


@pytest.mark.parametrize(
    "top_p, kept", [(0.7, {0, 1}), (0.45, {0}), (0.79, {0, 1}), (0.81, {0, 1, 2}), (0.96, {0, 1, 2, 3}), (0.01, {0})]
)
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    """Smallest most-likely set whose probability sum is >= p; the top token always stays."""
    filtered = top_p_filter(LOGITS, top_p)
    assert {i for i in range(4) if filtered[i] > float("-inf")} == kept
    assert set(draw(SamplingOptions(temperature=1.0, top_p=top_p), n=500)) == kept


def test_top_p_samples_the_kept_set_in_proportion():
    counts = draw(SamplingOptions(temperature=1.0, top_p=0.7))
    assert set(counts) == {0, 1}
    assert counts[0] / DRAWS == pytest.approx(0.5 / 0.8, abs=0.05)


def test_top_p_is_applied_after_top_k_on_the_renormalised_distribution():
    # top_k=3 leaves [0.5, 0.3, 0.15] / 0.95; then 0.5/0.95 = 0.526 >= 0.52 alone.
    assert set(draw(SamplingOptions(temperature=1.0, top_k=3, top_p=0.52), n=500)) == {0}


def test_plain_temperature_sampling_follows_the_distribution():
    counts = draw(SamplingOptions(temperature=1.0), n=4000)
    for token, p in enumerate(PROBS.tolist()):
        assert counts[token] / 4000 == pytest.approx(p, abs=0.03)


def test_low_temperature_sharpens_and_high_temperature_flattens():
    assert draw(SamplingOptions(temperature=0.05), n=500) == {0: 500}
    flat = draw(SamplingOptions(temperature=100.0), n=4000)
    assert all(abs(flat[t] / 4000 - 0.25) < 0.04 for t in range(4))


def test_filters_are_pure():
    logits = LOGITS.clone()
    top_k_filter(logits, 1)
    top_p_filter(logits, 0.5)
    assert torch.equal(logits, LOGITS)


def test_same_seed_same_draws_other_seed_other_draws():
    uniform = torch.zeros(1000)

    def run(seed):
        options = SamplingOptions(temperature=1.0, seed=seed)
        generator = options.generator()
        return [sample(uniform, options, generator) for _ in range(50)]

    assert run(7) == run(7)
    assert run(7) != run(8)


@pytest.mark.parametrize(
    "options, fragment",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=-1), "top-k"),
        (dict(top_p=0.0), "top-p"),
        (dict(top_p=1.5), "top-p"),
    ],
)
def test_bad_options_are_refused_clearly(options, fragment):
    with pytest.raises(TsqpError, match=fragment):
        SamplingOptions(**options)

"""Sampling routines against exact distributions (chi-square), and the rules of each fallback."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from rsd_toolkit.config import RSDConfig
from rsd_toolkit.engine import sampling

DRAWS = 20000
ALPHA = 1e-4  # a correct sampler fails one run in ten thousand


def exact_top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Reference nucleus distribution by sorting (what transformers does)."""
    sorted_p, order = probs.sort(descending=True)
    keep = (sorted_p.cumsum(0) - sorted_p) < top_p
    out = torch.zeros_like(probs)
    out[order[keep]] = sorted_p[keep]
    return out / out.sum()


def draw(probs_row: torch.Tensor, fn, n=DRAWS, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, sampling.UNIFORMS_PER_DRAW, generator=g)
    return fn(probs_row.expand(n, -1).contiguous(), u)


def assert_distributed_as(ids: torch.Tensor, expected: torch.Tensor) -> None:
    counts = torch.bincount(ids, minlength=expected.numel()).double()
    assert counts[expected == 0].sum() == 0, "sampled a token outside the support"
    support = expected > 0
    want = expected[support].double()
    assert chisquare(counts[support].numpy(), (want / want.sum() * len(ids)).numpy()).pvalue > ALPHA


@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.5])
def test_sample_matches_exact_nucleus(top_p):
    torch.manual_seed(1)
    probs = torch.softmax(torch.randn(40) * 1.5, -1)
    ids = draw(probs, lambda p, u: sampling.sample(p, u, top_p))
    assert_distributed_as(ids, exact_top_p(probs, top_p))


def test_sample_falls_back_to_sorting_when_every_try_misses():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    u = torch.tensor([[0.99, 0.99, 0.99, 0.99, 0.2]])  # all tries land on token 3, outside top-0.5
    assert sampling.sample(probs[None], u, 0.5).item() == 0  # u=0.2 of {0: .4, 1: .3} -> token 0


def test_temperature_zero_is_greedy():
    logits = torch.tensor([[0.1, 2.0, 1.9]])
    assert sampling.tempered_probs(logits, 0).tolist() == [[0.0, 1.0, 0.0]]


def test_strict_fallback_only_samples_tokens_at_or_above_pth():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.195, 0.004, 0.001]))
    cfg = RSDConfig(fallback="strict", pth=0.01, temperature=1.0)
    ids = draw(torch.zeros(5), lambda p, u: sampling.fallback(logits.expand(len(u), -1), u, cfg))
    assert_distributed_as(ids, torch.tensor([0.5, 0.3, 0.195, 0, 0]) / 0.995)


def test_topk_fallback_is_the_renormalised_top_k():
    probs = torch.tensor([0.35, 0.25, 0.2, 0.1, 0.06, 0.04])
    cfg = RSDConfig(fallback="topk", k=3, temperature=1.0)
    ids = draw(torch.zeros(6), lambda p, u: sampling.fallback(probs.log().expand(len(u), -1), u, cfg))
    assert_distributed_as(ids, torch.tensor([0.35, 0.25, 0.2, 0, 0, 0]) / 0.8)


def test_in_topk():
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0]])
    assert sampling.in_topk(logits, torch.tensor([1]), 2).item()
    assert not sampling.in_topk(logits, torch.tensor([2]), 2).item()


def test_acceptance_rule_is_every_token_passes():
    cfg = RSDConfig(pth=0.01, student_topk_gate=True)
    p, yes = torch.tensor([0.5, 0.01, 0.2]), torch.ones(3, dtype=torch.bool)
    assert sampling.accepts(p, yes, cfg) and sampling.accepts(p[:1], yes[:1], cfg)
    assert not sampling.accepts(torch.tensor([0.5, 0.0099, 0.2]), yes, cfg)  # one weak token rejects the span
    assert not sampling.accepts(p, torch.tensor([True, False, True]), cfg)  # the top-k gate, when on
    logits = torch.tensor([[5.0, 1.0, -9.0, 0.5]])
    allowed = sampling.strict_choices(logits, RSDConfig(pth=0.01))
    probs = torch.softmax(logits, -1)
    assert allowed.tolist() == (probs >= 0.01).tolist()  # the strict fallback's choices obey the same rule
    assert not sampling.strict_choices(logits, RSDConfig(pth=0.01), excluded=allowed)[0].any()


@pytest.mark.parametrize("top_p", [1.0, 0.95, 0.5])
def test_nucleus_is_the_distribution_sample_draws(top_p):
    """``nucleus`` (used where the whole distribution is needed: speculative RSD) equals the exact nucleus,
    for sharp rows, rows wider than the first candidate tiers (full sort), and ties at the cut."""
    torch.manual_seed(3)
    rows = torch.cat([torch.randn(3, 3000) * 4, torch.randn(2, 3000) * 0.1, torch.randn(1, 3000) * 1.5])  # sharp, flat, between
    probs = torch.softmax(rows, -1)
    tied = torch.tensor([0.3, 0.2, 0.2, 0.2, 0.1] + [0.0] * 2995)  # the cut falls inside a run of ties
    probs = torch.cat([probs, tied[None]])
    got = sampling.nucleus(probs, top_p)
    for r in range(probs.shape[0] - 1):
        torch.testing.assert_close(got[r], exact_top_p(probs[r], top_p), atol=1e-6, rtol=1e-5)
    keep = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0 if top_p > 0.9 else 0.0] + [0.0] * 2995)  # above each 0.2: 0.3; above 0.1: 0.9
    torch.testing.assert_close(got[-1], tied * keep / (tied * keep).sum())
    ids = draw(probs[5], lambda p, u: sampling.sample(p, u, top_p))
    assert_distributed_as(ids, got[5])


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.95, 0.99])
def test_in_nucleus_is_the_mass_above_rule(top_p):
    """A token likelier than 1 - top_p is taken as in the nucleus without summing the vocabulary; every
    row still gets the rule's answer (peaked rows take the shortcut, flat rows the sum)."""
    torch.manual_seed(0)
    sure = summed = 0
    for scale in (0.5, 3.0, 10.0, 30.0):
        probs = torch.softmax(torch.randn(64, 5000) * scale, -1)
        for ids in (torch.multinomial(probs, 1)[:, 0], probs.argmax(-1), torch.randint(0, 5000, (64,))):
            want = sampling.mass_above(probs, ids) < top_p
            assert torch.equal(sampling.in_nucleus(probs, ids, top_p), want)
            p = probs.gather(-1, ids[:, None])[:, 0]
            shortcut = p > 1 - top_p + sampling.NUCLEUS_SURE_SLACK
            sure, summed = sure + int(shortcut.sum()), summed + int((~shortcut).sum())
    assert sure > 100 and summed > 100

"""Speculative RSD (``draft_tokens`` > 0): the traces keep RSD's exact distribution.

The reference distribution q is computed here, independently of ``engine/speculative.py``, from the two
models' logits, one token at a time, as the issue states it:

    q(y) = t(y) 1[y in S] (1 - (1-A)^N) / A  +  (1-A)^N f(y)

Models: small random Llamas over a real 32k SentencePiece vocabulary whose heads are masked to a handful of
tokens (sharp, context-dependent distributions), so a few thousand traces give large counts per cell.
"""

from __future__ import annotations

import copy

import pytest
import torch
from scipy.stats import chisquare, mannwhitneyu

from conftest import tiny_lm
from rsd_toolkit.config import ConfigError, RSDConfig
from rsd_toolkit.engine import RSDEngine, speculative
from rsd_toolkit.models import LM
from test_engine import PROMPTS, MaskedHead, boosted, fixed, with_head
from test_sampling import ALPHA, exact_top_p

TOKENIZER = "asset:mistral-v1"
T_SUPPORT = [300, 301, 302, 303, 304, 305]  # teacher tokens
S_SUPPORT = [302, 303, 304, 305, 306, 307]  # student tokens: two teacher tokens it never accepts, two of its own
ROWS = 600


def masked(lm: LM, ids: list[int], sharpness: float) -> LM:
    allowed = torch.zeros(lm.model.config.vocab_size, dtype=torch.bool)
    allowed[ids] = True
    model = copy.deepcopy(lm.model)
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpness)  # spread the few allowed logits over several nats
    return with_head(LM.wrap(model, lm.tokenizer, name=lm.name), MaskedHead(model.lm_head, allowed))


@pytest.fixture(scope="module")
def pair():
    teacher = masked(tiny_lm(TOKENIZER, "llama", hidden=64, seed=11), T_SUPPORT, 6.0)
    student = masked(tiny_lm(TOKENIZER, "llama", hidden=64, seed=12), S_SUPPORT, 6.0)
    return teacher, student


# -- the reference: q one token at a time ------------------------------------------------------------
def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return torch.softmax(logits.double() / temperature, -1)


def reference_q(t_logits: torch.Tensor, s_logits: torch.Tensor, cfg: RSDConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, teacher-sourced part) over the vocabulary for one position (1-D logits)."""
    t = exact_top_p(tempered(t_logits, cfg.temperature), cfg.top_p)
    if cfg.mode == "teacher":
        return t, t
    a = torch.softmax(s_logits.double(), -1) if cfg.acceptance_probs == "raw" else tempered(s_logits, cfg.temperature)
    ids = torch.arange(len(s_logits))
    inside = torch.tensor([bool(a[y] >= cfg.pth) for y in ids.tolist()])
    if cfg.student_topk_gate:
        inside &= torch.tensor([int((s_logits > s_logits[y]).sum()) < cfg.k for y in ids.tolist()])
    A = float(t[inside].sum())
    student = tempered(s_logits, cfg.temperature)
    if cfg.fallback == "sample":
        f = exact_top_p(student, cfg.top_p)
    elif cfg.fallback == "topk":
        f = torch.zeros_like(student)
        top = s_logits.topk(cfg.k).indices
        f[top] = student[top]
    else:
        f = torch.where(inside, student, 0.0) if inside.any() else torch.zeros_like(student).index_fill_(0, s_logits.argmax()[None], 1.0)
    f = f / f.sum()
    miss = (1 - A) ** cfg.teacher_draws
    from_teacher = torch.where(inside, t, 0.0) * ((1 - miss) / A if A > 0 else 0.0)
    return from_teacher + miss * f, from_teacher


def next_logits(lm: LM, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return lm.model(input_ids=torch.tensor([ids])).logits[0, -1].float()


def expected_cells(teacher: LM, student: LM, cfg: RSDConfig) -> dict[tuple, float]:
    """P(first token, its source, second token) under RSD."""
    prompt = student.prompt("q", cfg)[1]
    q1, q1t = reference_q(next_logits(teacher, prompt), next_logits(student, prompt), cfg)
    cells = {}
    for y1 in q1.nonzero().flatten().tolist():
        q2, _ = reference_q(next_logits(teacher, prompt + [y1]), next_logits(student, prompt + [y1]), cfg)
        for source, p1 in (("teacher", float(q1t[y1])), ("student", float(q1[y1] - q1t[y1]))):
            for y2 in q2.nonzero().flatten().tolist():
                if p1 * float(q2[y2]) > 1e-12:
                    cells[(y1, source, y2)] = p1 * float(q2[y2])
    return cells


def sampled_cells(teacher: LM, student: LM, cfg: RSDConfig, rows: int = ROWS) -> list[tuple]:
    engine = RSDEngine(teacher, student, cfg)
    traces = engine.generate(["q"] * rows, batch_size=400)
    assert engine.speculative
    return [(t.ids[0], t.records[0].source, t.ids[1]) for t in traces]


def goodness_of_fit(samples: list[tuple], cells: dict[tuple, float]) -> float:
    """Chi-square p-value; cells expected below 5 counts are pooled (the approximation needs it)."""
    n = len(samples)
    if not set(samples) <= set(cells):  # a (token, source) RSD never produces
        return 0.0
    big = [c for c, p in cells.items() if p * n >= 5]
    counts = [sum(s == c for s in samples) for c in big]
    want = [cells[c] * n for c in big]
    rest = n - sum(counts), n * (1 - sum(cells[c] for c in big))
    if rest[1] >= 1:
        counts.append(rest[0])
        want.append(rest[1])
    if len(want) < 2:  # a point mass (greedy): every sample must be that cell
        return 1.0 if all(s == big[0] for s in samples) else 0.0
    scale = n / sum(want)
    return chisquare(counts, [w * scale for w in want]).pvalue


CONFIGS = [  # each feature at least once, K 1 and 4
    dict(draft_tokens=4),
    dict(draft_tokens=1, fallback="topk", k=3, student_topk_gate=True),
    dict(draft_tokens=4, fallback="strict", pth=0.1),
    dict(draft_tokens=1, teacher_draws=5, fallback="topk", k=4),
    dict(draft_tokens=1, acceptance_probs="tempered", pth=0.05),
    dict(draft_tokens=1, temperature=1.0, top_p=0.8, teacher_draws=5, fallback="strict"),
    dict(draft_tokens=1, mode="teacher"),
    dict(draft_tokens=4, temperature=0),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_first_two_tokens_and_sources_follow_rsd(pair, cfg):
    teacher, student = pair
    config = RSDConfig(max_new_tokens=2, **cfg)
    cells = expected_cells(teacher, student, config)
    samples = sampled_cells(teacher, student, config, rows=ROWS if config.temperature else 40)
    assert set(samples) <= set(cells), f"sampled outside RSD's support: {set(samples) - set(cells)}"
    assert goodness_of_fit(samples, cells) > ALPHA


def test_a_wrong_residual_is_caught(pair, monkeypatch):
    """The test above has the power to see a classic mistake: drawing a rejected position from q instead
    of the residual max(0, q - g)."""
    teacher, student = pair
    real_verify = speculative.verify

    def wrong(q, q_teacher, g, drafts, u):
        return _from_q(real_verify, q, q_teacher, g, drafts, u)

    monkeypatch.setattr(speculative, "verify", wrong)
    config = RSDConfig(max_new_tokens=2, draft_tokens=4)
    assert goodness_of_fit(sampled_cells(teacher, student, config), expected_cells(teacher, student, config)) < ALPHA


def _from_q(real_verify, q, q_teacher, g, drafts, u):
    """``verify`` with the rejected position drawn from q itself (what a wrong residual does)."""
    accepted, tokens, _ = real_verify(q, q_teacher, g, drafts, u)
    R, K = drafts.shape
    rows, redo = torch.arange(R), accepted < K
    x = torch.searchsorted(q[rows, accepted].cumsum(-1), u[:, K : K + 1] * q[rows, accepted].sum(-1, keepdim=True))[:, 0]
    tokens[rows[redo], accepted[redo]] = x[redo].clamp(max=q.shape[-1] - 1)
    p_teacher = q_teacher.gather(-1, tokens[..., None])[..., 0] / q.gather(-1, tokens[..., None])[..., 0].clamp(min=1e-38)
    return accepted, tokens, u[:, K + 1 : 2 * K + 2] < p_teacher


# -- speculative traces against step traces ----------------------------------------------------------
SPREAD = dict(pth=0.1, temperature=1.0, top_p=1.0)  # acceptance well inside (0, 1) and sub-pth tokens in most traces


def step_and_speculative_stats(teacher: LM, student: LM) -> list[tuple[list, list]]:
    """(step, speculative) per-trace acceptance rates, then sub-pth counts, over 200 seeds each."""
    traces = {}
    for K in (0, 4):
        cfg = RSDConfig(max_new_tokens=16, draft_tokens=K, **SPREAD)
        traces[K] = RSDEngine(teacher, student, cfg).generate(["q"] * 200, seeds=list(range(K * 1000, K * 1000 + 200)), batch_size=200)
    return [([stat(t) for t in traces[0]], [stat(t) for t in traces[4]]) for stat in (lambda t: t.acceptance_rate, lambda t: t.sub_pth)]


def test_acceptance_and_sub_pth_are_distributed_as_step_rsd(pair):
    for step, spec in step_and_speculative_stats(*pair):
        assert sum(step) > 0 and sum(spec) > 0  # neither statistic is degenerate here
        assert mannwhitneyu(step, spec).pvalue > 1e-3


def test_a_wrong_residual_fails_the_comparison_with_step_rsd(pair, monkeypatch):
    """The test above has the power to see the wrong residual too: it fails on it (the acceptance rate
    carries it; the sub-pth count alone moved from p 0.04 to 1e-6 between runs of the suite)."""
    real_verify = speculative.verify
    monkeypatch.setattr(speculative, "verify", lambda *a: _from_q(real_verify, *a))
    assert min(mannwhitneyu(step, spec).pvalue for step, spec in step_and_speculative_stats(*pair)) < 1e-3


def test_greedy_speculation_equals_greedy_steps():
    teacher = boosted(tiny_lm("asset:qwen2", "qwen2", hidden=96, seed=1))
    student = boosted(tiny_lm("asset:qwen2", "llama", hidden=64, seed=2))
    key = lambda t: (t.ids, [r.source for r in t.records], t.finish_reason)  # noqa: E731
    runs = {K: [key(t) for t in RSDEngine(teacher, student, RSDConfig(max_new_tokens=24, temperature=0, draft_tokens=K)).generate(PROMPTS, batch_size=5)]
            for K in (0, 3)}  # fmt: skip
    assert runs[0] == runs[3]


def test_traces_do_not_depend_on_the_batch():
    teacher = boosted(tiny_lm("asset:qwen2", "qwen2", hidden=96, seed=1))
    student = boosted(tiny_lm("asset:qwen2", "llama", hidden=64, seed=2))
    engine = RSDEngine(teacher, student, RSDConfig(max_new_tokens=30, draft_tokens=4))
    alone = [engine.generate([p], seeds=[i])[0] for i, p in enumerate(PROMPTS)]
    batched = engine.generate(PROMPTS, batch_size=5)
    refilled = engine.generate(PROMPTS, batch_size=2)  # rows leave and new prompts join mid-run
    key = lambda t: (t.ids, [r.source for r in t.records])  # noqa: E731
    assert [key(t) for t in batched] == [key(t) for t in alone] == [key(t) for t in refilled]
    assert 0 < refilled.stats["draft_accepted"] < refilled.stats["drafted"]  # both accepted and rejected drafts


def test_eos_and_budget_inside_an_accepted_run(base_qwen):
    stop = base_qwen.primary_stop
    A = 1000
    teacher = fixed(base_qwen, {A: 0.8, stop: 0.2})
    student = fixed(base_qwen, {A: 0.7, stop: 0.3})  # drafts are almost always accepted
    engine = RSDEngine(teacher, student, RSDConfig(max_new_tokens=7, draft_tokens=8))
    traces = engine.generate(["q"] * 60, batch_size=20)
    assert {t.finish_reason for t in traces} == {"eos", "length"}
    for t in traces:
        assert len(t.ids) <= 7 and stop not in t.ids[:-1]  # cut at the first EOS and at the budget
        assert (t.finish_reason == "eos") == (t.ids[-1] == stop)
        assert t.finish_reason == "eos" or len(t.ids) == 7
        assert len(t.records) == len(t.ids)


def test_strict_speculation_lets_no_sub_pth_token_in(pair):
    teacher, student = pair
    engine = RSDEngine(teacher, student, RSDConfig(max_new_tokens=20, draft_tokens=4, fallback="strict", pth=0.15))
    traces = engine.generate(["q"] * 60, batch_size=60)
    assert sum(t.sub_pth for t in traces) == traces.stats["strict_last_resort"]
    loose = RSDEngine(teacher, student, RSDConfig(max_new_tokens=20, draft_tokens=4, pth=0.15)).generate(["q"] * 60, batch_size=60)
    assert sum(t.sub_pth for t in loose) > 0  # the plain rule does let some in here


def test_bridged_pairs_decode_step_by_step(caplog):
    teacher = tiny_lm("asset:qwen2", "llama", seed=0)
    student = tiny_lm("asset:llama-bpe", "llama", seed=0)
    with caplog.at_level("WARNING", logger="rsd_toolkit.engine"):
        engine = RSDEngine(teacher, student, RSDConfig(max_new_tokens=4, draft_tokens=4))
    assert not engine.speculative and "step by step" in caplog.text
    assert len(engine.generate(["q"])[0].ids) == 4


def test_draft_tokens_is_validated():
    with pytest.raises(ConfigError, match="draft_tokens"):
        RSDConfig(draft_tokens=-1)
    with pytest.raises(ConfigError, match="draft_tokens"):
        RSDConfig(draft_tokens=1000)


@pytest.fixture(scope="module")
def base_qwen():
    return tiny_lm("asset:qwen2", "llama", seed=0)


def test_rejected_drafts_keep_the_cache_within_a_quarter_of_the_longest_row():
    """Rows accept different numbers of drafts each round, and every rejected draft leaves a hole: the
    caches are compacted before a round would take them past 1.25x their longest row."""
    teacher = boosted(tiny_lm("asset:qwen2", "qwen2", hidden=96, seed=1))
    student = boosted(tiny_lm("asset:qwen2", "llama", hidden=64, seed=2))
    out = RSDEngine(teacher, student, RSDConfig(max_new_tokens=80, draft_tokens=4)).generate(PROMPTS, batch_size=5)
    assert 0 < out.stats["draft_accepted"] < out.stats["drafted"]  # ragged: holes were left
    for side in ("teacher", "student"):
        assert 1.0 < out.stats[f"{side}_cache_width"] / out.stats[f"{side}_cache_longest"]
        assert out.stats[f"{side}_cache_width_over_longest_max"] <= 1.25

"""RSD engine: decisions, distributions, batching and cross-vocabulary traces with real tokenizers."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from conftest import tiny_lm
from rsd_toolkit.config import ConfigError, RSDConfig
from rsd_toolkit.engine import BatchedContext, RSDEngine
from rsd_toolkit.models import LM
from test_sampling import assert_distributed_as, exact_top_p

PROMPTS = ["What is 2 + 2?", "Name a prime number.", "Say hello.", "Count to three.", "Why is the sky blue?"]


class FixedHead(torch.nn.Module):
    """An LM head that ignores the hidden state: the next-token distribution is set by hand."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, hidden):
        return self.logits.to(hidden.dtype).expand(*hidden.shape[:-1], -1)


class MaskedHead(torch.nn.Module):
    """The model's own head, restricted to an allowed set of tokens."""

    def __init__(self, head, allowed: torch.Tensor):
        super().__init__()
        self.head = head
        self.register_buffer("bias", torch.where(allowed, 0.0, -1e9))

    def forward(self, hidden):
        return self.head(hidden) + self.bias


WORDS = (
    "the of and to in is was for on that with as by at from his it an were are which this be or has had not but "
    "first one their its new after who they have two her she been other when there all during into school time "
    "may years more most only over city some world would where later up such used many can state about national "
    "number sum total prime answer step then so we get add minus times equals therefore check result value"
).split() + [str(n) for n in range(100)] + [".", ",", "=", "+", "(", ")", ":"]


def common_pieces(lm: LM) -> torch.Tensor:
    """Every token of this tokenizer's encodings of a few hundred common words, digits and signs."""
    ids = {i for w in WORDS for text in (w, " " + w) for i in lm.vocab.encode(text)}
    return torch.tensor(sorted(ids))


class BoostHead(torch.nn.Module):
    """The model's own head plus a logit bonus for chosen tokens: two random models that like the same
    words in different tokenizers, so the student accepts a fair share of the teacher's proposals."""

    def __init__(self, head, ids: torch.Tensor, vocab_size: int, seed: int = 0):
        super().__init__()
        self.head = head
        strength = 6 + 5 * torch.rand(len(ids), generator=torch.Generator().manual_seed(seed))  # p_s spans pth
        self.register_buffer("bias", torch.zeros(vocab_size).index_put_((ids,), strength))

    def forward(self, hidden):
        return self.head(hidden) + self.bias


def boosted(lm: LM) -> LM:
    return with_head(lm, BoostHead(lm.model.lm_head, common_pieces(lm), lm.model.config.vocab_size))


def with_head(lm: LM, head: torch.nn.Module) -> LM:
    model = copy.deepcopy(lm.model)
    model.lm_head = head
    return LM.wrap(model, lm.tokenizer, name=lm.name + "+head")


def fixed(lm: LM, probs: dict[int, float]) -> LM:
    logits = torch.full((lm.model.config.vocab_size,), -1e4)
    for i, p in probs.items():
        logits[i] = torch.tensor(p).log()
    return with_head(lm, FixedHead(logits))


A, B, C, D = 1000, 2000, 3000, 4000  # ordinary word pieces of the qwen2 vocabulary
T_IDS = list(range(5000, 5025))
SUB = list(range(6000, 6050))


@pytest.fixture(scope="module")
def base():
    return tiny_lm("asset:qwen2", "llama", seed=0)


def run(teacher, student, n_rows=4, tokens=12, **cfg):
    cfg = {"max_new_tokens": tokens, **cfg}
    return RSDEngine(teacher, student, RSDConfig(**cfg)).generate(["q"] * n_rows, batch_size=n_rows)


def records(traces):
    return [r for t in traces for r in t.records]


# -- exact decisions on hand-set distributions -------------------------------------------------------
def test_accepts_when_student_probability_reaches_pth(base):
    out = records(run(fixed(base, {A: 1.0}), fixed(base, {A: 0.02, B: 0.98})))
    assert {(r.id, r.source) for r in out} == {(A, "teacher")}
    assert all(abs(r.p_s - 0.02) < 1e-4 and abs(r.p_t - 1.0) < 1e-4 for r in out)


def test_rejects_below_pth_and_student_samples(base):
    traces = run(fixed(base, {A: 1.0}), fixed(base, {A: 0.005, B: 0.995}))
    assert {(r.id, r.source) for r in records(traces)} == {(B, "student")}
    assert all(t.acceptance_rate == 0.0 and t.decisions == 12 for t in traces)


def test_tempered_acceptance_probabilities(base):
    teacher, student = fixed(base, {A: 1.0}), fixed(base, {A: 0.02, B: 0.98})
    assert {r.source for r in records(run(teacher, student, acceptance_probs="raw"))} == {"teacher"}
    # at T=0.7: 0.02**(1/0.7) / (0.02**(1/0.7) + 0.98**(1/0.7)) = 0.0038 < 0.01
    assert {r.source for r in records(run(teacher, student, acceptance_probs="tempered"))} == {"student"}


def test_strict_fallback_leaves_no_sub_pth_token(base):
    teacher = fixed(base, {A: 1.0})
    student = fixed(base, {C: 0.5, A: 0.005, **{i: 0.0099 for i in SUB}})
    loose = run(teacher, student, n_rows=8, tokens=25, fallback="sample")
    strict = run(teacher, student, n_rows=8, tokens=25, fallback="strict")
    assert sum(t.sub_pth for t in loose) > 0  # the paper's rule lets sub-pth student tokens in
    assert sum(t.sub_pth for t in strict) == 0
    assert {r.id for r in records(strict)} == {C}


def test_reference_top20_gate_and_topk_fallback(base):
    teacher = fixed(base, {A: 1.0})
    student = fixed(base, {**{i: 0.03 for i in T_IDS}, A: 0.02, C: 0.23})  # A passes pth but ranks 27th
    plain = records(run(teacher, student))
    assert {r.source for r in plain} == {"teacher"}
    ref = records(run(teacher, student, **{"student_topk_gate": True, "fallback": "topk", "k": 20}))
    assert {r.source for r in ref} == {"student"}
    assert {r.id for r in ref} <= {C, *T_IDS}


def test_reference_five_teacher_draws(base):
    teacher = fixed(base, {A: 0.5, D: 0.5})
    student = fixed(base, {A: 0.001, D: 0.03, C: 0.969})
    one = run(teacher, student, n_rows=10, tokens=30)
    five = run(teacher, student, n_rows=10, tokens=30, teacher_draws=5)
    rate = lambda ts: sum(t.accepted for t in ts) / sum(t.decisions for t in ts)  # noqa: E731
    assert 0.35 < rate(one) < 0.65  # expected 0.5
    assert rate(five) > 0.9  # expected 1 - 0.5**5 = 0.97
    assert all(r.id == D for r in records(five) if r.source == "teacher")


def test_reference_config_is_the_papers_script():
    ref = RSDConfig.reference()
    assert (ref.student_topk_gate, ref.teacher_draws, ref.fallback, ref.k) == (True, 5, "topk", 20)


# -- distributions ---------------------------------------------------------------------------------
TEACHER_P = {A: 0.3, B: 0.25, C: 0.2, D: 0.15, 7000: 0.06, 7001: 0.04}
STUDENT_P = {A: 0.05, B: 0.6, 7002: 0.2, 7003: 0.1, 7004: 0.05}


def expected(probs: dict[int, float], cfg: RSDConfig) -> torch.Tensor:
    ids = sorted(probs)
    tempered = torch.tensor([probs[i] for i in ids]).pow(1 / cfg.temperature)
    nucleus = exact_top_p(tempered / tempered.sum(), cfg.top_p)
    out = torch.zeros(8000)
    out[ids] = nucleus
    return out


@pytest.mark.parametrize("pth,source", [(0.0, "teacher"), (1.5, "student")])
def test_limits_of_pth_reproduce_teacher_and_student_sampling(base, pth, source):
    cfg = dict(pth=pth, allow_extreme_pth=True, max_new_tokens=40)
    traces = RSDEngine(fixed(base, TEACHER_P), fixed(base, STUDENT_P), RSDConfig(**cfg)).generate(
        ["q"] * 50, batch_size=50
    )
    ids = torch.tensor([r.id for r in records(traces)])
    assert {r.source for r in records(traces)} == {source}
    assert_distributed_as(ids, expected(TEACHER_P if source == "teacher" else STUDENT_P, RSDConfig(**cfg)))


# -- batching ------------------------------------------------------------------------------------------
def test_batched_equals_batch_size_one():
    teacher = boosted(tiny_lm("asset:qwen2", "qwen2", hidden=96, seed=1))
    student = boosted(tiny_lm("asset:qwen2", "llama", hidden=64, seed=2))
    engine = RSDEngine(teacher, student, RSDConfig(max_new_tokens=30, pth=0.01))
    alone = [engine.generate([p], seeds=[i])[0] for i, p in enumerate(PROMPTS)]
    batched = engine.generate(PROMPTS, batch_size=5)
    refilled = engine.generate(PROMPTS, batch_size=2)  # rows leave and new prompts join mid-run
    key = lambda t: (t.ids, [r.source for r in t.records])  # noqa: E731
    assert [key(t) for t in batched] == [key(t) for t in alone] == [key(t) for t in refilled]
    sources = {r.source for t in batched for r in t.records}
    assert sources == {"teacher", "student"}  # both branches ran


@pytest.mark.parametrize("student_asset", ["asset:qwen2", "asset:llama-bpe"])
def test_static_step_gives_the_same_traces_as_the_general_step(student_asset):
    """The fixed-shape decode step (what CUDA graphs replay; eager on CPU) changes no token, source or p_s,
    on an exact pair and a bridged one, in a batch that shrinks and refills."""
    teacher = boosted(tiny_lm("asset:qwen2", "qwen2", hidden=96, seed=1))
    student = boosted(tiny_lm(student_asset, "llama", hidden=64, seed=2))
    cfg = RSDConfig(max_new_tokens=40, pth=0.01)
    key = lambda t: (t.ids, [r.source for r in t.records], [round(r.p_s, 4) for r in t.records])  # noqa: E731
    runs = {}
    for static in (False, True):
        engine = RSDEngine(teacher, student, cfg, static_step=static)
        out = engine.generate(PROMPTS, batch_size=3)
        runs[static] = [key(t) for t in out]
        if static:
            assert out.stats["teacher_static_eager"] > 20 and out.stats["student_static_eager"] > 20
        else:
            assert not any(k.endswith(("_eager", "_replayed")) for k in out.stats)
    assert runs[True] == runs[False]


@pytest.mark.parametrize("mode", ["rsd", "teacher"])  # (mode student runs the student alone: its catch-ups are one token)
def test_a_row_catching_up_one_token_per_step_changes_no_trace(monkeypatch, mode):
    """In a wide batch a multi-token catch-up is fed one token per step while the row sits the steps out:
    the same tokens, sources and p_s as feeding it in one padded block, with fewer padded cells."""
    from rsd_toolkit.engine import engine as engine_module

    teacher = boosted(tiny_lm("asset:qwen2", "qwen2", hidden=96, seed=1))
    student = boosted(tiny_lm("asset:llama-bpe", "llama", hidden=64, seed=2))
    cfg = RSDConfig(max_new_tokens=40, pth=0.01, mode=mode)
    key = lambda t: (t.ids, [r.source for r in t.records], [None if r.p_s is None else round(r.p_s, 4) for r in t.records])  # noqa: E731
    runs = {}
    for defer_from in (1, 10**9):
        monkeypatch.setattr(engine_module, "DEFER_FROM_ROWS", defer_from)
        out = RSDEngine(teacher, student, cfg).generate(PROMPTS * 2, batch_size=4)
        runs[defer_from] = ([key(t) for t in out], out.stats)
    (deferred, on), (padded, off) = runs[1], runs[10**9]
    assert deferred == padded
    assert on["catch_up_deferred"] > 0 and not off["catch_up_deferred"]
    for side in ("teacher", "student"):
        assert on[f"{side}_real_positions"] == off[f"{side}_real_positions"]
    waste = lambda s: sum(s[f"{side}_computed_positions"] - s[f"{side}_real_positions"] for side in ("teacher", "student"))  # noqa: E731
    assert waste(on) < waste(off)


def test_keep_false_hands_each_trace_over_and_keeps_none():
    """``generate(keep=False)``: the traces reach ``progress`` (the same ones ``keep=True`` returns) and the
    Generation holds None in their place; without a callback the call refuses before decoding anything."""
    teacher = boosted(tiny_lm("asset:qwen2", "qwen2", hidden=96, seed=1))
    student = boosted(tiny_lm("asset:llama-bpe", "llama", hidden=64, seed=2))
    engine = RSDEngine(teacher, student, RSDConfig(max_new_tokens=12, pth=0.01))
    with pytest.raises(ValueError, match="keep=False needs a progress callback"):
        engine.generate(PROMPTS, keep=False)
    handed = []
    out = engine.generate(PROMPTS, batch_size=2, progress=handed.append, keep=False)
    kept = engine.generate(PROMPTS, batch_size=2)
    assert list(out) == [None] * len(PROMPTS)
    assert sorted((t.index, t.ids) for t in handed) == [(t.index, t.ids) for t in kept]
    assert out.stats["row_steps"] == kept.stats["row_steps"] > 0


def test_a_free_slot_is_refilled_within_a_batch_of_empty_row_steps():
    """Rows finish in different steps (a stop string; bridged rows also reach the budget apart). While prompts wait, the empty row-steps since the
    last join stay below one full step's worth (``JOIN_AFTER_STEPS``): a lone free slot is refilled after at
    most B steps, not left empty until a quarter of the batch is free. Traces do not depend on when rows join."""
    from rsd_toolkit.engine import engine as engine_module

    teacher = boosted(tiny_lm("asset:qwen2", "qwen2", hidden=96, seed=1))
    student = boosted(tiny_lm("asset:llama-bpe", "llama", hidden=64, seed=2))
    batch, prompts = 8, PROMPTS * 4
    cfg = RSDConfig(max_new_tokens=40, pth=0.01, stop_strings=[" the"])  # rows end at the budget or earlier, as at EOS
    engine = RSDEngine(teacher, student, cfg)
    run, join, sizes, waiting = engine._run, engine._join, [], []

    def counting_run(prompts, seeds, todo, *args):
        step = engine._step

        def step_and_count(rows, ctx):  # rows in each step, and whether prompts were still waiting
            sizes.append(len(rows))
            waiting.append(bool(todo))
            step(rows, ctx)

        engine._step = step_and_count
        try:
            run(prompts, seeds, todo, *args)
        finally:
            engine._step = step

    def counting_join(ctx, rows, new):
        sizes.append(None)  # a join before the next step
        join(ctx, rows, new)

    engine._run, engine._join = counting_run, counting_join
    out = engine.generate(prompts, batch_size=batch)
    empty, worst, steps = 0, 0, iter(waiting)
    for size in sizes:  # empty row-steps since the last join, counted while prompts wait
        if size is None:
            empty = 0
        elif next(steps):
            empty += batch - size
            worst = max(worst, empty)
    assert sizes.count(None) > 2 and min(s for s in sizes if s is not None) < batch  # rows left and others joined
    assert worst < batch * engine_module.JOIN_AFTER_STEPS
    alone = RSDEngine(teacher, student, cfg).generate(prompts, batch_size=len(prompts))
    assert [t.ids for t in out] == [t.ids for t in alone]
    assert out.stats["joins"] == sizes.count(None) and out.stats["steps"] == len(waiting)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("student_asset", ["asset:qwen2", "asset:llama-bpe"])
def test_cuda_graphs_give_the_same_traces_as_eager_on_cuda(student_asset):
    """On CUDA the fixed-shape step is captured and replayed: same tokens as the eager general step, and
    the replays are the graph hits (none failed)."""
    teacher = boosted(tiny_lm("asset:qwen2", "qwen2", hidden=96, seed=1))
    student = boosted(tiny_lm(student_asset, "llama", hidden=64, seed=2))
    on_gpu = lambda lm: LM.wrap(copy.deepcopy(lm.model).cuda(), lm.tokenizer, name=lm.name)  # noqa: E731
    teacher, student = on_gpu(teacher), on_gpu(student)
    cfg = RSDConfig(max_new_tokens=40, pth=0.01)
    key = lambda t: (t.ids, [r.source for r in t.records])  # noqa: E731
    eager_engine = RSDEngine(teacher, student, cfg, static_step=True)
    for st in eager_engine.static.values():
        st.graphs = False  # the same fixed-shape kernels, launched one by one
    eager = eager_engine.generate(PROMPTS, batch_size=3)
    engine = RSDEngine(teacher, student, cfg)  # default on CUDA: graphs
    graphed = engine.generate(PROMPTS, batch_size=3)
    for side in ("teacher", "student"):
        assert graphed.stats[f"{side}_static_replayed"] > 20 and not graphed.stats[f"{side}_static_failed"]
    assert [key(t) for t in graphed] == [key(t) for t in eager]


def test_a_catch_up_re_feeds_a_token_only_when_its_tokens_are_scored():
    """Bringing a model up to date after a rollback computes only the new tokens (no re-fed token padding
    the batch); scoring them re-feeds the token before, so every new token's predictor comes out too."""
    from rsd_toolkit.bridges import Update
    from rsd_toolkit.engine import BatchedContext

    lm = tiny_lm("asset:qwen2", "llama", seed=3)
    engine = RSDEngine(lm, lm, RSDConfig())
    for score in (False, True):
        ctx = BatchedContext(lm.model, 2, static=False)
        ctx.extend([[1, 2, 3, 4], [5, 6, 7, 8]])
        ctx.positions = {"real": 0, "computed": 0}
        preds = engine._extend(ctx, lm, {0: Update(1, [9, 10])}, {0: 3}, score=score)  # 3: the token kept last
        assert ctx.positions["computed"] == (3 if score else 2)
        with torch.inference_mode():
            full = lm.model(input_ids=torch.tensor([[1, 2, 3, 9, 10]])).logits[0]
        torch.testing.assert_close(ctx.last_logits[0], full[-1], atol=1e-4, rtol=1e-4)
        if score:
            torch.testing.assert_close(preds[0], full[2:4], atol=1e-4, rtol=1e-4)


# -- across tokenizers -------------------------------------------------------------------------------
def no_kept_logits(monkeypatch):
    """Every span with a rollback is probed: the context hands out no logits kept from earlier forwards."""
    real = BatchedContext.logits_after_rollback
    monkeypatch.setattr(BatchedContext, "logits_after_rollback", lambda self, row, count: real(self, row, count) if count == 0 else None)


@pytest.mark.parametrize("kept_logits", [True, False])
def test_cross_vocabulary_traces_are_canonical_and_respect_pth(kept_logits, monkeypatch):
    if not kept_logits:
        no_kept_logits(monkeypatch)
    teacher = boosted(tiny_lm("asset:qwen2", "qwen2", hidden=96, seed=1))
    student = boosted(tiny_lm("asset:llama-bpe", "llama", hidden=64, seed=2))
    cfg = RSDConfig(max_new_tokens=80, pth=0.01)
    engine = RSDEngine(teacher, student, cfg)
    assert engine.kind == "bridged"
    traces = engine.generate(PROMPTS, batch_size=5)
    teacher_sourced = 0
    for t in traces:
        body = t.ids[:-1] if t.finish_reason == "eos" else t.ids
        assert student.vocab.encode(t.text) == body
        assert len(t.records) == len(t.ids)
        for r in t.records:
            assert r.p_s is not None
            if r.source == "teacher":
                teacher_sourced += 1
                assert r.p_s >= cfg.pth
    assert teacher_sourced > 50 and sum(t.decisions - t.accepted for t in traces) > 20
    if kept_logits:  # a token replacing the newest one was scored on the logits that predicted that one
        assert traces.stats["scored_on_kept_logits"] > 5
    else:  # spans other than one appended token were judged by a batched probe
        assert traces.stats["probed"] > 5 and traces.stats["scored_on_kept_logits"] == 0
    alone = [engine.generate([p], seeds=[i])[0] for i, p in enumerate(PROMPTS)]
    key = lambda t: (t.ids, [r.source for r in t.records], [round(r.p_s, 5) for r in t.records])  # noqa: E731
    assert [key(t) for t in traces] == [key(t) for t in alone]  # probes of some rows leave the others alone


@pytest.mark.parametrize("kept_logits", [True, False])
def test_span_with_rollback_is_judged_on_every_student_token(kept_logits, monkeypatch):
    """qwen2 writes digits one by one, llama-bpe groups three: each teacher "1" re-tokenises the student side
    ("1" -> "11": a one-token rollback, scored on the logits that predicted the "1"; or, without them, probed)."""
    if not kept_logits:
        no_kept_logits(monkeypatch)
    judged = lambda out: out.stats["scored_on_kept_logits" if kept_logits else "probed"]  # noqa: E731
    t_base, s_base = tiny_lm("asset:qwen2", "llama", seed=0), tiny_lm("asset:llama-bpe", "llama", seed=0)
    one = t_base.vocab.encode("1")[0]
    ones = {n: s_base.vocab.encode("1" * n)[0] for n in (1, 2, 3)}
    teacher = fixed(t_base, {one: 1.0})
    student = fixed(s_base, {ones[1]: 0.2, ones[2]: 0.3, ones[3]: 0.5})
    engine = RSDEngine(teacher, student, RSDConfig(max_new_tokens=4))
    out = engine.generate(["q"])
    t = out[0]
    assert t.text == "1" * 10 and t.ids == s_base.vocab.encode("1" * 10)  # 111 111 111 1
    assert [(r.source, round(r.p_s, 4)) for r in t.records] == [("teacher", 0.5)] * 3 + [("teacher", 0.2)]
    assert judged(out) >= 6 and out.stats["probe_accepted"] == out.stats["probed"]
    # the same span is rejected when its merged token is too unlikely: the student writes its own "1",
    # and that text re-tokenises to student-sourced "11"/"111" (merges can still make sub-pth tokens)
    student = fixed(s_base, {ones[1]: 0.995, ones[2]: 0.004, ones[3]: 0.001})
    engine = RSDEngine(teacher, student, RSDConfig(max_new_tokens=3))
    out = engine.generate(["q"])
    t = out[0]
    assert judged(out) > 0 and out.stats["probe_accepted"] == 0
    assert t.ids == s_base.vocab.encode(t.text) and {r.source for r in t.records[:-1]} == {"student"}


def word_tokens(lm: LM) -> torch.Tensor:
    """Tokens that are ' ' + ASCII letters and encode to themselves: any sequence of them is canonical."""
    allowed = torch.zeros(lm.model.config.vocab_size, dtype=torch.bool)
    for i, b in enumerate(lm.vocab.token_bytes):
        if re.fullmatch(rb" [a-zA-Z]{2,}", b) and lm.vocab.encode(b.decode()) == [i]:
            allowed[i] = True
    allowed[lm.primary_stop] = True
    return allowed


def test_forced_text_bridge_on_identical_pair_gives_the_same_traces():
    teacher = boosted(tiny_lm("asset:qwen2", "qwen2", hidden=96, seed=1))
    student = boosted(tiny_lm("asset:qwen2", "llama", hidden=64, seed=2))
    allowed = word_tokens(teacher)
    teacher = with_head(teacher, MaskedHead(teacher.model.lm_head, allowed))
    student = with_head(student, MaskedHead(student.model.lm_head, allowed))
    cfg = RSDConfig(max_new_tokens=40, pth=0.01)
    exact = RSDEngine(teacher, student, cfg)
    forced = RSDEngine(teacher, student, cfg, bridge_kind="bridged")
    assert (exact.kind, forced.kind) == ("identical", "bridged")
    a, b = exact.generate(PROMPTS, batch_size=5), forced.generate(PROMPTS, batch_size=5)
    for x, y in zip(a, b):
        assert (x.text, x.ids, [r.source for r in x.records]) == (y.text, y.ids, [r.source for r in y.records])
        assert [round(r.p_s, 4) for r in x.records] == [round(r.p_s, 4) for r in y.records]
    assert {r.source for t in a for r in t.records} == {"teacher", "student"}


# -- modes and errors ----------------------------------------------------------------------------------
def test_teacher_mode_without_student_and_student_mode_without_teacher(base):
    teacher = fixed(base, {A: 1.0})
    alone = RSDEngine(teacher, None, RSDConfig(mode="teacher", max_new_tokens=5)).generate(["q"])[0]
    assert alone.ids == [A] * 5 and alone.records[0].p_s is None
    student = fixed(base, {B: 1.0})
    s = RSDEngine(None, student, RSDConfig(mode="student", max_new_tokens=5)).generate(["q"])[0]
    assert s.ids == [B] * 5 and s.records[0].source == "student"


def test_eos_ends_the_trace(base):
    teacher = fixed(base, {base.primary_stop: 1.0})
    t = RSDEngine(teacher, fixed(base, {base.primary_stop: 1.0}), RSDConfig(max_new_tokens=9)).generate(["q"])[0]
    assert (t.finish_reason, t.ids, t.text) == ("eos", [base.primary_stop], "")


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"pth": 0}, "accepts every teacher token"),
        ({"pth": 1.5}, "rejects every teacher token"),
        ({"pth": -0.1}, "pth must be in (0, 1]"),
        ({"pth": float("nan")}, "pth must be in (0, 1]"),
        ({"fallback": "greedy"}, "fallback must be one of"),
        ({"top_p": 0}, "top_p must be in (0, 1]"),
    ],
)
def test_bad_config_is_one_clear_error(kwargs, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        RSDConfig(**kwargs)


def test_out_of_memory_halves_the_batch_and_finishes(base, monkeypatch, caplog):
    from rsd_toolkit.engine import context

    teacher, student = fixed(base, TEACHER_P), fixed(base, STUDENT_P)
    engine = RSDEngine(teacher, student, RSDConfig(max_new_tokens=6))
    want = engine.generate(PROMPTS, batch_size=4)
    real = context.BatchedContext._forward

    def tight_memory(self, cache, valid, ids, *args):
        if ids.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, cache, valid, ids, *args)

    monkeypatch.setattr(context.BatchedContext, "_forward", tight_memory)
    with caplog.at_level("WARNING", logger="rsd_toolkit.engine"):
        got = engine.generate(PROMPTS, batch_size=8)
    assert [t.ids for t in got] == [t.ids for t in want]
    assert "batch size halved to 4" in caplog.text and "batch size halved to 2" in caplog.text


def test_stop_string_ends_the_trace(base):
    teacher, student = fixed(base, {A: 1.0}), fixed(base, {A: 0.5, B: 0.5})
    stop = base.vocab.text_of([A, A])
    t = RSDEngine(teacher, student, RSDConfig(max_new_tokens=20, stop_strings=(stop,))).generate(["q"])[0]
    assert (t.finish_reason, t.ids) == ("stop", [A, A])


def test_tokenizer_pair_is_checked_before_any_weights_load():
    from rsd_toolkit.models import load_pair

    kind, teacher_tok, student_tok = load_pair("asset:qwen2", "asset:llama-bpe")
    assert kind == "bridged" and len(teacher_tok) > len(student_tok)


def test_a_tokenizer_asset_is_not_a_model():
    from rsd_toolkit.models import ModelLoadError, resolve_model_dir

    with pytest.raises(ModelLoadError, match="tokenizer only, no weights"):
        resolve_model_dir("asset:qwen2")


# -- strict on the canonical trace ---------------------------------------------------------------------
def digit_pair():
    """qwen2 writes digits one by one, llama-bpe merges up to three: a student "1" after a "1" becomes "11"."""
    t_base, s_base = tiny_lm("asset:qwen2", "llama", seed=0), tiny_lm("asset:llama-bpe", "llama", seed=0)
    ones = {n: s_base.vocab.encode("1" * n)[0] for n in (1, 2, 3)}
    return t_base, s_base, ones, fixed(t_base, {t_base.vocab.encode("x")[0]: 1.0})  # a teacher the student rejects


def test_strict_fallback_judges_the_retokenised_span_and_draws_again():
    t_base, s_base, ones, teacher = digit_pair()
    word = s_base.vocab.encode(" the")[0]  # never merges with a digit
    student = fixed(s_base, {ones[1]: 0.6, word: 0.395, ones[2]: 0.004, ones[3]: 0.001})
    cfg = dict(max_new_tokens=30, pth=0.01)
    loose = RSDEngine(teacher, student, RSDConfig(**cfg)).generate(PROMPTS, batch_size=5)
    assert sum(t.sub_pth for t in loose) > 0  # "1" then "1" re-tokenises into an unjudged "11"
    engine = RSDEngine(teacher, student, RSDConfig(**cfg, fallback="strict"))
    strict = engine.generate(PROMPTS, batch_size=5)
    assert sum(t.sub_pth for t in strict) == 0 and strict.stats["strict_last_resort"] == 0
    # merged choices ("11" replacing "1": scored on the logits that predicted the "1") were judged and redrawn
    assert strict.stats["scored_on_kept_logits"] > 0
    for t in strict:
        assert t.ids == s_base.vocab.encode(t.text) and {r.source for r in t.records} == {"student"}
        assert all(r.p_s >= 0.01 for r in t.records) and ones[1] in t.ids and word in t.ids


def test_strict_last_resort_when_no_choice_passes():
    t_base, s_base, ones, teacher = digit_pair()
    student = fixed(s_base, {ones[1]: 0.995, ones[2]: 0.004, ones[3]: 0.001})  # every "1" after a "1" merges
    engine = RSDEngine(teacher, student, RSDConfig(max_new_tokens=6, fallback="strict"))
    out = engine.generate(["q"])
    t = out[0]
    assert t.text == "1" * len(t.text) and t.ids == s_base.vocab.encode(t.text)
    assert out.stats["strict_last_resort"] > 0 and t.sub_pth > 0  # documented: the best tried choice enters
    assert [r.p_s for r in t.records if r.p_s < 0.01] and all(r.source == "student" for r in t.records)


def test_a_span_whose_first_token_fails_is_rejected_without_its_probe(monkeypatch):
    """A proposal whose student span fails on its first token (read off the current logits) is rejected
    before the probe forward: the same traces, sources and p_s as probing it, with fewer probes. (A
    SentencePiece student: a byte-level teacher's " word" is often its "▁" then "word".)"""
    teacher = boosted(tiny_lm("asset:llama-bpe", "qwen2", hidden=96, seed=1))
    student = boosted(tiny_lm("asset:mistral-v1", "llama", hidden=64, seed=2))
    cfg = RSDConfig(max_new_tokens=60, pth=0.01)
    key = lambda t: (t.ids, [r.source for r in t.records], [round(r.p_s, 5) for r in t.records])  # noqa: E731
    skipping = RSDEngine(teacher, student, cfg).generate(PROMPTS, batch_size=5)
    monkeypatch.setattr(RSDEngine, "_first_token_passes", lambda self, s_ctx, s_logits, cands: cands)
    probing = RSDEngine(teacher, student, cfg).generate(PROMPTS, batch_size=5)
    assert [key(t) for t in skipping] == [key(t) for t in probing]
    assert skipping.stats["probe_skipped"] > 0
    assert skipping.stats["probed"] + skipping.stats["probe_skipped"] == probing.stats["probed"]
    assert skipping.stats["probe_accepted"] == probing.stats["probe_accepted"] > 0


@pytest.mark.parametrize("pair", [("asset:qwen2", "asset:llama-bpe"), ("asset:llama-bpe", "asset:mistral-v1")])
def test_a_token_replacing_the_newest_is_scored_without_a_probe(pair, monkeypatch):
    """A span that rolls back one student token (a merge: "1" + "1" -> "11", "▁th" + "e" -> "▁the") is
    judged, or rejected on its first token, on the logits the context kept from the forward that predicted
    the replaced token: the same traces, sources and p_s as probing it, with fewer probe forwards."""
    teacher = boosted(tiny_lm(pair[0], "qwen2", hidden=96, seed=1))
    student = boosted(tiny_lm(pair[1], "llama", hidden=64, seed=2))
    cfg = RSDConfig(max_new_tokens=60, pth=0.01)
    kept = RSDEngine(teacher, student, cfg).generate(PROMPTS, batch_size=5)
    no_kept_logits(monkeypatch)
    probing = RSDEngine(teacher, student, cfg).generate(PROMPTS, batch_size=5)
    for a, b in zip(kept, probing):
        assert (a.ids, [r.source for r in a.records]) == (b.ids, [r.source for r in b.records])
        assert [r.p_s for r in a.records] == pytest.approx([r.p_s for r in b.records], abs=1e-5)
    assert probing.stats["scored_on_kept_logits"] == 0
    assert kept.stats["probe_skipped"] > probing.stats["probe_skipped"] + 10  # first tokens of rolled-back spans
    assert kept.stats["probed"] < probing.stats["probed"] - 10

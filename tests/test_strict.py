"""Strict fallback across tokenizers: no sub-pth token enters except by a counted, unavoidable last resort.

The reproduction (issue 19) is the student side of a real cross-family trace: qwen2 teacher tokenizer,
SmolLM2's tokenizer as student. After the teacher's "… and the given information." the student writes
``" \\n"`` then ``"\\n"`` (held together as ``" \\n\\n"``); any non-space choice then re-splits the
whitespace into ``" \\n"``, ``"\\n"``, choice, and the choice is judged after ``"\\n"``, a context the
student never sampled from. There the student gives ``"1"`` p_s 1.4e-6 (as the real SmolLM2 did).
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import require_assets, tiny_lm
from rsd_toolkit.config import RSDConfig
from rsd_toolkit.engine import RSDEngine
from rsd_toolkit.models import LM
from test_engine import BoostHead, common_pieces, fixed

SPACE_NL, NL, NL2, ONE, TO = 3717, 198, 38028, 33, 2068  # SmolLM2: " \n", "\n", " \n\n", "1", "To"
PREFIX = "To solve the problem, we need to use the properties of an isosceles trapezoid and the given information."


class BigramHead(torch.nn.Module):
    """Next-token logits that depend on the last token only (for a model whose layers add nothing, the
    final hidden state is the normalised embedding of the last token): ``table[last]``, else ``default``."""

    def __init__(self, keys: torch.Tensor, rows: torch.Tensor, default: torch.Tensor):
        super().__init__()
        self.register_buffer("keys", keys)  # [K, H] final hidden state of each key token
        self.register_buffer("rows", rows)  # [K, V]
        self.register_buffer("default", default)  # [V]

    def forward(self, hidden):  # [..., H] -> [..., V]
        out = self.default.to(hidden.dtype).expand(*hidden.shape[:-1], -1)
        for key, row in zip(self.keys, self.rows):
            hit = (hidden - key.to(hidden.dtype)).abs().amax(-1, keepdim=True) < 1e-4
            out = torch.where(hit, row.to(hidden.dtype), out)
        return out


def bigram(lm: LM, table: dict[int, dict[int, float]], default: dict[int, float]) -> LM:
    """``lm`` turned into a bigram model: p(next | last token) from ``table``, ``default`` otherwise."""
    model = copy.deepcopy(lm.model)
    for layer in model.model.layers:  # each layer adds zero to the residual stream
        torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
        torch.nn.init.zeros_(layer.mlp.down_proj.weight)
    V = model.config.vocab_size

    def logits(probs: dict[int, float]) -> torch.Tensor:
        row = torch.full((V,), -30.0)
        for i, p in probs.items():
            row[i] = torch.tensor(p).log()
        return row

    with torch.no_grad():
        keys = model.model.norm(model.model.embed_tokens.weight[list(table)])
    model.lm_head = BigramHead(keys, torch.stack([logits(p) for p in table.values()]), logits(default))
    return LM.wrap(model, lm.tokenizer, name=lm.name + "+bigram")


@pytest.fixture(scope="module")
def repro():
    require_assets("smollm2")
    t_base, s_base = tiny_lm("asset:qwen2", "llama", seed=0), tiny_lm("asset:smollm2", "llama", layers=1, seed=0)
    let = s_base.vocab.encode("Let")[0]
    assert s_base.vocab.encode(" \n\n1") == [SPACE_NL, NL, ONE] and s_base.vocab.encode(" \n\n") == [NL2]
    student = bigram(s_base, {
        SPACE_NL: {NL: 0.998, SPACE_NL: 0.002},
        NL2: {ONE: 0.9, TO: 0.1},  # after the held " \n\n" the student wants "1" (it never saw it split)
        NL: {let: 0.99, ONE: 1.4e-6, TO: 1e-6},  # after the canonical "\n": "1" is 1.4e-6, as in the issue
    }, default={SPACE_NL: 0.95, NL2: 0.05})  # fmt: skip
    teacher = fixed(t_base, {t_base.vocab.encode("x")[0]: 1.0})  # proposals the student always rejects
    return teacher, student, let


def strict_run(teacher, student, prompts, **cfg):
    config = RSDConfig(fallback="strict", chat_template=False, **{"max_new_tokens": 9, **cfg})
    engine = RSDEngine(teacher, student, config)
    return engine, engine.generate(prompts, batch_size=len(prompts))


def test_split_point_finds_where_the_choice_starts():
    from rsd_toolkit.engine.strict import split_point

    assert split_point([b" \n\n"], [b" \n", b"\n", b"1"]) == 2
    assert split_point([b"1"], [b"11"]) is None  # merged into the held token: no own start
    assert split_point([b" \n", b"\n"], [b" \n\n", b"x"]) == 1
    assert split_point([], [b"a", b"b"]) is None and split_point([b"a"], [b"a"]) is None


def test_reproduction_whitespace_split_lets_no_sub_pth_token_in(repro):
    """Fails on the code before issue 19: every strict choice after " \\n\\n" re-split and failed, and the
    last resort let "1" (p_s 1.4e-6) in."""
    teacher, student, let = repro
    engine, traces = strict_run(teacher, student, [PREFIX] * 4)
    assert engine.kind == "bridged"
    assert any(t.ids[:3] == [SPACE_NL, NL, let] for t in traces)  # the " \n" "\n", then a choice that passes
    for t in traces:
        assert t.ids == student.vocab.encode(t.text) and {r.source for r in t.records} == {"student"}
        assert t.sub_pth == 0 and t.last_resorts == 0
        assert all(r.p_s >= 0.01 for r in t.records)
    assert traces.stats["strict_last_resort"] == 0 and traces.stats["strict_split_context"] > 0
    # the same run with fallback "sample" lets the 1.4e-6 "1" in: the case is real, not an artefact
    loose = RSDEngine(teacher, student, RSDConfig(chat_template=False, max_new_tokens=9)).generate([PREFIX] * 4, batch_size=4)
    assert any(r.id == ONE and r.p_s < 1e-5 for t in loose for r in t.records)


def test_unavoidable_last_resort_is_counted_in_record_and_trace(repro):
    """When no choice passes in either context, the least bad enters, marked and counted."""
    teacher, _, _ = repro
    s_base = tiny_lm("asset:smollm2", "llama", layers=1, seed=0)
    student = bigram(s_base, {SPACE_NL: {NL: 0.998, SPACE_NL: 0.002}, NL2: {ONE: 0.9, TO: 0.1},
                              NL: {NL: 0.997, ONE: 1e-3, TO: 2e-3}}, default={SPACE_NL: 0.95, NL2: 0.05})  # fmt: skip
    engine, traces = strict_run(teacher, student, [PREFIX], max_new_tokens=4)
    t = traces[0]
    assert t.sub_pth > 0 and t.sub_pth == t.last_resorts == sum(r.last_resort for r in t.records)
    assert traces.stats["strict_last_resort"] >= 1
    assert t.to_dict()["last_resorts"] == t.last_resorts
    bad = [r for r in t.records if r.p_s < 0.01]
    assert bad and all(r.last_resort for r in bad) and max(r.p_s for r in bad) == pytest.approx(2e-3, rel=1e-3)


# -- property: over random contexts, a strict trace's sub-pth tokens are exactly its last resorts ---------
@pytest.fixture(scope="module")
def random_pair():
    require_assets("smollm2")
    teacher = tiny_lm("asset:qwen2", "qwen2", hidden=96, seed=1)
    student = tiny_lm("asset:smollm2", "llama", hidden=64, seed=2, init_scale=40.0)
    boost = BoostHead(teacher.model.lm_head, common_pieces(teacher), teacher.model.config.vocab_size)
    t_model = copy.deepcopy(teacher.model)
    t_model.lm_head = boost
    return LM.wrap(t_model, teacher.tokenizer, name="qwen2-boosted"), student


def whole_characters(lm: LM, ids: list[int]) -> list[int]:
    """``ids`` up to the end of their last whole UTF-8 character: a budget can cut a trace inside one, whose
    raw ids then end it (the pair's invariant: canonical ids of the text, then the held raw ids)."""
    k = len(ids)
    while k:
        try:
            b"".join(lm.vocab.token_bytes[i] for i in ids[:k]).decode("utf-8")
            return ids[:k]
        except UnicodeDecodeError:
            k -= 1
    return []


WORDS = st.sampled_from(["the", " \n", "\n\n", "  ", "1", "12", "x =", "Let", ",", "é", "日本", "\t", " 3.5"])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompts=st.lists(st.lists(WORDS, min_size=1, max_size=6).map("".join), min_size=1, max_size=3),
       pth=st.sampled_from([0.003, 0.01, 0.05, 0.2]), seed=st.integers(0, 2**16))  # fmt: skip
def test_strict_sub_pth_tokens_are_exactly_its_last_resorts(random_pair, prompts, pth, seed):
    teacher, student = random_pair
    engine, traces = strict_run(teacher, student, prompts, pth=pth, seed=seed, max_new_tokens=16)
    for t in traces:
        body = whole_characters(student, t.ids[:-1] if t.finish_reason == "eos" else t.ids)
        assert student.vocab.encode(student.vocab.text_of(body)) == body
        assert t.sub_pth == t.last_resorts
        assert all(r.last_resort == (r.p_s < pth) for r in t.records)
    assert sum(t.last_resorts for t in traces) <= traces.stats["strict_last_resort"] * 16

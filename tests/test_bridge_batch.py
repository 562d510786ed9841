"""``push_all``: one step's pushes for a batch of pairs, with the tokenizer calls grouped.

The interleaved fuzz (``test_bridges_properties.py``, ``path="batched"``) checks canonical ids on the
batched path; here: a batch equals the same pushes made one at a time, a bad push changes no pair, cached
pushes (no generator) equal uncached ones, copies are independent, and the engine's step time spent in
the bridge is counted.
"""

from __future__ import annotations

import pytest

from rsd_toolkit.bridges import STUDENT, TEACHER, Step, make_bridge, push_all
from rsd_toolkit.bridges.compat import SAMPLE_TEXT
from rsd_toolkit.bridges.incremental import drive

TEXTS = [SAMPLE_TEXT[k * 37 : k * 37 + 300] for k in range(12)] + [" " * 90 + "x", "机器学习" * 20, "0123456789" * 9]


@pytest.mark.parametrize("a,b", [("qwen2", "llama-bpe"), ("llama-bpe", "mistral-v1"), ("qwen2", "qwen2")])
def test_batch_equals_pushes_one_at_a_time(a, b, vocab):
    bridge = make_bridge(vocab(a), vocab(b))
    streams = [bridge.teacher.encode(t) for t in TEXTS]
    batched, single = [bridge.pair() for _ in TEXTS], [bridge.pair() for _ in TEXTS]
    for k in range(max(map(len, streams))):
        live = [r for r, s in enumerate(streams) if k < len(s) and batched[r].may_push(TEACHER)]
        steps = push_all([batched[r] for r in live], TEACHER, [streams[r][k] for r in live])
        assert steps == [single[r].push(TEACHER, streams[r][k]) for r in live]
    student_ids = [bridge.student.encode(" ok")[0]] * len(TEXTS)  # and back from the student side
    assert push_all(batched, STUDENT, student_ids) == [p.push(STUDENT, t) for p, t in zip(single, student_ids)]


def test_a_bad_push_changes_no_pair(vocab):
    bridge = make_bridge(vocab("qwen2"), vocab("llama-bpe"))
    pairs = [bridge.pair() for _ in range(3)]
    token = bridge.teacher.encode(" hello")[0]
    with pytest.raises(ValueError, match="outside the teacher vocabulary"):
        push_all(pairs, TEACHER, [token, token, bridge.teacher.size])
    assert [p.enc[TEACHER].ids for p in pairs] == [[], [], []]
    with pytest.raises(ValueError, match="2 pairs for 1 tokens"):
        push_all(pairs[:2], TEACHER, [token])
    assert push_all([], TEACHER, []) == []


def test_engine_counts_bridge_time():
    from conftest import tiny_lm

    from rsd_toolkit.config import RSDConfig
    from rsd_toolkit.engine import RSDEngine

    teacher, student = tiny_lm("asset:qwen2", "qwen2", hidden=64, seed=1), tiny_lm("asset:llama-bpe", hidden=64, seed=2)
    engine = RSDEngine(teacher, student, RSDConfig(max_new_tokens=6))
    assert engine.kind == "bridged"
    out = engine.generate(["Add 2 and 3.", "Name a colour."], batch_size=2)
    assert out.stats["bridge_s"] > 0


@pytest.mark.parametrize("a,b", [("qwen2", "mistral-v1"), ("llama-bpe", "gpt-2")])
def test_cached_pushes_skip_the_generators_and_change_nothing_else(a, b, vocab):
    """``Pair.start`` answers a push whose windows are cached with the Step itself; the Steps and the
    ids are those of pushes made while every window is a miss (each one a tokenizer call)."""
    bridge = make_bridge(vocab(a), vocab(b))
    ids = bridge.teacher.encode(SAMPLE_TEXT[:1500])
    filler = bridge.pair()
    for i in ids:  # fill the window caches
        filler.push(TEACHER, i)
    warm, cold, direct, steps = bridge.pair(), bridge.pair(), 0, []
    for i in ids:
        started = warm.start(TEACHER, i)
        direct += isinstance(started, Step)
        steps.append(started if isinstance(started, Step) else drive(started))
    assert direct > 0.8 * len(ids)
    for i, step in zip(ids, steps):
        bridge.teacher._window_cache.clear()
        bridge.student._window_cache.clear()
        assert cold.push(TEACHER, i) == step
    assert cold.enc[STUDENT].ids == warm.enc[STUDENT].ids == bridge.student.encode(bridge.teacher.text_of(ids))


@pytest.mark.parametrize("text", [" The copy and the original go their own ways", " 𝄞𝄞 ok"])
def test_a_copy_is_independent(text, vocab):
    """Copies share nothing mutable: a trial pushed on a copy leaves the original as it was (also inside a
    character split across tokens), and the original pushed the same way ends where the copy did."""
    bridge = make_bridge(vocab("qwen2"), vocab("llama-bpe"))
    ids = bridge.teacher.encode(text)
    pair = bridge.pair()
    for i in ids[:-3]:
        pair.push(TEACHER, i)
    before = {side: enc.ids for side, enc in pair.enc.items()}
    trial = pair.copy()
    steps = [trial.push(TEACHER, i) for i in ids[-3:]]
    assert {side: enc.ids for side, enc in pair.enc.items()} == before
    assert [pair.push(TEACHER, i) for i in ids[-3:]] == steps
    assert pair.enc[STUDENT].ids == trial.enc[STUDENT].ids == bridge.student.encode(bridge.teacher.text_of(ids))


def test_rows_sharing_a_window_encode_it_once(vocab):
    """Rows of one step often hold the same window (the tries of one prompt start alike): each distinct
    missing window goes to the tokenizer once, and every row gets what ``encode_window`` gives alone."""
    v = vocab("llama-bpe")
    texts = [f" 0x{k:04x}{k * 7919}" for k in range(6)] * 3 + [" shared window"] * 5
    calls: list[list[str]] = []
    backend = v._continuation

    class Spy:  # the tokenizer object is native: record its batched calls around it
        def encode_batch_fast(self, batch, **kw):
            calls.append(list(batch))
            return backend.encode_batch_fast(batch, **kw)

    v._window_cache.clear()
    v.__dict__["_continuation"] = Spy()
    try:
        got = v.encode_windows(texts)
    finally:
        v.__dict__["_continuation"] = backend
    assert calls == [list(dict.fromkeys(texts))]
    v._window_cache.clear()
    assert got == [v.encode_window(t) for t in texts]

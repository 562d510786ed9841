"""BatchedContext: after any mix of ragged appends, rollbacks, compaction, row selection and merging,
each row's next-token logits equal a plain forward over that row's token sequence."""

from __future__ import annotations

import contextlib
import random

import pytest
import torch

from conftest import tiny_lm
from rsd_toolkit.engine import BatchedContext


def plain_last_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0, -1]


def one_leaves_one_joins(lm, ctx: BatchedContext, seqs: list[list[int]], rng: random.Random, V: int) -> list[list[int]]:
    """Row 1 leaves the batch and a fresh 5-token row joins at the end; returns the rows' sequences."""
    ctx.select([0, 2, 3])
    fresh_seq = [rng.randrange(V) for _ in range(5)]
    fresh = BatchedContext(lm.model, 1)
    fresh.extend([fresh_seq])
    ctx.merge(fresh)
    return [seqs[0], seqs[2], seqs[3], fresh_seq]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_random_edits_match_plain_forward(arch):
    lm = tiny_lm("asset:qwen2", arch, seed=3)
    rng = random.Random(0)
    V = 5000  # any ids will do; small range keeps the check readable
    seqs = [[rng.randrange(V) for _ in range(rng.randint(1, 9))] for _ in range(4)]
    ctx = BatchedContext(lm.model, len(seqs))
    ctx.extend(seqs)
    for step in range(40):
        appends = []
        for b, seq in enumerate(seqs):
            r = rng.choice([0, 0, 0, 1, 2]) if len(seq) > 3 else 0
            if r:
                ctx.rollback(b, r)
                del seq[-r:]
            new = [rng.randrange(V) for _ in range(rng.choice([0, 1, 1, 1, 3]))]
            if r and not new:
                new = [rng.randrange(V)]
            seq.extend(new)
            appends.append(new)
        ctx.extend(appends)
        if step == 20:
            ctx.compact()
        if step == 25:  # a row leaves, a new one joins
            seqs = one_leaves_one_joins(lm, ctx, seqs, rng, V)
    assert ctx.valid.shape[1] > max(map(len, seqs))  # holes were exercised
    for b, seq in enumerate(seqs):
        torch.testing.assert_close(ctx.last_logits[b], plain_last_logits(lm.model, seq), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("static", [False, True])
def test_logits_kept_for_a_one_token_rollback_are_a_plain_forward(static):
    """``logits_after_rollback(b, 1)``, when known, predicts the row's newest token as a plain forward over
    the row without it does; and after that rollback, ``logits_after_rollback(b, 0)`` is the same. Through
    one-token replacements in a chain (the engine's merged tokens), scored spans, checkpoint and restore,
    compaction, rows leaving and joining."""
    lm = tiny_lm("asset:qwen2", "llama", seed=3)
    rng = random.Random(2)
    V = 5000
    seqs = [[rng.randrange(V) for _ in range(rng.randint(2, 6))] for _ in range(4)]
    ctx = BatchedContext(lm.model, 4, static=static)
    ctx.extend([list(q) for q in seqs])
    known = checked = 0
    for step in range(60):
        appends = []
        for b, seq in enumerate(seqs):
            kept = ctx.logits_after_rollback(b, 1)
            if kept is not None:
                known += 1
                if rng.random() < 0.3:  # check a few against a plain forward (the check is the slow part)
                    checked += 1
                    torch.testing.assert_close(kept, plain_last_logits(lm.model, seq[:-1]), atol=2e-4, rtol=1e-4)
            move = rng.choice(["one", "one", "replace", "replace", "span", "back2", "none"]) if len(seq) > 4 else "one"
            if move in ("replace", "back2"):
                r = 1 if move == "replace" else 2
                ctx.rollback(b, r)
                del seq[-r:]
                after = ctx.logits_after_rollback(b, 0)
                assert (after is not None) == (move == "replace" and kept is not None)
                if after is not None:
                    torch.testing.assert_close(after, kept)
            new = {"one": 1, "replace": 1, "span": 3, "back2": 2, "none": 0}[move]
            appends.append([rng.randrange(V) for _ in range(new)])
            seq.extend(appends[-1])
        scores = step % 3 == 0
        saved = ctx.checkpoint([0]) if step % 5 == 0 else None
        ctx.extend(appends, scores=scores)
        if saved is not None:  # a probe of row 0 undone: its tokens leave again
            ctx.restore(saved, [0])
            del seqs[0][len(seqs[0]) - len(appends[0]) :]
        ctx.maybe_compact(slack=0)
        if step == 30:
            seqs = one_leaves_one_joins(lm, ctx, seqs, rng, V)
    assert known > 60 and checked > 10
    for b, seq in enumerate(seqs):
        torch.testing.assert_close(ctx.last_logits[b], plain_last_logits(lm.model, seq), atol=2e-4, rtol=1e-4)


def test_scores_are_the_logits_predicting_each_appended_token():
    lm = tiny_lm("asset:qwen2", "llama", seed=3)
    ctx = BatchedContext(lm.model, 2)
    ctx.extend([[11, 12, 13], [21]])
    before = ctx.last_logits.clone()
    outs = ctx.extend([[14, 15, 16], [22]], scores=True)
    with torch.inference_mode():
        full = lm.model(input_ids=torch.tensor([[11, 12, 13, 14, 15, 16]])).logits[0]
    torch.testing.assert_close(before[0], full[2], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(outs[0], full[2:5], atol=2e-4, rtol=1e-4)  # predict 14, 15 and 16
    torch.testing.assert_close(outs[0][0], before[0])
    with torch.inference_mode():
        second = lm.model(input_ids=torch.tensor([[21]])).logits[0]
    assert outs[1].shape[0] == 1
    torch.testing.assert_close(outs[1][0], second[0], atol=2e-4, rtol=1e-4)  # predicts 22


def test_long_appends_run_as_a_sub_batch(monkeypatch):
    from rsd_toolkit.engine import context

    monkeypatch.setattr(context, "SPLIT_MIN_CELLS", 8)
    lm = tiny_lm("asset:qwen2", "llama", seed=3)
    seqs = [[5, 6], [7], [8, 9, 10], [11]]
    ctx = BatchedContext(lm.model, 4)
    ctx.extend(seqs)
    ctx.positions = {"real": 0, "computed": 0}
    appends = [[12], [], [13], [14, 15, 16, 17, 18]]
    outs = ctx.extend(appends, scores=True)
    assert ctx.positions == {"real": 7, "computed": 4 + 5}  # not 4 rows x 5 columns
    for seq, a in zip(seqs, appends):
        seq.extend(a)
    for b, seq in enumerate(seqs):
        torch.testing.assert_close(ctx.last_logits[b], plain_last_logits(lm.model, seq), atol=2e-4, rtol=1e-4)
    with torch.inference_mode():
        full = lm.model(input_ids=torch.tensor([seqs[3]])).logits[0]
    torch.testing.assert_close(outs[3], full[0:5], atol=2e-4, rtol=1e-4)
    ctx.extend([[1], [2], [3], [4]])  # and the cache keeps working afterwards
    for b, seq in enumerate(seqs):
        seq.append(b + 1)
        torch.testing.assert_close(ctx.last_logits[b], plain_last_logits(lm.model, seq), atol=2e-4, rtol=1e-4)


def test_extend_never_writes_into_logits_a_caller_holds():
    """The engine keeps the previous logits to score a span's first token while other rows advance."""
    lm = tiny_lm("asset:qwen2", "llama", seed=3)
    ctx = BatchedContext(lm.model, 3)
    ctx.extend([[1, 2], [3], [4, 5]])
    held = ctx.last_logits
    before = held.clone()
    ctx.extend([[6, 7], [], [8]], scores=True)  # some rows only
    held_newest = ctx.logits_after_rollback(0, 1)  # what predicted row 0's 7: kept for a one-token rollback
    newest_before = held_newest.clone()
    saved = ctx.checkpoint([0])
    ctx.extend([[9], [], []])
    ctx.rollback(2, 1)
    ctx.extend([[], [], [10]])
    ctx.restore(saved, [0])
    torch.testing.assert_close(held, before)
    torch.testing.assert_close(held_newest, newest_before)


def test_appends_write_in_place_and_capacity_doubles():
    """The preallocated store: a decode step writes into the next columns of the same buffer (no copy of
    the cache), and a full buffer doubles, so a long trace costs amortised O(1) copying per token."""
    lm = tiny_lm("asset:qwen2", "llama", seed=3)
    ctx = BatchedContext(lm.model, 2)
    ctx.extend([[1, 2, 3], [4, 5]])
    layer = ctx.cache.layers[0]
    capacity, pointer = layer.k_buf.shape[2], layer.k_buf.data_ptr()
    grows = []
    for step in range(3 * capacity):
        ctx.extend([[7], [8]])
        if layer.k_buf.data_ptr() != pointer:
            grows.append((step, layer.k_buf.shape[2]))
            pointer = layer.k_buf.data_ptr()
        assert layer.keys.shape[2] == layer.length == ctx.valid.shape[1]
    assert grows and all(new >= 2 * old for (_, new), old in zip(grows, [capacity] + [c for _, c in grows]))
    assert len(grows) <= 2  # 3x the first capacity: two doublings, not one copy per step
    assert torch.allclose(ctx.last_logits[0], plain_last_logits(lm.model, [1, 2, 3] + [7] * 3 * capacity), atol=1e-4)


def test_sliding_window_models_are_refused_before_any_forward():
    from transformers import MistralConfig, MistralForCausalLM

    from rsd_toolkit.engine import UnsupportedModel

    config = MistralConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=16)  # fmt: skip
    with pytest.raises(UnsupportedModel, match="sliding"):
        BatchedContext(MistralForCausalLM(config), 1)


def test_a_probe_of_a_few_rows_computes_only_those_rows():
    """Scoring one row's span must not run a column of holes for every idle row of the batch."""
    lm = tiny_lm("asset:qwen2", "llama", seed=3)
    seqs = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    ctx = BatchedContext(lm.model, 4)
    ctx.extend([list(s) for s in seqs])
    ctx.positions = {"real": 0, "computed": 0}
    out = ctx.extend([[], [20, 21, 22], [], []], scores=True)
    assert ctx.positions == {"real": 3, "computed": 3}
    assert out[0] is None and out[1].shape[0] == 3
    seqs[1] += [20, 21, 22]
    ctx.extend([[30], [31], [32], [33]])  # the next full step still matches a plain forward on every row
    for b, s in enumerate(seqs):
        assert torch.allclose(ctx.last_logits[b], plain_last_logits(lm.model, s + [30 + b]), atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_static_step_matches_the_general_step(arch):
    """The fixed-shape step (rows padded to a bucket, keys cut to a column chunk, mask and positions as
    inputs: what a CUDA graph replays) gives the general step's logits, through rollbacks, wide blocks,
    compaction, rows leaving (a padded bucket) and joining (the buffers grow), and a column-chunk crossing."""
    lm = tiny_lm("asset:qwen2", arch, seed=3)
    rng = random.Random(1)
    V = 5000
    seqs = [[rng.randrange(V) for _ in range(rng.randint(1, 9))] for _ in range(4)]
    general, static = BatchedContext(lm.model, 4, static=False), BatchedContext(lm.model, 4, static=True)
    assert static.static is not None and not static.static.graphs  # on CPU: the same step, eager
    for ctx in (general, static):
        ctx.extend([list(s) for s in seqs])
    for step in range(300):
        appends = [[rng.randrange(V)] for _ in seqs]
        if step % 7 == 3:  # some rows roll back and re-feed: the general path
            for b, seq in enumerate(seqs):
                r = rng.choice([0, 1, 2]) if len(seq) > 3 else 0
                if r:
                    for ctx in (general, static):
                        ctx.rollback(b, r)
                    del seq[-r:]
                    appends[b] = [rng.randrange(V) for _ in range(r + 1)]
        for seq, a in zip(seqs, appends):
            seq.extend(a)
        for ctx in (general, static):
            ctx.extend(appends)
            ctx.maybe_compact()
        if step == 40:  # a row leaves: 3 rows run in a bucket of 4
            for ctx in (general, static):
                ctx.select([0, 2, 3])
            seqs = [seqs[0], seqs[2], seqs[3]]
        if step == 80:  # two rows join: 5 rows, bucket 8, the buffers grow
            fresh_seqs = [[rng.randrange(V) for _ in range(6)], [rng.randrange(V)]]
            for ctx in (general, static):
                fresh = BatchedContext(lm.model, 2, static=False)
                fresh.extend([list(s) for s in fresh_seqs])
                ctx.merge(fresh)
            seqs += fresh_seqs
        torch.testing.assert_close(static.last_logits, general.last_logits, atol=1e-4, rtol=1e-4)
    assert static.static.counts["eager"] > 200  # most steps took the fixed-shape path
    assert static.valid.shape[1] > 256  # crossed a column chunk
    for b, seq in enumerate(seqs):
        torch.testing.assert_close(static.last_logits[b], plain_last_logits(lm.model, seq), atol=2e-4, rtol=1e-4)


def test_static_buffers_stay_in_place_across_edits():
    """A captured graph reads raw buffer addresses: steps, rollbacks, compaction and finished rows must
    write into the same buffers (``SlotCache.buffers`` unchanged), only growth may move them."""
    lm = tiny_lm("asset:qwen2", "llama", seed=3)
    ctx = BatchedContext(lm.model, 4, static=True)
    ctx.extend([[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]])
    ctx.extend([[11], [12], [13], [14]])
    buffers, pointer = ctx.cache.buffers, ctx.cache.layers[0].k_buf.data_ptr()
    assert ctx.cache.layers[0].k_buf.shape[2] % ctx.static.shapes.chunk == 0
    for step in range(30):
        ctx.extend([[20 + step]] * ctx.batch_size)
        if step == 5:
            ctx.rollback(1, 2)
            ctx.extend([[], [30, 31, 32], [], []])
        if step == 10:
            ctx.compact()
        if step == 15:
            ctx.select([0, 1, 3])
    assert ctx.cache.buffers == buffers and ctx.cache.layers[0].k_buf.data_ptr() == pointer


def test_a_failed_graph_capture_falls_back_to_eager_with_the_right_logits(monkeypatch, caplog):
    """Graph capture is checked against an eager run of the same step; a capture that raises or replays
    different logits switches graphs off for that model and the step's logits are the eager ones."""
    from rsd_toolkit.engine import static as static_mod

    lm = tiny_lm("asset:qwen2", "llama", seed=3)
    captured = []

    def faithful(run, pool, stream):  # what a working capture does: replay re-runs the step
        captured.append(1)
        return run

    def wrong(run, pool, stream):  # a bad graph: wrong logits, and garbage in the column it writes
        def replay():
            out = run()
            for layer in graphed.cache.layers:
                layer.k_buf.index_fill_(2, layer.static[2], 7.0)
            return out + 1.0

        return replay

    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: None)
    for capture, broken in ((faithful, False), (wrong, True)):
        monkeypatch.setattr(static_mod, "cuda_graph", capture)
        general, graphed = BatchedContext(lm.model, 3, static=False), BatchedContext(lm.model, 3, static=True)
        graphed.static.graphs = True  # pretend CUDA: the capture function above stands in for torch.cuda
        for ctx in (general, graphed):
            ctx.extend([[1, 2, 3], [4, 5], [6]])
        for step in range(20):
            for ctx in (general, graphed):
                ctx.extend([[10 + step], [11], [12]])
            torch.testing.assert_close(graphed.last_logits, general.last_logits, atol=1e-4, rtol=1e-4)
        counts = graphed.static.counts
        if broken:
            assert counts["failed"] == 1 and not graphed.static.graphs and counts["eager"] == 19
            assert "CUDA graphs off" in caplog.text
        else:  # one capture for the (bucket 4, 256 columns) shape, every later step a replay
            assert counts == {"captured": 1, "replayed": 19} and len(captured) == 1

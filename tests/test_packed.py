"""Packed linear weights (``engine/packed.py``): the same numbers as the plain forward, scoped to the block,
and traces unchanged with the same seeds."""

from __future__ import annotations

import pytest
import torch

from conftest import require_assets, tiny_lm
from rsd_toolkit.config import RSDConfig
from rsd_toolkit.engine import BatchedContext, RSDEngine
from rsd_toolkit.engine.packed import PackedLinears, available
from test_engine import PROMPTS

TOKENIZER = "asset:qwen2"


def _block_logits(model, packed, prefix: list[list[int]], block: list[list[int]]) -> list[torch.Tensor]:
    ctx = BatchedContext(model, len(prefix), packed=packed)
    ctx.extend(prefix)
    return ctx.extend(block, scores=True)


def _assert_close(plain: list[torch.Tensor], fast: list[torch.Tensor], rel: float) -> float:
    worst = 0.0
    for a, b in zip(plain, fast):
        worst = max(worst, ((a - b).abs().max() / a.abs().max()).item())
    assert worst <= rel, worst
    return worst


@pytest.mark.parametrize("width", [1, 2, 5, 9])
def test_a_verify_block_has_the_plain_logits(width):
    lm = tiny_lm(TOKENIZER, "qwen2", hidden=128, layers=2, seed=3)
    assert available(lm.model)
    packed = PackedLinears(lm.model)
    g = torch.Generator().manual_seed(width)
    prefix = torch.randint(100, 5000, (3, 20), generator=g).tolist()
    block = torch.randint(100, 5000, (3, width), generator=g).tolist()
    block[1] = block[1][:1]  # ragged: one row appends a single token
    _assert_close(_block_logits(lm.model, None, prefix, block), _block_logits(lm.model, packed, prefix, block), 1e-5)


def test_the_modules_are_only_changed_inside_the_block():
    lm = tiny_lm(TOKENIZER, "qwen2", hidden=64, layers=2, seed=4)
    packed = PackedLinears(lm.model)
    linears = [m for m in lm.model.modules() if type(m) is torch.nn.Linear]
    assert linears and len(packed.modules) == len(linears)
    with packed:
        assert all("forward" in m.__dict__ for m in linears)
    assert not any("forward" in m.__dict__ for m in linears)  # nothing left behind
    with pytest.raises(RuntimeError), packed:  # restored on an exception too
        raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in linears)


def test_a_weight_changed_in_place_runs_plain_until_repacked():
    layer = torch.nn.Linear(64, 32)
    model = torch.nn.Sequential(layer)
    model.get_input_embeddings = lambda: layer  # what ``available`` reads the device from
    packed = PackedLinears(model, min_rows=2)
    x = torch.randn(4, 64)
    with torch.no_grad():
        layer.weight.mul_(2.0)  # e.g. a training step between two decoding calls
        with packed:
            out = model(x)
        torch.testing.assert_close(out, torch.nn.functional.linear(x, layer.weight, layer.bias))
        packed.repack()
        with packed:
            torch.testing.assert_close(model(x), torch.nn.functional.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        # the packed copy is what runs now: swap in a pack of zeros (same version) and only the bias is left
        packed.packs[id(layer.weight)] = (torch.ops.mkldnn._reorder_linear_weight(torch.zeros_like(layer.weight), 8), layer.weight._version)
        with packed:
            torch.testing.assert_close(model(x), layer.bias.expand(4, -1))
            torch.testing.assert_close(model(x[:1]), torch.nn.functional.linear(x[:1], layer.weight, layer.bias))  # below min_rows: plain


def test_gradients_never_take_the_packed_path():
    layer = torch.nn.Linear(16, 8)
    packed = PackedLinears(torch.nn.Sequential(layer))
    x = torch.randn(3, 16, requires_grad=True)
    with packed:
        layer(x).sum().backward()  # the oneDNN op has no backward: a packed call here would raise
    assert x.grad is not None and layer.weight.grad is not None


@pytest.mark.parametrize("draft_tokens", [0, 4])
def test_traces_are_the_same_tokens_with_and_without_packing(draft_tokens):
    """Same seeds, same tokens: the rounding differences (~1e-6 of a logit) move no sampled token here."""
    teacher = tiny_lm(TOKENIZER, "qwen2", hidden=96, layers=2, seed=5, init_scale=40.0)
    student = tiny_lm(TOKENIZER, "qwen2", hidden=64, layers=2, seed=6, init_scale=40.0)
    config = RSDConfig(max_new_tokens=24, draft_tokens=draft_tokens, seed=7)
    runs = {}
    for on in (False, True):
        engine = RSDEngine(teacher, student, config, packed_gemm=on)
        assert (engine.packed["teacher"] is not None) is on
        runs[on] = [(t.ids, t.accepted) for t in engine.generate(PROMPTS, batch_size=3)]
    assert runs[True] == runs[False]
    assert sum(len(ids) for ids, _ in runs[True]) > len(PROMPTS) * 10


def test_the_real_qwen_model_keeps_its_logits():
    """Qwen2.5-Coder-0.5B-Instruct (real weights): a 5-position verify block and a batch-8 step, packed vs plain."""
    require_assets("qwen-coder-0.5b")
    from rsd_toolkit.models import load_lm

    lm = load_lm("asset:qwen-coder-0.5b", dtype="float32")
    packed = PackedLinears(lm.model)
    ids = lm.tokenizer("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n")["input_ids"]
    plain = _block_logits(lm.model, None, [ids[:-5]], [ids[-5:]])
    fast = _block_logits(lm.model, packed, [ids[:-5]], [ids[-5:]])
    _assert_close(plain, fast, 1e-5)
    assert [p.argmax(-1).tolist() for p in plain] == [f.argmax(-1).tolist() for f in fast]
    rows = [ids[: len(ids) - k] for k in range(8)]
    step = [[ids[-1]] for _ in rows]
    _assert_close(_block_logits(lm.model, None, rows, step), _block_logits(lm.model, packed, rows, step), 1e-5)


def test_engine_packs_each_cpu_model_once_and_shares_a_shared_model():
    lm = tiny_lm(TOKENIZER, "qwen2", hidden=64, layers=2, seed=8)
    engine = RSDEngine(lm, lm, RSDConfig(max_new_tokens=4))
    assert engine.packed["teacher"] is engine.packed["student"] is not None
    assert RSDEngine(lm, lm, RSDConfig(max_new_tokens=4), packed_gemm=False).packed == {"teacher": None, "student": None}


def test_a_bfloat16_model_is_packed_only_where_this_cpu_has_a_bf16_path(monkeypatch):
    """On an AVX2-only CPU oneDNN's bf16 reorder raises: a bf16 model must decode there, unpacked."""
    from rsd_toolkit.engine import packed as packed_module

    lm = tiny_lm(TOKENIZER, "qwen2", hidden=64, layers=2, seed=9)
    lm.model.to(torch.bfloat16)
    for supported in (False, True):
        monkeypatch.setattr(packed_module, "onednn_bf16", lambda: supported)
        assert available(lm.model) is supported
    monkeypatch.undo()
    engine = RSDEngine(lm, lm, RSDConfig(max_new_tokens=6, seed=1))
    assert (engine.packed["teacher"] is not None) == packed_module.onednn_bf16()
    traces = engine.generate([PROMPTS[0]])
    assert 0 < len(traces[0].ids) <= 6


# --------------------------------------------------------------- grouped-query SDPA (context.grouped_query_sdpa)
@pytest.mark.parametrize("width", [2, 5, 9])
def test_grouped_query_attention_has_the_logits_of_repeated_heads(width, monkeypatch):
    """The tiny models are grouped-query (4 heads over 2 KV heads): a block's logits with torch's grouped SDPA
    equal those with transformers' repeated key/value heads."""
    import contextlib

    import rsd_toolkit.engine.context as context

    lm = tiny_lm(TOKENIZER, "qwen2", hidden=128, layers=2, seed=5)
    g = torch.Generator().manual_seed(10 + width)
    prefix = torch.randint(100, 5000, (3, 17), generator=g).tolist()
    block = torch.randint(100, 5000, (3, width), generator=g).tolist()
    block[2] = block[2][:1]
    grouped = _block_logits(lm.model, None, prefix, block)
    monkeypatch.setattr(context, "grouped_query_sdpa", lambda device: contextlib.nullcontext())
    repeated = _block_logits(lm.model, None, prefix, block)
    _assert_close(repeated, grouped, 1e-6)


def test_grouped_query_sdpa_is_set_for_the_forward_only(monkeypatch):
    import os

    from rsd_toolkit.engine.context import FORCE_GQA, grouped_query_sdpa

    monkeypatch.delenv(FORCE_GQA, raising=False)
    lm = tiny_lm(TOKENIZER, "qwen2", hidden=64, layers=2, seed=4)
    seen = []
    handle = lm.model.model.layers[0].self_attn.register_forward_pre_hook(lambda *a: seen.append(os.environ.get(FORCE_GQA)))
    try:
        _block_logits(lm.model, None, [[5, 6, 7], [8, 9, 10]], [[11, 12], [13]])
    finally:
        handle.remove()
    assert seen and set(seen) == {"1"}  # every forward of the context ran with it
    assert FORCE_GQA not in os.environ  # and nothing is left after it
    with pytest.raises(RuntimeError), grouped_query_sdpa(torch.device("cpu")):
        raise RuntimeError("boom")
    assert FORCE_GQA not in os.environ  # restored on an exception too
    with grouped_query_sdpa(torch.device("meta")):  # not on other devices (CUDA's masked GQA is its math kernel)
        assert FORCE_GQA not in os.environ
    monkeypatch.setenv(FORCE_GQA, "0")  # a user's own setting comes back as it was
    with grouped_query_sdpa(torch.device("cpu")):
        assert os.environ[FORCE_GQA] == "1"
    assert os.environ[FORCE_GQA] == "0"

"""Counts that agree: the engine's p_s of every trace token, ``rsd surprisal`` on the record file, and a
from-scratch fp32 forward of the committed ids are the same numbers, token for token, stop token included."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from conftest import require_assets, tiny_lm
from rsd_toolkit.config import RSDConfig
from rsd_toolkit.engine import RSDEngine
from rsd_toolkit.models import LM
from rsd_toolkit.surprisal import TextItem, load_items, score_items, summarize
from test_engine import PROMPTS, BoostHead, common_pieces


def boosted_with_stop(lm: LM, stop_bonus: float) -> LM:
    """Common words boosted (so proposals are accepted and rejected), and the stop token, so traces end."""
    ids = torch.cat([common_pieces(lm), torch.tensor([lm.primary_stop])])
    head = BoostHead(lm.model.lm_head, ids, lm.model.config.vocab_size, seed=3)
    head.bias[lm.primary_stop] = stop_bonus
    model = copy.deepcopy(lm.model)
    model.lm_head = head
    return LM.wrap(model, lm.tokenizer, name=lm.name + "+stop")


@pytest.fixture(scope="module")
def pair():
    require_assets("smollm2")
    teacher = boosted_with_stop(tiny_lm("asset:qwen2", "qwen2", hidden=96, seed=1), 12.0)
    student = boosted_with_stop(tiny_lm("asset:smollm2", "llama", hidden=64, seed=2), 12.0)
    return teacher, student


@torch.inference_mode()
def fp32_forward(lm: LM, prompt_ids: list[int], ids: list[int]) -> torch.Tensor:
    """ln p of each of ``ids`` after ``prompt_ids``: one plain forward, no cache, float64 log-softmax [n]."""
    logits = lm.model(input_ids=torch.tensor([prompt_ids + ids])).logits[0, len(prompt_ids) - 1 : -1, : lm.vocab.size]
    return logits.double().log_softmax(-1)[torch.arange(len(ids)), torch.tensor(ids)]


@pytest.mark.parametrize("fallback", ["sample", "strict"])
def test_engine_surprisal_and_fp32_rescore_agree_token_for_token(pair, tmp_path, fallback):
    teacher, student = pair
    cfg = RSDConfig(max_new_tokens=40, fallback=fallback, seed=1)
    engine = RSDEngine(teacher, student, cfg)
    assert engine.kind == "bridged"
    traces = engine.generate(PROMPTS * 2, batch_size=5)
    assert sum(t.finish_reason == "eos" for t in traces) > 2
    path = tmp_path / "traces.jsonl"
    with open(path, "w") as f:
        for i, t in enumerate(traces):
            f.write(json.dumps({"id": str(i), "question": PROMPTS[i % 5], **t.to_dict()}) + "\n")
    scored = score_items(student, load_items(str(path)))
    assert len(scored) == len(traces)
    for i, (t, s) in enumerate(zip(traces, scored)):
        assert s.ids == t.ids  # the stop token that ended the trace is scored too
        engine_lp = torch.tensor([math.log(r.p_s) for r in t.records], dtype=torch.float64)
        torch.testing.assert_close(s.logprobs.double(), engine_lp, atol=1e-4, rtol=0)
        prompt_ids = student.prompt(PROMPTS[i % 5], cfg)[1]
        torch.testing.assert_close(fp32_forward(student, prompt_ids, t.ids), engine_lp, atol=1e-4, rtol=0)
        assert summarize([s], cfg.pth)["sub_pth"] == t.sub_pth
        if fallback == "strict":
            assert t.sub_pth == t.last_resorts


def test_a_record_without_finish_reason_ending_with_the_stop_token_scores_it(pair):
    _, student = pair
    text = " the answer"
    ids = student.vocab.encode(text) + [student.primary_stop]
    rows = [{"text": text, "ids": ids}, {"text": text, "ids": ids[:-1]}, {"text": text, "finish_reason": "eos"},
            {"text": text, "finish_reason": "eos", "kind": "upft_prefix"}]  # fmt: skip
    from rsd_toolkit.surprisal import record_stop

    items = [TextItem(str(i), "q", r["text"], {}, *record_stop(r)) for i, r in enumerate(rows)]
    got = [s.ids for s in score_items(student, items)]
    assert got == [ids, ids[:-1], ids, ids[:-1]]

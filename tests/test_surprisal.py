"""Surprisal analytics: scoring equals an independent log-softmax; statistics; `rsd surprisal/compare/sweep`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from conftest import require_assets, tiny_lm
from rsd_toolkit.cli import cli
from rsd_toolkit.engine.scoring import score_completions
from rsd_toolkit.surprisal import TextItem, histogram, score_items, summarize, top_tokens

TEXTS = [
    ("p0", "What is 2 + 3?", "We add: 2 + 3 = 5. So the answer is \\boxed{5}.", True),
    ("p1", "Half of 9?", "Nine halves is 4.5, written \\boxed{\\frac{9}{2}}.", True),
    ("p2", "Name a colour.", "Blue — or perhaps vermilion ✓.", False),
    ("p3", "Say hi.", "hi", False),
]


def reference_logprobs(lm, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log softmax of one plain forward over prompt + completion, read at the completion tokens."""
    with torch.no_grad():
        logits = lm.model(torch.tensor([prompt + completion])).logits[0].double()
    logp = torch.log_softmax(logits[:, : lm.vocab.size], dim=-1)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)
    return logp[positions, torch.tensor(completion)]


@pytest.fixture(scope="module")
def peaked():
    """A random model with peaked distributions, so tokens fall on both sides of 1 %."""
    return tiny_lm("asset:qwen2", "llama", hidden=64, layers=2, seed=3, init_scale=25)


@pytest.mark.parametrize("batch_size,budget", [(1, 2**26), (3, 3 * 151_000 * 4)])  # budget: 4 columns per chunk
def test_scores_equal_an_independent_log_softmax(peaked, batch_size, budget):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 5000, (n,), generator=g).tolist() for n in (3, 9, 1, 5, 2)]
    completions = [torch.randint(0, 5000, (n,), generator=g).tolist() for n in (11, 2, 25, 0, 1)]
    got = score_completions(peaked, prompts, completions, batch_size=batch_size, max_logit_elements=budget)
    for p, c, lp in zip(prompts, completions, got):
        assert lp.shape == (len(c),)
        if c:
            assert torch.allclose(lp.double(), reference_logprobs(peaked, p, c), atol=1e-4)


def test_padded_embedding_rows_take_no_probability():
    """A model whose embedding is padded past the tokenizer (as Qwen's are): scores renormalise over real tokens."""
    require_assets()
    from transformers import LlamaConfig, LlamaForCausalLM

    from rsd_toolkit.bridges import load_tokenizer
    from rsd_toolkit.models import LM

    tok = load_tokenizer("asset:llama-bpe")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok) + 64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    lm = LM.wrap(LlamaForCausalLM(cfg).eval(), tok, name="padded")
    (lp,) = score_completions(lm, [[1, 2, 3]], [[4, 5, 6, 7]])
    assert torch.allclose(lp.double(), reference_logprobs(lm, [1, 2, 3], [4, 5, 6, 7]), atol=1e-5)


def items():
    return [TextItem(i, q, t, {"correct": c}) for i, q, t, c in TEXTS]


def test_statistics_match_an_independent_computation(peaked):
    scored = score_items(peaked, items(), batch_size=2)
    tok = peaked.tokenizer
    all_lp = []
    for (pid, q, text, _), s in zip(TEXTS, scored):
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        c_ids = tok(text, add_special_tokens=False)["input_ids"]
        assert s.id == pid and s.ids == c_ids  # prompt excluded, text in the student's own tokens
        ref = reference_logprobs(peaked, p_ids, c_ids)
        assert torch.allclose(s.logprobs.double(), ref, atol=1e-4)
        all_lp.append(ref)
    lp = torch.cat(all_lp)
    pth = float(lp.median().exp()) * 1.0001  # a random model finds every token unlikely: split them in the middle
    stats = summarize(scored, pth)
    sub = int((lp.exp() < pth).sum())
    assert 0 < sub < len(lp)
    assert stats["tokens"] == len(lp) and stats["sub_pth"] == sub
    assert stats["sub_pth_ratio"] == pytest.approx(sub / len(lp))
    assert stats["mean_surprisal"] == pytest.approx(float(-lp.mean()), rel=1e-5)
    assert stats["perplexity"] == pytest.approx(math.exp(float(-lp.mean())), rel=1e-5)
    ordered = (-lp).sort().values
    assert stats["percentiles"]["50"] == pytest.approx(float(ordered[math.ceil(0.5 * len(lp)) - 1]), rel=1e-5)
    assert stats["max_surprisal"] == pytest.approx(float(ordered[-1]), rel=1e-5)
    assert stats["accuracy"] == 0.5
    bins = histogram(scored, pth)
    assert sum(b["count"] for b in bins) == len(lp)
    assert sum(b["count"] for b in bins if b["below_pth"]) == sub
    top = top_tokens(peaked, scored, n=3)
    assert [t["surprisal"] for t in top] == pytest.approx(ordered[-3:].flip(0).tolist(), rel=1e-5)
    first = top[0]
    trace = next(s for s in scored if s.id == first["trace"])
    assert first["token_id"] == trace.ids[first["position"]]


# ----------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def student_dirs(tmp_path_factory):
    """Two saved students with different tokenizers (qwen2 and llama-bpe)."""
    out = {}
    for name, lm in (("qwen", tiny_lm("asset:qwen2", "llama", hidden=64, layers=2, seed=3, init_scale=25)),
                     ("llama", tiny_lm("asset:llama-bpe", "llama", hidden=32, layers=1, seed=4, init_scale=25))):  # fmt: skip
        d = tmp_path_factory.mktemp(f"student_{name}")
        lm.model.save_pretrained(str(d))
        lm.tokenizer.save_pretrained(str(d))
        out[name] = str(d)
    return out


@pytest.fixture()
def trace_file(tmp_path):
    """A file shaped like `rsd generate` output."""
    path = tmp_path / "traces.jsonl"
    rows = [{"id": i, "question": q, "text": t, "correct": c, "kind": "full", "sub_pth": 0, "run": {}} for i, q, t, c in TEXTS]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return str(path)


def run(*args):
    result = CliRunner().invoke(cli, [*args, "--device", "cpu"])
    return result


def test_surprisal_json_schema(student_dirs, trace_file):
    result = run("surprisal", "--student", student_dirs["qwen"], trace_file, "--json", "--top", "4")
    assert result.exit_code == 0, result.output
    rep = json.loads(result.stdout)
    assert set(rep) == {"source", "student", "pth", "skipped_empty", "skipped_too_long", "summary", "histogram", "top_tokens",
                        "traces"}  # fmt: skip
    s = rep["summary"]
    assert set(s) == {"traces", "tokens", "sub_pth", "sub_pth_ratio", "mean_surprisal", "perplexity", "percentiles",
                      "max_surprisal", "accuracy"}  # fmt: skip
    assert s["traces"] == 4 and s["accuracy"] == 0.5 and 0 <= s["sub_pth_ratio"] <= 1 and set(s["percentiles"]) == {"50", "90", "99"}
    assert sum(b["count"] for b in rep["histogram"]) == s["tokens"]
    assert len(rep["top_tokens"]) == 4 and {"trace", "position", "token", "p_s", "surprisal", "before", "after"} <= set(rep["top_tokens"][0])
    assert [t["id"] for t in rep["traces"]] == ["p0", "p1", "p2", "p3"] and sum(t["tokens"] for t in rep["traces"]) == s["tokens"]
    assert sum(t["sub_pth"] for t in rep["traces"]) == s["sub_pth"] > 0  # scored now, not the record's field


def test_surprisal_renders_tables_colours_and_plot(student_dirs, trace_file, tmp_path):
    png = tmp_path / "hist.png"
    result = run("surprisal", "--student", student_dirs["qwen"], trace_file, "--show", "2", "--plot", str(png))
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "sub-pth ratio" in out and "perplexity" in out and "most surprising tokens" in out
    assert "█" in out and "0.01–0.03" in out  # histogram rows with bars, pth as an edge
    assert "legend:" in out and "< 0.01" in out and "trace p0" in out and "trace p1" in out and "trace p2" not in out
    assert "\\boxed{5}" in out  # the coloured view prints the trace text itself
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cross_tokenizer_student_rescores_text(student_dirs, trace_file):
    """Traces made for the qwen2 student, scored under a llama-bpe student: its own tokens, its own template."""
    from transformers import AutoTokenizer

    result = run("surprisal", "--student", student_dirs["llama"], trace_file, "--json")
    assert result.exit_code == 0, result.output
    rep = json.loads(result.stdout)
    tok = AutoTokenizer.from_pretrained(student_dirs["llama"])
    expected = [len(tok(t, add_special_tokens=False)["input_ids"]) for _, _, t, _ in TEXTS]
    assert [t["tokens"] for t in rep["traces"]] == expected


def test_generic_dataset_fields_and_errors(student_dirs, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"instruction": "x", "reply": "Some response text."}) + "\n")
    ok = run("surprisal", "--student", student_dirs["qwen"], str(path), "--text-field", "reply", "--prompt-field", "instruction", "--json")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["summary"]["traces"] == 1
    missing = run("surprisal", "--student", student_dirs["qwen"], str(path))
    assert missing.exit_code == 2 and "no text field" in missing.output and "reply" in missing.output
    assert len(missing.output.strip().splitlines()) == 1
    badplot = run("surprisal", "--student", student_dirs["qwen"], str(path), "--text-field", "reply", "--plot", str(tmp_path / "h.xyz"))
    assert badplot.exit_code == 2 and "unknown image type" in badplot.output
    nodir = run("surprisal", "--student", student_dirs["qwen"], str(path), "--text-field", "reply", "--plot", str(tmp_path / "no" / "h.png"))
    assert nodir.exit_code == 2 and "does not exist" in nodir.output
    nofile = run("surprisal", "--student", student_dirs["qwen"], str(tmp_path / "nope.jsonl"))
    assert nofile.exit_code == 2 and "no such file" in nofile.output
    badpth = run("surprisal", "--student", student_dirs["qwen"], str(path), "--text-field", "reply", "--pth", "0")
    assert badpth.exit_code == 2 and "--pth must be in (0, 1]" in badpth.output


def test_compare_rows_per_set_and_student(student_dirs, trace_file, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"id": "x", "question": "q", "text": "A different trace entirely.", "correct": True}) + "\n")
    result = run("compare", "--student", student_dirs["qwen"], "--student", student_dirs["llama"], trace_file, str(other),
                 "--label", "A", "--label", "B", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert [(r["set"], r["student"]) for r in rows] == [
        ("A", student_dirs["qwen"]), ("B", student_dirs["qwen"]), ("A", student_dirs["llama"]), ("B", student_dirs["llama"])]
    assert rows[0]["accuracy"] == 0.5 and rows[1]["accuracy"] == 1.0 and rows[1]["traces"] == 1
    assert rows[0]["mean_surprisal"] != rows[2]["mean_surprisal"]  # scored by each student in turn
    table = run("compare", "--student", student_dirs["qwen"], trace_file, str(other))
    assert table.exit_code == 0 and "traces" in table.stdout and "other" in table.stdout
    bad = run("compare", "--student", student_dirs["qwen"], trace_file, "--label", "A", "--label", "B")
    assert bad.exit_code == 2 and "--label" in bad.output


def test_sweep_tabulates_each_threshold(student_dirs, tmp_path):
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "problem": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(3)))
    result = run("sweep", "--teacher", student_dirs["qwen"], "--student", student_dirs["qwen"], "--dataset", str(data),
                 "--pths", "1,1e-9", "--attempts", "2", "--max-new-tokens", "5", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert [r["setting"] for r in rows] == ["teacher", "rsd pth=1", "rsd pth=1e-09"]
    assert rows[0]["acceptance_rate"] is None and rows[0]["traces"] == 6
    assert rows[1]["acceptance_rate"] < 0.2  # p_s >= 1 almost never holds
    assert rows[2]["acceptance_rate"] == 1.0  # every token of a softmax has p_s >= 1e-9 here
    assert all(0 <= r["sub_pth_ratio"] <= 1 and 0 <= r["accuracy"] <= 1 and r["perplexity"] > 1 for r in rows)
    bad = run("sweep", "--teacher", student_dirs["qwen"], "--student", student_dirs["qwen"], "--dataset", str(data), "--pths", "0.1,x")
    assert bad.exit_code == 2 and "comma-separated" in bad.output


def test_help_has_examples():
    for cmd in ("surprisal", "compare", "sweep"):
        result = CliRunner().invoke(cli, [cmd, "--help"])
        assert result.exit_code == 0 and "Example:" in result.output

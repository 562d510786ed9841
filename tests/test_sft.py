"""`rsd sft`: completion-only labels, UPFT prefixes, think-marker rewriting, training, resume, LoRA, errors."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from conftest import tiny_lm
from rsd_toolkit.cli import cli
from rsd_toolkit.config import ConfigError, RSDConfig
from rsd_toolkit.sft import (
    S1K_MARKERS,
    SFTConfig,
    SFTError,
    accumulation,
    build_examples,
    check_tokenizer,
    pad_collator,
    parse_markers,
    rewrite_think,
    student_markers,
    world_size,
)

S1K = ("<|im_start|>think", "<|im_start|>answer")
QWEN3 = ("<think>", "</think>")
TRACES = [
    ("What is 2 + 3?", "<|im_start|>think\nAdd two and three.\n<|im_start|>answer\nThe answer is \\boxed{5}."),
    ("What is 1/2 + 0?", "<|im_start|>think\nNothing to add.\n<|im_start|>answer\nSo \\boxed{\\frac{1}{2}}."),
    ("Half of 9?", "<|im_start|>think\nNine over two.\n<|im_start|>answer\nIt is \\boxed{4.5}."),
]
UPFT_TEXT = "<|im_start|>think\nLet me think about x squared"


@pytest.fixture(scope="module")
def student(qwen2_think_dir, tmp_path_factory):
    """(folder, LM): a tiny model over qwen2 + <think>/</think>, saved where `rsd sft` can load it."""
    lm = tiny_lm(str(qwen2_think_dir), "llama", hidden=32, layers=1, seed=3)
    d = tmp_path_factory.mktemp("student")
    lm.model.save_pretrained(str(d))
    lm.tokenizer.save_pretrained(str(d))
    return str(d), lm


def records_for(lm, name="tiny-student") -> list[dict]:
    """Trace records as `rsd generate` writes them: ids are the student's tokens of text (+ end token if full)."""
    recs = [
        {"id": f"p{i}", "index": i, "question": q, "text": t, "ids": lm.vocab.encode(t) + [lm.primary_stop],
         "kind": "full", "student": name}  # fmt: skip
        for i, (q, t) in enumerate(TRACES)
    ]
    recs.append({"id": "p3", "index": 3, "question": "Solve x^2 = 2.", "text": UPFT_TEXT,
                 "ids": lm.vocab.encode(UPFT_TEXT), "kind": "upft_prefix", "student": name})  # fmt: skip
    return recs


def write_traces(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def labelled(example) -> list[int]:
    return [t for t in example["labels"] if t != -100]


def test_prompt_tokens_are_masked_and_full_traces_end_with_the_end_token(student):
    _, lm = student
    recs = records_for(lm)
    examples, stats = build_examples(recs, lm, SFTConfig())
    assert (stats["full"], stats["upft_prefix"], stats["rewrote_markers"]) == (3, 1, 1)
    for rec, ex in zip(recs[:3], examples):
        prompt_text, prompt_ids = lm.prompt(rec["question"], RSDConfig())
        assert rec["question"] in prompt_text and "<|im_start|>assistant" in prompt_text  # the chat template
        n = len(prompt_ids)
        assert ex["input_ids"][:n] == prompt_ids and ex["labels"][:n] == [-100] * n
        assert ex["labels"][n:] == ex["input_ids"][n:] and -100 not in ex["labels"][n:]
        assert ex["labels"][-1] == lm.primary_stop == lm.tokenizer.convert_tokens_to_ids("<|im_end|>")
        learned = lm.tokenizer.decode(labelled(ex)[:-1])
        assert learned == rewrite_think(rec["text"], S1K, QWEN3) and learned.startswith("<think>\nAdd" if rec is recs[0] else "<think>")
    batch = pad_collator(0)(examples[:2])
    longer = max(len(e["input_ids"]) for e in examples[:2])
    assert batch["labels"].shape == (2, longer) and int((batch["labels"] != -100).sum()) == sum(len(labelled(e)) for e in examples[:2])
    assert batch["attention_mask"].sum(1).tolist() == [len(e["input_ids"]) for e in examples[:2]]


def test_upft_prefix_records_label_only_the_prefix(student):
    _, lm = student
    rec = records_for(lm)[3]
    (ex,), stats = build_examples([rec], lm, SFTConfig())
    learned = labelled(ex)
    assert lm.tokenizer.decode(learned) == "<think>\nLet me think about x squared"  # no end token, nothing more
    assert lm.primary_stop not in learned and ex["input_ids"][-1] == learned[-1]
    assert build_examples([rec], lm, SFTConfig(include_upft=False))[1]["skipped_upft"] == 1


def test_long_examples_are_cut_and_counted(student):
    _, lm = student
    rec = records_for(lm)[0]
    n_prompt = len(lm.prompt(rec["question"], RSDConfig())[1])
    (ex,), stats = build_examples([rec], lm, SFTConfig(max_length=n_prompt + 3))
    assert len(ex["input_ids"]) == n_prompt + 3 and len(labelled(ex)) == 3 and stats["truncated"] == 1
    assert build_examples([rec], lm, SFTConfig(max_length=n_prompt))[1]["too_long"] == 1


@pytest.mark.parametrize(
    "text",
    [
        "<|im_start|>think\nstep 1\n<|im_start|>answer\nAnswer: \\boxed{3}",
        "no markers at all",
        "<|im_start|>think<|im_start|>think twice<|im_start|>answer",
        "",
    ],
)
def test_think_marker_rewrite_round_trips(text):
    there = rewrite_think(text, S1K, QWEN3)
    assert "<|im_start|>think" not in there and "<|im_start|>answer" not in there
    assert there.count("<think>") == text.count("<|im_start|>think")
    assert rewrite_think(there, QWEN3, S1K) == text


def test_marker_targets_come_from_the_student_or_the_config(student, vocab):
    _, lm = student
    assert student_markers(SFTConfig(), lm.vocab) == (S1K, QWEN3)
    assert student_markers(SFTConfig(), vocab("qwen2")) is None  # no <think> token: s1K markers stay (as in s1)
    assert student_markers(SFTConfig(think_markers="none"), lm.vocab) is None
    assert student_markers(SFTConfig(think_markers="<reason>,</reason>"), vocab("qwen2")) == (S1K, ("<reason>", "</reason>"))
    assert parse_markers(S1K_MARKERS) == S1K
    with pytest.raises(ConfigError, match="START,END"):
        SFTConfig(think_markers="<think>")


def test_effective_batch_from_the_device_count(monkeypatch):
    assert accumulation(SFTConfig(), 1) == 16 and accumulation(SFTConfig(), 8) == 2
    assert accumulation(SFTConfig(per_device_batch_size=2), 8) == 1 and accumulation(SFTConfig(per_device_batch_size=4), 1) == 4
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert world_size() == 4
    defaults = SFTConfig()
    assert (defaults.learning_rate, defaults.epochs, defaults.batch_size, defaults.warmup_ratio, defaults.max_length) == (1e-5, 15, 16, 0.05, 8192)


def _loss(model_dir: str, examples: list[dict]) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    batch = pad_collator(0)(examples)
    with torch.no_grad():
        return float(model(**batch).loss)


def sft_args(model_dir, traces, out, *extra):
    return ["sft", "--student", model_dir, "--traces", traces, "--out", out, "--learning-rate", "5e-3",
            "--batch-size", "2", "--logging-steps", "1", "--save-steps", "2", *extra]  # fmt: skip


def test_a_few_steps_lower_the_trace_loss_save_everything_and_resume(student, tmp_path):
    model_dir, lm = student
    traces = write_traces(tmp_path / "traces.jsonl", records_for(lm))
    out = str(tmp_path / "sft")
    r = CliRunner().invoke(cli, sft_args(model_dir, traces, out, "--max-steps", "6"))
    assert r.exit_code == 0, r.output
    assert "training in fp32" in r.output and "4 examples (3 full, 1 UPFT prefixes, markers rewritten)" in r.output
    examples, _ = build_examples(records_for(lm), lm, SFTConfig())
    before, after = _loss(model_dir, examples), _loss(out, examples)
    assert after < before - 0.5, (before, after)
    saved = json.loads((tmp_path / "sft" / "rsd_sft_config.json").read_text())
    assert saved["global_step"] == 6 and saved["config"]["learning_rate"] == 5e-3 and saved["examples"] == 4
    assert saved["gradient_accumulation"] == 2 and saved["bf16"] is False
    assert os.path.exists(os.path.join(out, "tokenizer.json")) and os.path.isdir(os.path.join(out, "checkpoint-6"))
    again = CliRunner().invoke(cli, sft_args(model_dir, traces, out, "--max-steps", "8", "--json"))
    assert again.exit_code == 0, again.output
    assert "resuming from " + os.path.join(out, "checkpoint-6") in again.output
    summary = json.loads(again.output[again.output.index("{\n") :])
    assert summary["global_step"] == 8 and summary["resumed_from"].endswith("checkpoint-6")


def test_lora_saves_an_adapter_and_a_merged_model(student, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from rsd_toolkit.sft import train

    model_dir, lm = student
    traces = write_traces(tmp_path / "traces.jsonl", records_for(lm)[:2])
    out = str(tmp_path / "lora")
    config = SFTConfig(lora=True, lora_r=4, max_steps=2, learning_rate=1e-2, batch_size=1, logging_steps=1,
                       gradient_checkpointing=True)
    summary = train(model_dir, traces, out, config)
    assert summary["global_step"] == 2
    assert os.path.exists(os.path.join(out, "adapter", "adapter_config.json"))
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert not any("lora" in k for k in merged.state_dict())
    w = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[w], base.state_dict()[w])  # the adapter was merged in
    assert torch.equal(merged.state_dict()["model.embed_tokens.weight"], base.state_dict()["model.embed_tokens.weight"])


def test_missing_trace_file_is_a_one_line_error(student, tmp_path):
    model_dir, _ = student
    r = CliRunner().invoke(cli, ["sft", "--student", model_dir, "--traces", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "nope.jsonl: no such trace file; make one with `rsd generate" in r.output
    assert "Traceback" not in r.output


def test_traces_made_for_another_student_tokenizer_are_refused(student, tmp_path):
    model_dir, lm = student
    other = tiny_lm("asset:llama-bpe", "llama", hidden=32, layers=1)
    traces = write_traces(tmp_path / "llama.jsonl", records_for(other, name="meta-llama/Llama-3.2-1B"))
    r = CliRunner().invoke(cli, ["sft", "--student", model_dir, "--traces", traces, "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "Traceback" not in r.output
    message = " ".join(r.output.split())
    assert "made for the tokenizer of student 'meta-llama/Llama-3.2-1B', not that of" in message
    assert os.path.basename(model_dir) in message and "--student" in message
    check_tokenizer(records_for(lm), lm, "same.jsonl")  # the matching student passes
    bad = records_for(lm)
    bad[2]["ids"] = bad[2]["ids"][1:]
    with pytest.raises(SFTError, match="record 3, id 'p2'"):
        check_tokenizer(bad, lm, "cut.jsonl")


def test_sft_help_has_an_example_and_the_paper_defaults():
    r = CliRunner().invoke(cli, ["sft", "--help"])
    assert r.exit_code == 0 and "Example" in r.output and "accelerate launch" in r.output
    for flag in ("--learning-rate", "--epochs", "--batch-size", "--gradient-checkpointing", "--lora", "--think-markers"):
        assert flag in r.output

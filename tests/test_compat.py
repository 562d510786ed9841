"""Pair classification, the compatibility report and the ``rsd compat`` / ``rsd assets`` commands."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from rsd_toolkit.bridges import analyse, classify, make_bridge
from rsd_toolkit.cli import cli


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Run ``rsd`` as a user would (entry point with one-line error handling)."""
    code = "from rsd_toolkit.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "a,b,verdict",
    [("qwen2", "qwen2", "identical"), ("mistral-v1", "mistral-v3", "remappable"), ("qwen2", "llama-bpe", "bridged"),
     ("llama-spm", "mistral-v1", "bridged"), ("gpt-2", "tekken", "bridged")],
)  # fmt: skip
def test_verdicts(a, b, verdict, vocab):
    assert classify(vocab(a), vocab(b)) == verdict


def test_report_facts(vocab):
    r = analyse(vocab("mistral-v1"), vocab("mistral-v3"))
    assert r.verdict == "remappable"
    assert r.teacher.vocab_size == 32000 and r.student.vocab_size == 32768
    assert r.piece_overlap_teacher == 1.0 and r.id_agreement < 0.01  # same pieces, shifted ids
    assert r.bridge_exact == 1.0 and r.boundary_agreement == 1.0
    eos = next(m for m in r.special_map if m["role"] == "eos")
    assert eos["teacher"] == "</s>" and eos["student_id"] == 2
    cross = analyse(vocab("qwen2"), vocab("llama-bpe"))
    assert cross.verdict == "bridged" and 0.5 < cross.boundary_agreement < 1.0 and cross.bridge_exact == 1.0
    turn_end = next(m for m in cross.special_map if m["role"] == "turn_end")
    assert (turn_end["teacher"], turn_end["student"]) == ("<|im_end|>", "<|eot_id|>")
    assert cross.teacher.fertility > 100 and cross.student.byte_level


def test_padded_and_think_report(vocab, qwen2_think_dir):
    from rsd_toolkit.bridges import load_vocab

    r = analyse(vocab("qwen2"), load_vocab(str(qwen2_think_dir)))
    assert r.verdict == "remappable" and r.student.model_vocab_size == 152064
    assert any("padding" in w for w in r.student.warnings)


def test_override_map(vocab):
    t, s = vocab("qwen2"), vocab("llama-bpe")
    im_end = t.roles["turn_end"]
    bridge = make_bridge(t, s, overrides={im_end: s.roles["eos"]})
    assert bridge.map_ids([im_end]) == [s.roles["eos"]]
    expand = make_bridge(t, s, overrides={im_end: "</turn>"})
    assert expand.map_ids([im_end]) == s.encode("</turn>")


def test_cli_compat_json_and_table(vocab):
    vocab("qwen2")
    res = CliRunner().invoke(cli, ["compat", "asset:mistral-v1", "asset:mistral-v3", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["verdict"] == "remappable" and data["student"]["vocab_size"] == 32768
    res = CliRunner().invoke(cli, ["compat", "asset:qwen2", "asset:llama-bpe"])
    assert res.exit_code == 0 and "bridged" in res.output and "tokens / 1k chars" in res.output


def test_cli_compat_text_file(vocab, tmp_path):
    vocab("qwen2")
    f = tmp_path / "sample.txt"
    f.write_text("Solve 2x + 3 = 7.\nSo x = 2, i.e. \\boxed{2}.\n")
    res = CliRunner().invoke(cli, ["compat", "asset:gpt-2", "asset:qwen2", "--text", str(f), "--json"])
    data = json.loads(res.output)
    assert data["sample_chars"] == len(f.read_text()) and data["teacher"]["round_trip"] == 1.0


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["compat", "/no/such/tok", "asset:qwen2"], "no such file or folder"),
        (["compat", "asset:qwen2", "asset:unknown"], "unknown asset"),
        (["compat", "asset:qwen2", "asset:gpt-2", "--text", "/no/such.txt"], "no such file"),
    ],
)
def test_cli_bad_input_is_one_line(args, fragment, vocab):
    vocab("qwen2")
    proc = run_cli(*args)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in proc.stderr


def test_cli_corrupt_and_binary_inputs(tmp_path, vocab):
    vocab("qwen2")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{oops")
    proc = run_cli("compat", str(bad), "asset:qwen2")
    assert proc.returncode == 2 and "could not read tokenizer" in proc.stderr and "Traceback" not in proc.stderr
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    proc = run_cli("compat", "asset:gpt-2", "asset:gpt-2", "--text", str(binary))
    assert proc.returncode == 2 and "not UTF-8" in proc.stderr


def test_every_command_has_help_with_example():
    runner = CliRunner()
    for args in (["--help"], ["compat", "--help"], ["assets", "--help"], ["assets", "fetch", "--help"], ["assets", "list", "--help"]):
        res = runner.invoke(cli, args)
        assert res.exit_code == 0 and "Example" in res.output, args


def test_assets_list_json(vocab):
    vocab("qwen2")
    res = CliRunner().invoke(cli, ["assets", "list", "--json"])
    rows = {r["name"]: r for r in json.loads(res.output)}
    assert rows["qwen2"]["fetched"] and rows["tekken"]["spec"] == "asset:tekken"


def test_tokenizer_without_eos_is_warned(vocab, tmp_path):
    from rsd_toolkit.bridges import load_vocab

    vocab("gpt-2")
    bare = tmp_path / "tokenizer.json"
    bare.write_text(vocab("gpt-2").backend.to_str())  # a bare tokenizer.json: no config, so no EOS role
    r = analyse(load_vocab(str(bare)), vocab("gpt-2"))
    assert r.verdict == "identical" or r.verdict == "remappable"
    assert any("no EOS" in w for w in r.teacher.warnings) and not r.student.warnings


def test_wordpiece_is_rejected_clearly(tmp_path, vocab):
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordPiece

    vocab("gpt-2")
    tok = Tokenizer(WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    proc = run_cli("compat", str(path), "asset:gpt-2")
    assert proc.returncode == 2 and "cannot map WordPiece" in proc.stderr and str(path) in proc.stderr
    assert "Traceback" not in proc.stderr

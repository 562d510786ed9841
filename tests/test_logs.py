"""What a researcher sees on a successful run, in a log file at 80 columns and in a 200-column terminal.

Every command runs through the real entry point (``rsd_toolkit.cli:main``) in a fresh interpreter: once
with stdout/stderr redirected to files (not a terminal, ``COLUMNS=80``), once in a pseudo-terminal of 200
columns. Both check: no traceback, exit 0, no number, path or header cut with ``…``; off a terminal,
timestamped progress lines that show work in flight (done < total) and no blank lines on stderr.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import require_assets, tiny_lm
from rsd_toolkit.cli import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One interpreter runs every command: argv per command, fd 1/2 redirected to that command's files (file
# mode) or left on the pseudo-terminal with markers between commands (pty mode).
DRIVER = r"""
import json, os, sys
spec = json.loads(sys.argv[1])
from rsd_toolkit.cli import main
rcs = {}
for name, args in spec["commands"]:
    sys.stdout.flush(); sys.stderr.flush()
    if spec["mode"] == "files":
        saved = os.dup(1), os.dup(2)
        out = os.open(os.path.join(spec["dir"], name + ".out"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        err = os.open(os.path.join(spec["dir"], name + ".err"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, 1); os.dup2(err, 2)
    else:
        print(f"=== begin {name} ===", flush=True)
    sys.argv = ["rsd", *args]
    try:
        main()
        rc = 0
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException as e:
        import traceback; traceback.print_exc(); rc = 99
    sys.stdout.flush(); sys.stderr.flush()
    if spec["mode"] == "files":
        os.dup2(saved[0], 1); os.dup2(saved[1], 2)
    else:
        print(f"=== end {name} rc={rc} ===", flush=True)
    rcs[name] = rc
with open(os.path.join(spec["dir"], "rcs.json"), "w") as f:
    json.dump(rcs, f)
"""

PROGRESS = {  # command -> what its timestamped progress lines say
    "generate": "generate", "sweep": "sweep", "surprisal": "scoring", "compare": "under", "eval": "eval local",
    "sft": "sft",
}  # fmt: skip


def cut_cells(text: str) -> list[str]:
    """Lines where rich cut a table cell or header: an ellipsis just before a cell border or at the end of
    a table row (tables without right edge)."""
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    return [line for line in text.splitlines() if re.search(r"[│┃]", line) and re.search(r"…\s*([│┃]|$)", line)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    require_assets()
    root = tmp_path_factory.mktemp("logs")
    lm = tiny_lm("asset:qwen2", "llama", hidden=32, layers=1, seed=11)
    model = root / "model"
    lm.model.save_pretrained(str(model))
    lm.tokenizer.save_pretrained(str(model))
    problems = root / "math.jsonl"
    rows = [{"id": f"p{i}", "problem": f"What is {i} + 2?", "answer": str(i + 2)} for i in range(3)]
    problems.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, str(model), str(problems)


def commands(root, model: str, problems: str, tag: str) -> list[tuple[str, list[str]]]:
    d = root / tag
    d.mkdir()
    traces, merged = str(d / "traces.jsonl"), str(d / "merged.jsonl")
    cpu = ["--device", "cpu"]
    cmds = [
        ("assets-list", ["assets", "list"]),
        ("compat", ["compat", "asset:mistral-v1", "asset:llama-spm"]),
        ("generate", ["generate", "--teacher", model, "--student", model, "--dataset", problems, "--out", traces,
                      "--attempts", "2", "--batch-size", "2", "--max-new-tokens", "5", *cpu]),
        ("merge", ["merge", merged, traces]),
        ("surprisal", ["surprisal", "--student", model, traces, "--top", "3", "--show", "1", "--batch-size", "1", *cpu]),
        ("compare", ["compare", "--student", model, traces, merged, "--label", "teacher-made", "--label", "merged",
                     "--batch-size", "1", *cpu]),
        ("sweep", ["sweep", "--teacher", model, "--student", model, "--dataset", problems, "--pths", "0.1", "--limit", "2",
                   "--max-new-tokens", "4", "--batch-size", "1", *cpu]),
        ("sft", ["sft", "--student", model, "--traces", traces, "--out", str(d / "sft"), "--max-steps", "2",
                 "--batch-size", "1", "--logging-steps", "1", "--save-steps", "100"]),
        ("eval", ["eval", "--model", model, "--benchmark", f"local={problems}", "--samples", "1", "--max-new-tokens", "4",
                  "--batch-size", "1", "--out", str(d / "base.json"), *cpu]),
    ]  # fmt: skip
    from rsd_toolkit import assets, demo

    if (assets.cache_dir() / "demo" / demo.STUDENT_VERSION / "config.json").exists():  # built by test_demo before us
        cmds.append(("demo", ["demo", "--fast", "--show", "1"]))
    return cmds


def drive(spec: dict, columns: int, pty_mode: bool) -> str:
    env = {**os.environ, "COLUMNS": str(columns), "RSD_PROGRESS_SECONDS": "0", "PYTHONPATH": ROOT + os.pathsep +
           os.environ.get("PYTHONPATH", ""), "TERM": "xterm-256color"}  # fmt: skip
    env.pop("NO_COLOR", None)
    cmd = [sys.executable, "-c", DRIVER, json.dumps(spec)]
    if not pty_mode:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout + proc.stderr
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    proc = subprocess.Popen(cmd, env=env, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=900)
    os.close(master)
    return b"".join(chunks).decode("utf-8", "replace")


def test_every_command_in_a_log_file_at_80_columns(workspace):
    root, model, problems = workspace
    spec = {"mode": "files", "dir": str(root / "files-out"), "commands": commands(root, model, problems, "files")}
    os.makedirs(spec["dir"])
    drive(spec, 80, pty_mode=False)
    rcs = json.loads((root / "files-out" / "rcs.json").read_text())
    for name, _ in spec["commands"]:
        out = (root / "files-out" / f"{name}.out").read_text(encoding="utf-8")
        err = (root / "files-out" / f"{name}.err").read_text(encoding="utf-8")
        both = out + err
        assert rcs[name] == 0, f"{name}: exit {rcs[name]}\n{both[-2000:]}"
        assert "Traceback" not in both, f"{name}:\n{both[-2000:]}"
        assert not cut_cells(both), f"{name}: cut cells {cut_cells(both)}"
        assert "\x1b[" not in both, f"{name}: terminal escapes in a log file"
        assert "" not in err.splitlines(), f"{name}: blank line on stderr:\n{err}"
        assert "nan%" not in both and " 0 tok/s" not in both, f"{name}:\n{both}"
        assert "{'loss'" not in both, f"{name}: raw Trainer dicts:\n{both}"
        if name in PROGRESS:
            lines = [m.groups() for m in re.finditer(rf"^\d\d:\d\d:\d\d [^\n]*?{PROGRESS[name]}[^\n]*? (\d+)/(\d+) [a-z]", err, re.M)]
            assert lines, f"{name}: no timestamped progress line:\n{err}"
            assert any(int(done) < int(total) for done, total in lines), f"{name}: no line while work was in flight:\n{err}"
    generate_err = (root / "files-out" / "generate.err").read_text()
    assert re.search(r"[\d.]+ tok/s", generate_err) and "problems" in generate_err
    assert "rsd_sft" not in os.listdir(root / "files" / "sft") or os.path.exists(root / "files" / "sft" / "config.json")


def test_every_command_in_a_200_column_terminal(workspace):
    root, model, problems = workspace
    spec = {"mode": "pty", "dir": str(root / "pty-out"), "commands": commands(root, model, problems, "pty")}
    os.makedirs(spec["dir"])
    text = drive(spec, 200, pty_mode=True)
    for name, _ in spec["commands"]:
        match = re.search(rf"=== begin {name} ===(.*?)=== end {name} rc=(\d+) ===", text, re.S)
        assert match, f"{name} did not finish:\n{text[-3000:]}"
        body, rc = match.group(1), int(match.group(2))
        assert rc == 0 and "Traceback" not in body, f"{name}: exit {rc}\n{body[-2000:]}"
        assert not cut_cells(body), f"{name}: cut cells {cut_cells(body)}"
        if name in ("generate", "sweep", "eval", "sft"):
            assert "ETA" in body, f"{name}: no progress bar:\n{body[-2000:]}"


# -------------------------------------------------------------------------------- item-level checks
def test_atomic_writes_keep_the_umask_mode(tmp_path):
    from rsd_toolkit.traces.store import write_atomic

    old = os.umask(0o022)
    try:
        path = tmp_path / "base.json"
        write_atomic(str(path), "{}")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        os.chmod(path, 0o640)
        write_atomic(str(path), "{}")  # an existing file keeps its mode
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
        os.umask(0o002)
        write_atomic(str(tmp_path / "shared.json"), "{}")
        assert stat.S_IMODE((tmp_path / "shared.json").stat().st_mode) == 0o664
    finally:
        os.umask(old)


def test_stale_gguf_quantization_key_is_repaired(tmp_path):
    from rsd_toolkit.models import _drop_stale_quantization

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "gguf"}}))
    _drop_stale_quantization(config)
    assert json.loads(config.read_text()) == {"model_type": "llama"}
    other = {"model_type": "llama", "quantization_config": {"quant_method": "bitsandbytes"}}
    config.write_text(json.dumps(other))
    _drop_stale_quantization(config)  # a really quantised model is left alone (and refused by sft below)
    assert json.loads(config.read_text()) == other


def test_sft_refuses_a_quantised_student_in_one_line_before_out_exists(tmp_path):
    from transformers import LlamaConfig

    student = tmp_path / "quantised"
    student.mkdir()
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2).to_dict()
    config["quantization_config"] = {"quant_method": "gguf"}
    (student / "config.json").write_text(json.dumps(config))
    traces = tmp_path / "t.jsonl"
    traces.write_text(json.dumps({"id": "a", "question": "q", "text": "t", "kind": "full"}) + "\n")
    out = tmp_path / "never" / "made"
    r = CliRunner().invoke(cli, ["sft", "--student", str(student), "--traces", str(traces), "--out", str(out)])
    assert r.exit_code == 2 and "cannot be fine-tuned" in r.output and "quant_method 'gguf'" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not out.exists() and not out.parent.exists()


def test_eval_compare_is_checked_before_the_model_loads(tmp_path):
    bench = tmp_path / "renamed.jsonl"
    bench.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n")
    baseline = tmp_path / "base.json"
    baseline.write_text(json.dumps({"benchmarks": {"local": {"summary": {"pass@1": 0.5}}}}))
    r = CliRunner().invoke(cli, ["eval", "--model", "not-loaded", "--benchmark", str(bench), "--compare", str(baseline)])
    assert r.exit_code == 2 and "no benchmark in common" in r.output and "NAME=PATH" in r.output, r.output
    # named as in the baseline, the same file compares: the run gets past the check to the model
    r = CliRunner().invoke(cli, ["eval", "--model", "not-loaded", "--benchmark", f"local={bench}", "--compare", str(baseline)])
    assert "no benchmark in common" not in r.output and "not-loaded" in r.output, r.output


def test_progress_rates_and_missing_statistics():
    from rsd_toolkit.cli.progress import percent, rate

    assert rate(5, 12) == "0.417 tok/s" and rate(2000, 1) == "2,000 tok/s" and rate(153, 10) == "15.3 tok/s"
    assert percent(float("nan")) is None and percent(None) is None and percent(0.517) == "51.7%"


def test_blank_tokens_are_named():
    from rsd_toolkit.cli.surprisal import token_label

    assert token_label("  ") == "⟨2 spaces⟩" and token_label("\n") == "⟨newline⟩" and token_label("") == "⟨empty⟩"
    assert token_label(" \n\n") == "⟨space 2 newlines⟩" and token_label(" x") == " x"


def test_plot_has_integer_ticks_a_short_title_and_one_x_range():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    import torch

    from rsd_toolkit.surprisal import plot_figure

    class Scored:
        def __init__(self, values):
            self.values = torch.tensor(values)

        def surprisal(self):
            return self.values

    teacher, rsd = [Scored([0.1, 5.0, 9.5]), Scored([7.0])], [Scored([0.2, 0.3])]
    fig = plot_figure([("teacher", teacher), ("RSD", rsd)], 0.01, "surprisal under smollm2")
    ax = fig.axes[0]
    low, high = ax.get_xlim()
    assert low == 0 and high >= 9.5 and ax.get_yscale() == "linear"
    assert all(float(t).is_integer() for t in ax.get_yticks())  # 3 tokens: no 0.5-token ticks
    assert ax.get_title() == "surprisal under smollm2"
    assert {t.get_text() for t in ax.get_legend().get_texts()} >= {"teacher", "RSD"}
    plt.close(fig)


def test_compat_explains_the_real_differences(vocab):
    from rsd_toolkit.bridges import analyse

    r = analyse(vocab("mistral-v1"), vocab("mistral-v3"))
    assert r.verdict == "remappable" and "added tokens 3 vs 771" in r.meaning and "vocab 32000 vs 32768" in r.meaning
    gpt2 = analyse(vocab("gpt-2"), vocab("tekken"))
    bos = next(m for m in gpt2.special_map if m["role"] == "bos")
    assert bos["how"] == "by role (eos)"  # <|endoftext|> reaches tekken as its EOS, not as its BOS
    res = CliRunner().invoke(cli, ["compat", "asset:gpt-2", "asset:tekken"])
    assert "bos, eos, end_of_text" in res.output and "round-trip on sample ¹" in res.output


def _help(args: list[str]) -> str:
    return CliRunner().invoke(cli, [*args, "--help"], terminal_width=80, env={"COLUMNS": "80"}).output


def _subcommands():
    import click

    for name, cmd in cli.commands.items():
        if isinstance(cmd, click.Group):
            yield [name], cmd
            for sub, subcmd in cmd.commands.items():
                yield [name, sub], subcmd
        else:
            yield [name], cmd


def test_every_help_fits_80_columns_and_has_an_offline_example_that_parses(tmp_path, monkeypatch):
    import shlex

    import click

    monkeypatch.chdir(tmp_path)  # output paths of the examples are checked at parse time
    top = _help([])
    assert "..." not in top.split("Commands:")[1], top  # the command list is not cut
    for path, cmd in _subcommands():
        text = _help(path)
        assert max(len(line) for line in text.splitlines()) <= 80, f"rsd {' '.join(path)} --help is wider than 80:\n{text}"
        if isinstance(cmd, click.Group):
            continue
        examples = [ln.strip() for ln in text.split("Example")[1].split("Options:")[0].replace("\\\n", " ").splitlines()]
        lines = [ln for ln in examples if ln.startswith("rsd ")]
        assert lines, f"rsd {' '.join(path)}: no example"
        offline = [ln for ln in lines if "asset:" in ln or ln.startswith(("rsd demo", "rsd assets", "rsd merge", "rsd eval --model smollm2-rsd",
                                                                              "rsd replicate examples/configs/cpu.toml"))]
        assert offline, f"rsd {' '.join(path)}: no example that runs offline on fetched assets"
        for line in lines:
            args = shlex.split(line.split(" >")[0].split("  #")[0])[1:]
            if "..." in line:
                continue
            ctx = cli.make_context("rsd", list(args), resilient_parsing=False)
            name, sub, rest = cli.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
            while isinstance(sub, click.Group):
                sctx = sub.make_context(name, rest, parent=ctx)
                name, sub, rest = sub.resolve_command(sctx, [*sctx._protected_args, *sctx.args])
            try:
                sub.make_context(name, rest, parent=ctx)
            except click.UsageError as e:
                raise AssertionError(f"{line}: {e.format_message()}") from None

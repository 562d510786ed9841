"""``rsd replicate CONFIG``: the paper's experiment in one command (thin: load the config, call the library)."""

from __future__ import annotations

import json
import os
import time

import click

from .common import console, err_console


def _log(message: str) -> None:
    """One timestamped line per stage event on stderr (a terminal or a log file alike)."""
    err_console.print(f"{time.strftime('%H:%M:%S')} replicate  {message}", markup=False, highlight=False, soft_wrap=True)


@click.command(short_help="The paper's experiment in one command (resumable).")
@click.argument("config_path", metavar="CONFIG")
@click.option("--out", default=None, help="Output folder (default: the config's `out`, else runs/<config name>).")
@click.option("--force", is_flag=True, help="Redo the stages whose settings changed since they ran (their old outputs "
              "are removed); without it such a rerun is refused.")  # fmt: skip
@click.option("--check", is_flag=True, help="Check the config, the problem sets and the pair, print the plan, load no model.")
@click.option("--json", "as_json", is_flag=True, help="Print the final summary (report.json) as JSON on stdout.")
def replicate(config_path: str, out: str | None, force: bool, check: bool, as_json: bool) -> None:
    """Teacher traces vs RSD traces, one fine-tuned student each, evaluated.

    For a teacher, a student, training problems and held-out benchmarks (a TOML or
    JSON CONFIG): teacher-only and RSD traces (rejection sampling, UPFT prefixes),
    both scored under the student, SFT hyperparameters picked on a validation split
    (the same for both arms), one SFT student per trace set, base / teacher-SFT /
    RSD-SFT pass@1 with 95 % intervals, and OUT/report/report.md (+ .json, PNGs).
    Each stage is resumable: rerunning the same command skips finished stages and
    continues an unfinished one. Bad input fails before any model loads.

    \b
    Example: offline, after `rsd assets fetch --group benchmarks --group smollm2
    --group qwen-coder-0.5b` (real models on 2 CPU cores, ~3 hours):
      rsd replicate examples/configs/cpu.toml --check
      rsd replicate examples/configs/cpu.toml > replicate.log 2>&1
    The paper's recipe on a GPU (s1.1-7B -> Qwen3-0.6B on s1K-1.1):
      rsd replicate examples/configs/paper-gpu.toml
    """
    from ..replicate import load_config, prepare, run

    config = load_config(config_path)
    name = os.path.splitext(os.path.basename(config_path))[0]
    prepared = prepare(config, out, force=force, config_name=name)
    _plan(prepared, check)
    if check:
        return
    from .progress import Tracker, trainer_callback
    from ..replicate import Hooks

    hooks = Hooks(log=_log, progress=Tracker, trainer_callbacks=lambda what: [trainer_callback(what)])
    try:
        summary = run(prepared, hooks)
    except KeyboardInterrupt:
        err_console.print(f"interrupted: finished work is kept in {prepared.out}; rerun the same command to continue")
        raise SystemExit(130) from None
    report = os.path.join(prepared.out, "report", "report.md")
    if as_json:
        click.echo(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
        return
    _results(summary)
    console.print(f"report: {report}", highlight=False)


def _plan(p, check: bool) -> None:
    """What the run will do (stderr; with --check on stdout)."""
    from ..replicate import STAGES, done

    out = console if check else err_console
    benches = ", ".join(f"{name} {len(problems)}" for name, (_, problems) in p.benchmarks.items())
    pending = [s for s in STAGES if done(os.path.join(p.out, s), p.inputs[s]) is None]
    out.print(f"{p.config.teacher} → {p.config.student} ({p.pair}); {len(p.train)} training + {len(p.validation)} "
              f"validation problems{f' ({p.dropped} dropped: in a benchmark)' if p.dropped else ''}; benchmarks: {benches}; "
              f"out {p.out}; to run: {', '.join(pending) or 'nothing (all stages done)'}"
              f"{'; redone (settings changed): ' + ', '.join(p.stale) if p.stale else ''}",
              highlight=False, markup=False, soft_wrap=True)  # fmt: skip


def _results(summary: dict) -> None:
    from rich.table import Table

    from ..replicate import STUDENTS
    from .common import print_table

    for name, rows in summary.get("accuracy", {}).items():
        table = Table(title=f"rsd replicate · {name}")
        for col in ("student", "pass@1", "95 % interval", "relative change vs base"):
            table.add_column(col, justify="right")
        for student in STUDENTS:
            row = rows[student]
            rel = row.get("relative")
            table.add_row(student, f"{100 * row['pass@1']:.1f}%", f"{100 * row['ci95'][0]:.1f}–{100 * row['ci95'][1]:.1f}%",
                          "–" if rel is None else f"{100 * rel:+.1f}%")  # fmt: skip
        print_table(table)
        d = summary.get("rsd_vs_teacher", {}).get(name)
        if d and d["change"] is not None:
            low, high = d["change_ci95"]
            console.print(f"{name}: RSD-SFT − teacher-SFT {100 * d['change']:+.1f} points (95 % {100 * low:+.1f} – "
                          f"{100 * high:+.1f})", highlight=False)  # fmt: skip
    if summary.get("ran") is not None:
        console.print(f"ran: {', '.join(summary['ran']) or 'nothing'}; skipped (done before): "
                      f"{', '.join(summary['skipped']) or 'none'}", highlight=False)  # fmt: skip

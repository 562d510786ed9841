"""``rsd demo``: the whole RSD story offline, in the terminal."""

from __future__ import annotations

import contextlib
import json
import sys

import click
from rich.table import Table

from .common import console, err_console, print_table
from .progress import trainer_callback
from .surprisal import _fmt, _render_coloured


@click.command(short_help="The whole RSD story offline in about a minute.")
@click.option("--problems", type=click.IntRange(1, 64), default=8, show_default=True, help="Held-out problems to decode.")
@click.option("--max-new-tokens", type=click.IntRange(4, 256), default=40, show_default=True, help="Budget per trace.")
@click.option("--fast", is_flag=True, help="4 problems, 24 tokens (what CI runs).")
@click.option("--show", type=click.IntRange(0, 64), default=2, show_default=True, help="Traces of each kind to print coloured.")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON on stdout.")
def demo(problems: int, max_new_tokens: int, fast: bool, show: int, as_json: bool) -> None:
    """Run RSD offline: a real teacher, a student with another real tokenizer, their traces scored.

    The teacher is the real SmolLM2-135M-Instruct (GPT-2-style BPE); the student is a small model over
    Mistral's SentencePiece tokenizer, trained once (about a minute, then cached) on terse synthetic
    arithmetic. The same held-out problems are decoded teacher-only and with RSD through the bridged
    engine, and both trace sets are scored under the student: teacher traces carry many tokens the student
    finds surprising (p_s < 1 %), RSD traces almost none.

    \b
    Example:
      rsd assets fetch --group tokenizers --group smollm2
      rsd demo
      rsd demo --fast --json
    """
    from .. import demo as lib
    from .compat import render

    if fast:
        problems, max_new_tokens = min(problems, 4), min(max_new_tokens, 24)
    info = (lambda m: err_console.print(f"[dim]{m}[/]", highlight=False)) if as_json else (lambda m: console.print(f"[dim]{m}[/]", highlight=False))
    # Trainer prints its metrics on stdout while the student is built: keep stdout for the JSON
    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
        result = lib.run(problems=problems, max_new_tokens=max_new_tokens, info=info,
                         train_callbacks=[trainer_callback("training the demo student")])
    stats = {label: s["stats"] for label, s in result["sets"].items()}
    if as_json:
        click.echo(json.dumps({"teacher": result["teacher"], "student": result["student"], "bridge": result["compat"].verdict,
                               "problems": problems, "max_new_tokens": max_new_tokens, "sets": stats}))  # fmt: skip
        return
    console.rule("1. The tokenizers: a real cross-family pair")
    render(result["compat"])
    console.rule("2. Traces for the same held-out problems, scored under the student")
    table = Table()
    table.add_column("made by")
    for c in ("traces", "tokens", "proposals accepted", "p_s < 1%", "surprisal", "perplexity", "correct"):
        table.add_column(c, justify="right")
    for label, s in stats.items():
        table.add_row(label, str(s["traces"]), str(s["tokens"]), _fmt(s["acceptance_rate"], ".0%"), _fmt(s["sub_pth_ratio"], ".1%"),
                      _fmt(s["mean_surprisal"], ".2f"), _fmt(s["perplexity"], ".1f"), _fmt(s["accuracy"], ".0%"))  # fmt: skip
    print_table(table)
    console.print("[dim]proposals accepted: accepted / judged teacher proposals, pooled over the set's traces (– teacher-only); "
                  "surprisal: mean -ln p_s (nats)[/]")
    if show:
        console.rule("3. Every token coloured by the student's probability")
        for label, s in result["sets"].items():
            console.print(f"[bold]{label}[/]")
            _render_coloured(result["student_lm"], s["scored"][:show], 0.01)
    t, r = stats["teacher only"]["sub_pth_ratio"] or 0, stats["RSD"]["sub_pth_ratio"] or 0
    console.print(f"\nTeacher traces: {t:.1%} of tokens below 1 % under the student; RSD traces: {r:.1%}. "
                  "RSD keeps the teacher's tokens the student can follow and lets the student say the rest in its own words.")  # fmt: skip

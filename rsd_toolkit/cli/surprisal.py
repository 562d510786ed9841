"""``rsd surprisal`` (one trace set under a student), ``rsd compare`` (sets x students, the paper's
Tables 1-2) and ``rsd sweep`` (generate at several thresholds and tabulate)."""

from __future__ import annotations

import gc
import json
import math
import warnings
from collections import Counter

import click
from rich.table import Table
from rich.text import Text

from ..checks import InputWarning
from ..config import RSDConfig
from .common import UserError, console, err_console, print_table
from .generate import default_device
from .options import FLOAT, dataclass_options, model_options, pick
from .progress import Tracker, percent

# (lowest p_s of the bucket, style, legend): how the colour view paints each token
COLOURS = ((0.5, "green", "p ≥ 0.5"), (0.1, "default", "0.1–0.5"), (None, "yellow", "pth–0.1"), (0.0, "bold white on red", "< pth"))


def _check_pth(pth: float, flag: str = "--pth") -> None:
    if not 0 < pth <= 1:
        raise UserError(f"{flag} must be in (0, 1]; got {pth}")


def scoring_options(fn):
    """Options every scoring command shares."""
    fn = model_options()(fn)
    return click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Traces scored together.")(fn)


def data_options(fn):
    for opt in reversed([
        click.option("--text-field", default=None, help="Field holding the trace text (default: text, completion, response, output…)."),
        click.option("--prompt-field", default=None, help="Field holding the prompt (default: question, problem, prompt…; '' for none)."),
        click.option("--split", default="train", show_default=True, help="Dataset split (hub datasets)."),
        click.option("--limit", type=click.IntRange(min=1), default=None, help="Score only the first N traces of each set."),
        click.option("--chat-template/--no-chat-template", default=True, show_default=True,
                     help="Wrap prompts in the student's chat template (as generation and SFT do)."),
    ]):  # fmt: skip
        fn = opt(fn)
    return fn


def _load_items(source: str, kw: dict):
    from ..surprisal import load_items

    return load_items(source, kw["text_field"], kw["prompt_field"], kw["split"], kw["limit"])


def _load_student(spec: str, kw: dict):
    from ..models import load_lm

    return load_lm(spec, dtype=kw["dtype"], device=kw["device"] or default_device(), trust_remote_code=kw["trust_remote_code"])


def _score(lm, items, kw: dict, what: str):
    """Score with a progress bar on stderr (stdout stays clean for --json)."""
    from ..surprisal import score_items

    with Tracker(what, sum(1 for it in items if it.text), "traces") as progress:
        skipped = Counter()
        scored = score_items(lm, items, batch_size=kw["batch_size"], chat_template=kw["chat_template"],
                             progress=lambda seqs, tokens: progress.advance(seqs, tokens=tokens), skipped=skipped)  # fmt: skip
    if skipped["too_long"]:
        warnings.warn(f"{what}: {skipped['too_long']} trace(s) longer than the context of {lm.name} "
                      f"({lm.context_length} tokens with the prompt) were skipped", InputWarning, stacklevel=1)  # fmt: skip
    return scored, skipped


def _fmt(x, spec: str) -> str:
    if x is None:
        return "–"
    if spec.endswith("f") and abs(x) >= 1e5:  # e.g. the perplexity of a random model
        return format(x, ".3e")
    return format(x, spec)


# ------------------------------------------------------------------------------------- rsd surprisal
@click.command(short_help="How surprising is a trace set to a student (-ln p_s)?")
@click.argument("traces")
@click.option("--student", required=True, help="Student model scoring the traces: hub id, folder, .gguf or asset:smollm2.")
@click.option("--pth", type=FLOAT, default=0.01, show_default=True, help="Threshold of the sub-pth ratio (p_s < pth).")
@click.option("--top", type=click.IntRange(min=0), default=10, show_default=True, help="How many of the most surprising tokens to list.")
@click.option("--show", type=click.IntRange(min=0), default=0, help="Print N traces with every token coloured by its surprisal.")
@click.option("--plot", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write a PNG histogram of surprisal (needs matplotlib: pip install 'rsd-toolkit[plot]').")
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON on stdout.")
@data_options
@scoring_options
def surprisal(traces: str, **kw) -> None:
    """Score a trace set under a student: how surprising is each token (-ln p_s)?

    TRACES is an `rsd generate` file or any JSONL / JSON / Parquet / CSV file or hub dataset with a text
    field. The text is re-encoded with the student's tokenizer and scored teacher-forced after the
    prompt (in the student's chat template, not counted). Reports the sub-pth ratio (the paper: 6.70 %
    of teacher tokens vs 0.09 % of RSD tokens below 1 % under Qwen3-0.6B), mean surprisal, perplexity,
    percentiles, a histogram and the most surprising tokens in context.

    \b
    Example: offline, on the traces of the `rsd generate --help` example
      rsd surprisal --student asset:smollm2 traces.jsonl --show 1
      rsd surprisal --student asset:smollm2 traces.jsonl --json > report.json
      rsd surprisal --student Qwen/Qwen3-0.6B data.jsonl --text-field response
    """
    from ..surprisal import report

    _check_pth(kw["pth"])
    if kw["plot"]:
        _check_plot_path(kw["plot"])
    items = _load_items(traces, kw)
    lm = _load_student(kw["student"], kw)
    scored, skipped = _score(lm, items, kw, "scoring")
    rep = report(lm, scored, kw["pth"], traces, top=kw["top"], skipped=skipped)
    if kw["plot"]:
        _plot([(_short(traces), scored)], kw["pth"], kw["plot"], f"{_short(traces)} under {_short(lm.name)}")
    if kw["as_json"]:
        click.echo(json.dumps(rep, ensure_ascii=False))
        return
    _render_report(rep)
    if kw["show"]:
        _render_coloured(lm, scored[: kw["show"]], kw["pth"])
    if kw["plot"]:
        console.print(f"histogram written to {kw['plot']}")


def _render_report(rep: dict) -> None:
    s, pth = rep["summary"], rep["pth"]
    console.print(f"[bold]{rep['source']}[/] scored by [bold]{rep['student']}[/]", soft_wrap=True, highlight=False)
    table = Table(show_header=False)
    table.add_column("statistic")
    table.add_column("value", justify="right")
    rows = [("traces", str(s["traces"])), ("tokens", str(s["tokens"])), (f"tokens with p_s < {pth:g}", str(s["sub_pth"])),
            ("sub-pth ratio", _fmt(s["sub_pth_ratio"], ".2%")), ("mean surprisal (nats)", _fmt(s["mean_surprisal"], ".3f")),
            ("perplexity", _fmt(s["perplexity"], ".2f")),
            *((f"surprisal p{q}", _fmt(v, ".2f")) for q, v in s["percentiles"].items()),
            ("max surprisal", _fmt(s["max_surprisal"], ".2f"))]  # fmt: skip
    if s["accuracy"] is not None:
        rows.append(("correct traces", f"{s['accuracy']:.1%}"))
    for name, value in rows:
        table.add_row(name, value, style="bold" if name == "sub-pth ratio" else None)
    print_table(table)
    if rep["skipped_empty"]:
        console.print(f"[dim]{rep['skipped_empty']} empty traces skipped[/]")
    if rep["skipped_too_long"]:
        console.print(f"[dim]{rep['skipped_too_long']} traces longer than the student's context skipped[/]")
    hist = Table(title="student probability of each trace token", show_edge=False)
    hist.add_column("p_s", justify="right")
    hist.add_column("surprisal (nats)", justify="right")
    hist.add_column("tokens", justify="right")
    hist.add_column("share", justify="right")
    hist.add_column("")
    total = max(1, s["tokens"])
    peak = max((b["count"] for b in rep["histogram"]), default=0) or 1
    for b in rep["histogram"]:
        lo, hi = b["p_low"], b["p_high"]
        s_lo = -math.log(hi) + 0.0 if hi > 0 else math.inf  # + 0.0: no "-0.00"
        s_hi = -math.log(lo) if lo > 0 else math.inf
        bar = Text("█" * round(16 * b["count"] / peak), style="red" if b["below_pth"] else "cyan")
        hist.add_row(f"{lo:g}–{hi:g}", f"{s_lo:.2f}–{s_hi:.2f}", str(b["count"]), f"{b['count'] / total:.2%}", bar)
    print_table(hist)
    if rep["top_tokens"]:
        top = Table(title="most surprising tokens", show_edge=False)
        for c in ("trace", "pos", "p_s", "context"):
            top.add_column(c, justify="right" if c in ("pos", "p_s") else "left", overflow="fold")
        for t in rep["top_tokens"]:
            ctx = Text(_visible(t["before"]), style="dim")
            token = token_label(t["token"])
            if not (console.is_terminal and console.color_system) and token == _visible(t["token"]):
                token = f"⟦{token}⟧"  # no colour (a log file, NO_COLOR): brackets show which token it is
            ctx.append(token, style="bold white on red")
            ctx.append(_visible(t["after"]), style="dim")
            top.add_row(str(t["trace"]), str(t["position"]), f"{t['p_s']:.2e}", ctx)
        print_table(top)


_BLANKS = {" ": "space", "\n": "newline", "\t": "tab", "\r": "carriage return", "\u00a0": "no-break space"}


def token_label(token: str) -> str:
    """A token as it can be seen: ``⟨2 spaces⟩``, ``⟨newline⟩``, ``⟨empty⟩`` for blank ones, else the text with
    newlines and tabs shown."""
    if token == "":
        return "⟨empty⟩"
    if token.strip():
        return _visible(token)
    names = []
    for ch in token:
        name = _BLANKS.get(ch, f"U+{ord(ch):04X}")
        if names and names[-1][0] == name:
            names[-1][1] += 1
        else:
            names.append([name, 1])
    return "⟨" + " ".join(f"{n} {name}s" if n > 1 else name for name, n in names) + "⟩"


def _visible(s: str) -> str:
    return s.replace("\n", "⏎").replace("\t", "⇥")


def _style(p: float, pth: float) -> str:
    if p < pth:
        return COLOURS[3][1]
    if p >= 0.5:
        return COLOURS[0][1]
    return COLOURS[1][1] if p >= 0.1 else COLOURS[2][1]


def _render_coloured(lm, scored, pth: float) -> None:
    from ..surprisal import token_texts

    legend = Text("legend: ")
    for _, style, label in COLOURS:
        legend.append(f" {label.replace('pth', f'{pth:g}')} ", style=style)
        legend.append(" ")
    console.print(legend)
    for t in scored:
        out = Text()
        for piece, lp in zip(token_texts(lm, t.ids), t.logprobs.tolist()):
            out.append(piece, style=_style(math.exp(lp), pth))
        console.rule(f"trace {t.id}")
        console.print(out)


def _check_plot_path(path: str) -> None:
    """Before any scoring: matplotlib present, a format it writes, a folder we can write to."""
    import os

    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'rsd-toolkit[plot]'") from None
    from matplotlib.figure import Figure

    ext = os.path.splitext(path)[1].lstrip(".").lower()
    formats = FigureCanvasAgg(Figure()).get_supported_filetypes()
    if ext not in formats:
        raise UserError(f"--plot {path}: unknown image type {ext or '(none)'!r}; use .png, .svg or .pdf")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise UserError(f"--plot {path}: folder {folder} does not exist or is not writable")


def _plot(sets: list[tuple[str, list]], pth: float, path: str, title: str) -> None:
    import matplotlib.pyplot as plt

    from ..surprisal import plot_figure

    fig = plot_figure(sets, pth, title)
    try:
        fig.savefig(path, dpi=120)
    except (OSError, ValueError) as e:
        raise UserError(f"--plot {path}: {getattr(e, 'strerror', None) or e}") from None
    finally:
        plt.close(fig)


def _short(name: str) -> str:
    """A file or model name for a plot title: its last path part."""
    import os

    return os.path.basename(os.path.normpath(name)) or name


# --------------------------------------------------------------------------------------- rsd compare
@click.command(short_help="Trace sets x students in one table (the paper's Tables 1-2).")
@click.argument("traces", nargs=-1, required=True)
@click.option("--student", "students", multiple=True, required=True,
              help="Student(s) scoring every set; repeat for the cross-model transfer view.")
@click.option("--label", "labels", multiple=True, help="Row labels for the trace sets, in order (default: file names without extension).")
@click.option("--pth", type=FLOAT, default=0.01, show_default=True, help="Threshold of the sub-pth ratio.")
@click.option("--plot", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write one PNG with the surprisal histogram of every row, on a shared x-range (needs matplotlib).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON on stdout.")
@data_options
@scoring_options
def compare(traces: tuple[str, ...], students: tuple[str, ...], labels: tuple[str, ...], **kw) -> None:
    """Compare trace sets under one or more students: the form of the paper's Tables 1-2.

    One row per (trace set, student): tokens, sub-pth ratio, mean surprisal, perplexity and the share
    of correct traces when the records say so. Traces tailored to student A scored under student B show
    how well RSD data transfers.

    \b
    Example: offline: teacher-only traces beside `rsd generate --help`'s
      rsd generate --teacher asset:smollm2 --student asset:smollm2 \\
          --dataset p.jsonl --out teacher.jsonl --mode teacher --attempts 2
      rsd compare --student asset:smollm2 teacher.jsonl traces.jsonl \\
          --label teacher --label RSD
      rsd compare --student Qwen/Qwen3-0.6B --student meta-llama/Llama-3.2-1B \\
          rsd_qwen.jsonl rsd_llama.jsonl
    """
    import os

    from ..surprisal import summarize

    _check_pth(kw["pth"])
    if labels and len(labels) != len(traces):
        raise UserError(f"{len(labels)} --label for {len(traces)} trace sets; give one per set or none")
    names = list(labels) or [os.path.splitext(os.path.basename(t))[0] for t in traces]
    if kw["plot"]:
        _check_plot_path(kw["plot"])
    plotted = []
    sets = [(name, _load_items(t, kw)) for name, t in zip(names, traces)]  # bad files fail before any model loads
    rows = []
    for spec in students:
        lm = _load_student(spec, kw)
        for name, items in sets:
            scored = _score(lm, items, kw, f"{name} under {spec}")[0]
            stats = summarize(scored, kw["pth"])
            plotted.append((f"{name} / {_short(spec)}" if len(students) > 1 else name, scored))
            rows.append({"set": name, "student": spec, **{k: v for k, v in stats.items() if k != "percentiles"}})
        del lm
        gc.collect()
    if kw["plot"]:
        _plot(plotted, kw["pth"], kw["plot"], "surprisal under " + ", ".join(_short(x) for x in students))
        plotted.clear()
    if kw["as_json"]:
        click.echo(json.dumps({"pth": kw["pth"], "rows": rows}, ensure_ascii=False))
        return
    several = len(students) > 1
    console.print(f"scored by [bold]{', '.join(students)}[/]", soft_wrap=True, highlight=False)
    table = Table()
    for c in ("trace set", *(("student",) if several else ()), "traces", "tokens", f"p_s < {kw['pth']:g}", "mean surprisal", "perplexity", "correct"):
        left = c in ("trace set", "student")
        table.add_column(c, justify="left" if left else "right", overflow="fold" if left else "ellipsis")
    for r in rows:
        table.add_row(r["set"], *((r["student"],) if several else ()), str(r["traces"]), str(r["tokens"]), _fmt(r["sub_pth_ratio"], ".2%"),
                      _fmt(r["mean_surprisal"], ".3f"), _fmt(r["perplexity"], ".2f"), _fmt(r["accuracy"], ".1%"))  # fmt: skip
    print_table(table)
    if kw["plot"]:
        console.print(f"histograms written to {kw['plot']}", highlight=False)


# ----------------------------------------------------------------------------------------- rsd sweep
def _parse_pths(text: str) -> list[float]:
    try:
        pths = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--pths {text!r}: expected comma-separated numbers, e.g. 0.1,0.03,0.01") from None
    if not pths:
        raise UserError("--pths is empty; e.g. --pths 0.1,0.03,0.01")
    for p in pths:
        _check_pth(p, "--pths values")
    return pths


@click.command(short_help="Generate at several thresholds and tabulate the statistics.")
@click.option("--teacher", required=True, help="Teacher model: hub id, folder, .gguf file or asset:smollm2.")
@click.option("--student", required=True, help="Student model (same kinds of spec).")
@click.option("--dataset", required=True, help="Hub dataset name, or a local .jsonl/.json/.parquet/.csv file of problems.")
@click.option("--pths", default="0.1,0.03,0.01,0.003", show_default=True, help="Thresholds to generate with.")
@click.option("--limit", type=click.IntRange(min=1), default=16, show_default=True, help="Problems to use (the first N).")
@click.option("--attempts", type=click.IntRange(min=1), default=1, show_default=True, help="Traces per problem at each setting.")
@click.option("--report-pth", type=FLOAT, default=0.01, show_default=True, help="Threshold of the reported sub-pth ratio.")
@click.option("--teacher-baseline/--no-teacher-baseline", default=True, show_default=True,
              help="Also generate teacher-only traces (direct distillation) as the first row.")
@click.option("--split", default="train", show_default=True, help="Dataset split (hub datasets).")
@click.option("--question-field", default=None, help="Question field (default: question, problem, prompt…).")
@click.option("--answer-field", default=None, help="Reference answer field (default: solution, answer…).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON on stdout.")
@scoring_options
@dataclass_options(RSDConfig, exclude=("mode", "pth", "allow_extreme_pth"))
def sweep(**kw) -> None:
    """Generate with several thresholds and tabulate acceptance, sub-pth ratio, perplexity, accuracy.

    Every setting decodes the same problems with the same seeds; the traces are then scored under the
    student (as `rsd surprisal` does) at --report-pth.

    \b
    Example: offline, on the problem file of `rsd generate --help`
      rsd sweep --teacher asset:smollm2 --student asset:smollm2 \\
          --dataset p.jsonl --pths 0.1,0.01 --limit 1 --max-new-tokens 32
      rsd sweep --teacher simplescaling/s1.1-7B --student Qwen/Qwen3-0.6B \\
          --dataset simplescaling/s1K-1.1 --pths 0.1,0.03,0.01,0.003 \\
          --limit 32 --dtype bfloat16
    """
    from ..models import load_lm, load_pair
    from ..surprisal import sweep as run_sweep
    from ..traces.data import load_problems

    pths = _parse_pths(kw["pths"])
    _check_pth(kw["report_pth"], "--report-pth")
    rsd_kwargs = pick(RSDConfig, kw)
    rsd_kwargs["stop_strings"] = tuple(rsd_kwargs.get("stop_strings", ()))
    config = RSDConfig(**rsd_kwargs)
    problems = load_problems(kw["dataset"], kw["split"], kw["question_field"], kw["answer_field"], kw["limit"])
    kind, _, _ = load_pair(kw["teacher"], kw["student"], trust_remote_code=kw["trust_remote_code"])
    device = kw["device"] or default_device()
    err_console.print(f"pair: {kind}; {len(problems)} problems x {kw['attempts']} attempts; loading models on {device}…")
    teacher = load_lm(kw["teacher"], dtype=kw["dtype"], device=device, trust_remote_code=kw["trust_remote_code"])
    student = load_lm(kw["student"], dtype=kw["dtype"], device=device, trust_remote_code=kw["trust_remote_code"])
    n_settings = len(pths) + kw["teacher_baseline"]
    state = {"accepted": 0, "decisions": 0, "setting": ""}

    def on_setting(label: str) -> None:
        state.update(accepted=0, decisions=0, setting=label)
        progress.update(info=[f"setting {label}"])

    def on_trace(trace) -> None:
        state["accepted"] += trace.accepted
        state["decisions"] += trace.decisions
        accepted = percent(state["accepted"] / state["decisions"]) if state["decisions"] else None
        progress.advance(1, tokens=len(trace.ids), info=[f"setting {state['setting']}", accepted and f"proposals accepted {accepted}"])

    with Tracker("sweep", n_settings * len(problems) * kw["attempts"], "traces") as progress:
        rows = run_sweep(
            teacher, student, problems, pths, config, attempts=kw["attempts"], batch_size=kw["batch_size"],
            report_pth=kw["report_pth"], include_teacher=kw["teacher_baseline"], on_setting=on_setting,
            on_trace=on_trace,
        )  # fmt: skip
    if kw["as_json"]:
        click.echo(json.dumps({"teacher": kw["teacher"], "student": kw["student"], "rows": rows}, ensure_ascii=False))
        return
    table = Table(title=f"{kw['teacher']} → {kw['student']}: {len(problems)} problems x {kw['attempts']}")
    for c in ("setting", "proposals accepted", "mean tokens", f"p_s < {kw['report_pth']:g}", "perplexity", "correct"):
        table.add_column(c, justify="left" if c == "setting" else "right")
    for r in rows:
        table.add_row(r["setting"], _fmt(r["acceptance_rate"], ".1%"), f"{r['mean_length']:.0f}", _fmt(r["sub_pth_ratio"], ".2%"),
                      _fmt(r["perplexity"], ".2f"), _fmt(r["accuracy"], ".1%"))  # fmt: skip
    print_table(table)
    console.print("[dim]proposals accepted: accepted / judged teacher proposals, pooled over every trace of the setting "
                  "(– teacher-only); mean tokens: student tokens per trace; correct: share of traces whose last "
                  "\\boxed{} matches.[/]", highlight=False)  # fmt: skip

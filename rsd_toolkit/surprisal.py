"""How surprising a set of traces is to a student: per-token surprisal -ln p_s, the paper's statistics.

The key number is the **sub-pth ratio**, the share of trace tokens the student gives p_s < pth (the
paper: 6.70 % of a teacher's tokens vs 0.09 % of RSD tokens under Qwen3-0.6B at pth = 1 %). Traces are
re-encoded with the scoring student's own tokenizer, so a trace set made for one student (or by anyone
else) can be scored under any other; the prompt goes through that student's chat template and is
excluded from the statistics. Scoring is the engine's ``score_completions``.
"""

from __future__ import annotations

import codecs
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from .config import RSDConfig
from .engine import RSDEngine
from .engine.scoring import score_completions
from .models import LM
from .traces.answers import answers_match, extract_answer
from .traces.data import QUESTION_FIELDS, DataError, Problem, as_text, load_first_rows
from .traces.pipeline import attempt_seed

TEXT_FIELDS = ("text", "completion", "response", "output", "trace")
PERCENTILES = (50, 90, 99)
# Bin edges on p_s (the threshold pth is added as an edge): the histogram reads "how likely did the
# student find these tokens", and the bins below pth are the tokens RSD would have rejected.
P_EDGES = (1.0, 0.5, 0.1, 0.03, 0.01, 1e-3, 1e-4, 1e-6, 0.0)


@dataclass
class TextItem:
    """One trace to score: its prompt (question, or None) and the generated text."""

    id: str
    prompt: str | None
    text: str
    fields: dict = field(default_factory=dict)  # passed through: correct, kind, acceptance_rate…
    # The trace ended with a stop token (EOS / end-of-turn): it is scored too, like every statistic of the
    # engine counts it (SFT trains on it). None: unknown, decided from ``last_id`` at scoring time.
    ends_with_stop: bool | None = False
    last_id: int | None = None  # the record's last token id (the stop token it ended with, when it did)

    @classmethod
    def of_trace(cls, id: str, prompt: str | None, trace) -> "TextItem":
        """An engine :class:`~rsd_toolkit.engine.Trace`, scored as the engine counted it (stop token included)."""
        return cls(id, prompt, trace.text, {}, trace.finish_reason == "eos", trace.ids[-1] if trace.ids else None)


@dataclass
class ScoredTrace:
    id: str
    ids: list[int]  # the completion in the scoring student's tokens
    logprobs: torch.Tensor  # natural-log p_s of each token
    fields: dict = field(default_factory=dict)

    def surprisal(self) -> torch.Tensor:
        return -self.logprobs.double()


def load_items(
    source: str,
    text_field: str | None = None,
    prompt_field: str | None = None,
    split: str = "train",
    limit: int | None = None,
) -> list[TextItem]:
    """Traces from an ``rsd generate`` file, or any JSONL / dataset with a text field (and a prompt field).

    ``prompt_field=""`` scores the text without a prompt (from BOS).
    """
    rows = load_first_rows(source, split, limit)
    first = rows[0]
    tf = text_field or next((f for f in TEXT_FIELDS if f in first), None)
    if tf is None or tf not in first:
        what = f"no field {text_field!r}" if text_field else f"no text field (tried {', '.join(TEXT_FIELDS)})"
        raise DataError(f"{source}: {what}; pass --text-field, fields: {', '.join(first)}")
    if prompt_field == "":
        pf = None
    elif prompt_field:
        if prompt_field not in first:
            raise DataError(f"{source}: no field {prompt_field!r} for the prompt; fields: {', '.join(first)}")
        pf = prompt_field
    else:
        pf = next((f for f in QUESTION_FIELDS if f in first and f != tf), None)
    items = []
    for i, row in enumerate(rows):
        text = row.get(tf)
        if not isinstance(text, str):
            raise DataError(f"{source}: row {i + 1}: field {tf!r} is {type(text).__name__}, not text")
        keep = {k: row[k] for k in ("correct", "kind", "acceptance_rate") if k in row}
        rid = str(row["id"]) if row.get("id") not in (None, "") else str(i)
        prompt = as_text(row[pf], f"{source}: row {i + 1}, field {pf!r},") if pf and row.get(pf) is not None else None
        items.append(TextItem(rid, prompt, text, keep, *record_stop(row)))
    return items


def record_stop(row: dict) -> tuple[bool | None, int | None]:
    """Whether a trace record ended with its stop token: ``(ends_with_stop, last id)``.

    ``finish_reason == "eos"`` says so (a UPFT prefix never does: it is a cut); without a finish reason
    the record's ids may end with the student's stop token (decided by the scoring student: None here).
    """
    ids = row.get("ids")
    last = ids[-1] if isinstance(ids, list) and ids and isinstance(ids[-1], int) else None
    if row.get("kind") == "upft_prefix":
        return False, last
    reason = row.get("finish_reason")
    if reason is not None:
        return reason == "eos", last
    return (None if last is not None else False), last


def stop_id(lm: LM, item: TextItem) -> int | None:
    """The stop token scored after ``item``'s text under ``lm`` (None: the trace did not end with one):
    the record's own stop id when it is one of this student's, else the student's primary stop."""
    if item.ends_with_stop is None:  # no finish reason: the ids say
        return item.last_id if item.last_id in lm.stop_ids else None
    if not item.ends_with_stop:
        return None
    return item.last_id if item.last_id in lm.stop_ids else lm.primary_stop


def start_ids(lm: LM) -> list[int]:
    """What a prompt-less text is scored after: BOS, else the end token (a document boundary)."""
    bos = lm.tokenizer.bos_token_id
    return [bos if bos is not None else lm.primary_stop]


def score_items(
    lm: LM,
    items: list[TextItem],
    *,
    batch_size: int = 16,
    chat_template: bool = True,
    progress: Callable[[int, int], None] | None = None,
    skipped: Counter | None = None,
) -> list[ScoredTrace]:
    """Teacher-forced log p_s of every text token (prompt in the student's chat template, not scored),
    and of the stop token when the trace ended with one (``TextItem.ends_with_stop``).

    Empty texts, and texts that with their prompt exceed the student's context (positions it was never
    trained on would score garbage), are dropped and counted in ``skipped`` ("empty", "too_long").
    """
    config = RSDConfig(chat_template=chat_template)
    skipped = skipped if skipped is not None else Counter()
    stops = [stop_id(lm, it) for it in items]
    completions = [lm.vocab.encode(it.text) + ([] if e is None else [e]) for it, e in zip(items, stops)]
    skipped["empty"] += sum(not c for c in completions)
    items, completions = [it for it, c in zip(items, completions) if c], [c for c in completions if c]
    prompts = [lm.prompt(it.prompt, config)[1] if it.prompt is not None else start_ids(lm) for it in items]
    limit = lm.context_length
    fits = [limit is None or len(p) + len(c) <= limit for p, c in zip(prompts, completions)]
    skipped["too_long"] += fits.count(False)
    items, prompts, completions = ([x for x, ok in zip(seq, fits) if ok] for seq in (items, prompts, completions))
    logprobs = score_completions(lm, prompts, completions, batch_size=batch_size, progress=progress)
    return [ScoredTrace(it.id, c, lp, it.fields) for it, c, lp in zip(items, completions, logprobs)]


# ----------------------------------------------------------------------------------------- statistics
def summarize(traces: list[ScoredTrace], pth: float) -> dict:
    """Token-weighted statistics over a trace set (surprisal in nats; perplexity = exp(mean))."""
    s = torch.cat([t.surprisal() for t in traces]) if traces else torch.zeros(0, dtype=torch.float64)
    n = s.numel()
    sub = int((s > -math.log(pth)).sum()) if n else 0  # p_s < pth
    ordered = s.sort().values
    pct = {str(q): float(ordered[min(n - 1, math.ceil(q / 100 * n) - 1)]) if n else None for q in PERCENTILES}
    mean = float(s.mean()) if n else None
    labelled = [t.fields["correct"] for t in traces if isinstance(t.fields.get("correct"), bool)]
    return {
        "traces": len(traces),
        "tokens": n,
        "sub_pth": sub,
        "sub_pth_ratio": sub / n if n else None,
        "mean_surprisal": mean,
        "perplexity": math.exp(mean) if mean is not None else None,
        "percentiles": pct,
        "max_surprisal": float(ordered[-1]) if n else None,
        "accuracy": sum(labelled) / len(labelled) if labelled else None,
    }


def histogram(traces: list[ScoredTrace], pth: float) -> list[dict]:
    """Token counts per p_s bin, most likely first; bins below pth are marked."""
    edges = sorted(set(P_EDGES) | {pth}, reverse=True)
    p = torch.cat([t.logprobs.double().exp() for t in traces]) if traces else torch.zeros(0, dtype=torch.float64)
    bins = []
    for hi, lo in zip(edges, edges[1:]):
        inside = (p >= lo) & ((p < hi) if hi < 1.0 else (p <= hi))
        bins.append({"p_low": lo, "p_high": hi, "count": int(inside.sum()), "below_pth": hi <= pth})
    return bins


def token_texts(lm: LM, ids: list[int], start: bool = True) -> list[str]:
    """Each token's share of the decoded text (a token ending mid-character shows with the next one).

    ``start``: ``ids`` begin the text (a SentencePiece dummy-prefix space is dropped only there).
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    texts = [decoder.decode(lm.vocab.token_bytes[i]) for i in ids]
    if start and texts and lm.vocab.strip_leading_space and texts[0].startswith(" "):
        texts[0] = texts[0][1:]
    return texts


def top_tokens(lm: LM, traces: list[ScoredTrace], n: int = 10, context_chars: int = 40) -> list[dict]:
    """The ``n`` most surprising tokens, with the text just before and after them."""
    if not traces:
        return []
    s_all = torch.cat([t.surprisal() for t in traces])
    ends = torch.tensor([len(t.ids) for t in traces]).cumsum(0)
    top = s_all.topk(min(n, s_all.numel()))
    out = []
    for s, flat in zip(top.values.tolist(), top.indices.tolist()):
        ti = int(torch.searchsorted(ends, flat, right=True))
        t = traces[ti]
        k = flat - (int(ends[ti - 1]) if ti else 0)
        texts = token_texts(lm, t.ids[max(0, k - 32) : k + 9], start=k <= 32)
        j = k - max(0, k - 32)
        out.append({
            "trace": t.id, "position": k, "token": texts[j], "token_id": t.ids[k], "p_s": math.exp(-s),
            "surprisal": s, "before": "".join(texts[:j])[-context_chars:], "after": "".join(texts[j + 1 :])[: context_chars // 2],
        })  # fmt: skip
    return out


def per_trace(traces: list[ScoredTrace], pth: float) -> list[dict]:
    rows = []
    for t in traces:
        s = summarize([t], pth)
        rows.append({"id": t.id, "tokens": s["tokens"], "sub_pth": s["sub_pth"], "sub_pth_ratio": s["sub_pth_ratio"],
                     "mean_surprisal": s["mean_surprisal"], "perplexity": s["perplexity"], **t.fields})  # fmt: skip
    return rows


def report(lm: LM, traces: list[ScoredTrace], pth: float, source: str, top: int = 10, skipped: Counter | None = None) -> dict:
    """Everything ``rsd surprisal --json`` prints."""
    return {
        "source": source,
        "student": lm.name,
        "pth": pth,
        "skipped_empty": (skipped or {}).get("empty", 0),
        "skipped_too_long": (skipped or {}).get("too_long", 0),
        "summary": summarize(traces, pth),
        "histogram": histogram(traces, pth),
        "top_tokens": top_tokens(lm, traces, top),
        "traces": per_trace(traces, pth),
    }


def plot_figure(sets: list[tuple[str, list]], pth: float, title: str):
    """One histogram of surprisal per (label, scored traces), on shared bins and one x-range so the sets compare
    at a glance; integer tick marks for small counts; a linear count axis unless counts span decades."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch
    from matplotlib.ticker import MaxNLocator

    values = [(label, torch.cat([t.surprisal() for t in scored]).numpy() if scored else np.zeros(0)) for label, scored in sets]
    finite = np.concatenate([v[np.isfinite(v)] for _, v in values]) if values else np.zeros(0)
    high = max(float(finite.max()) if finite.size else 1.0, -math.log(pth)) * 1.05
    bins = np.linspace(0.0, high, 41)
    fig, ax = plt.subplots(figsize=(7, 4))
    peak = 0
    for label, v in values:
        counts, _, _ = ax.hist(np.clip(v, 0, high), bins=bins, histtype="stepfilled" if len(values) == 1 else "step",
                               linewidth=1.5, label=label if len(values) > 1 else None,
                               color="#3b82f6" if len(values) == 1 else None)  # fmt: skip
        peak = max(peak, int(counts.max()) if counts.size else 0)
    if peak > 1000:
        ax.set_yscale("log")
    else:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(0, high)
    ax.axvline(-math.log(pth), color="red", linestyle="--", label=f"p_s = {pth:g}")
    ax.set_xlabel("surprisal -ln p_s (nats)")
    ax.set_ylabel("tokens")
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------- sweep
def sweep(
    teacher: LM,
    student: LM,
    problems: list[Problem],
    pths: list[float],
    config: RSDConfig,
    *,
    attempts: int = 1,
    batch_size: int = 16,
    report_pth: float = 0.01,
    include_teacher: bool = True,
    on_setting: Callable[[str], None] | None = None,
    on_trace=None,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Generate with each threshold (and teacher-only as the baseline) and tabulate the paper's columns:
    acceptance rate, sub-``report_pth`` ratio and perplexity under the student, accuracy."""
    settings = [("teacher", replace(config, mode="teacher"))] if include_teacher else []
    settings += [(f"rsd pth={p:g}", replace(config, mode="rsd", pth=p)) for p in pths]
    prompts = [p.question for p in problems for _ in range(attempts)]
    seeds = [attempt_seed(p.id, k) for p in problems for k in range(attempts)]
    rows = []
    for label, cfg in settings:
        if on_setting is not None:
            on_setting(label)
        engine = RSDEngine(teacher, student, cfg)
        traces = engine.generate(prompts, seeds=seeds, batch_size=batch_size, progress=on_trace)
        correct = [answers_match(extract_answer(t.text), problems[i // attempts].answer) for i, t in enumerate(traces)]
        items = [TextItem.of_trace(f"{problems[i // attempts].id}/{i % attempts}", prompts[i], t) for i, t in enumerate(traces)]
        scored = score_items(student, items, batch_size=batch_size, chat_template=cfg.chat_template)
        stats = summarize(scored, report_pth)
        decisions = sum(t.decisions for t in traces)
        row = {
            "setting": label, "mode": cfg.mode, "pth": cfg.pth if cfg.mode == "rsd" else None,
            "acceptance_rate": sum(t.accepted for t in traces) / decisions if decisions else None,
            "traces": len(traces), "tokens": stats["tokens"], "mean_length": stats["tokens"] / max(1, len(traces)),
            "report_pth": report_pth, "sub_pth_ratio": stats["sub_pth_ratio"], "mean_surprisal": stats["mean_surprisal"],
            "perplexity": stats["perplexity"], "accuracy": sum(correct) / len(correct) if correct else None,
        }  # fmt: skip
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows

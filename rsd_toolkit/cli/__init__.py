"""The ``rsd`` command line: thin click commands that parse, call the library and render with rich."""

from __future__ import annotations

import click

from .. import __version__
from .assets import assets
from .common import main_entry
from .compat import compat
from .generate import generate, merge


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="rsd")
def cli() -> None:
    """Reverse Speculative Decoding toolkit: student-tailored reasoning traces, across tokenizers.

    \b
    Example:
      rsd assets fetch
      rsd compat asset:qwen2 asset:llama-bpe
    """


cli.add_command(assets)
cli.add_command(compat)
cli.add_command(generate)
cli.add_command(merge)


def main() -> None:
    main_entry(cli)


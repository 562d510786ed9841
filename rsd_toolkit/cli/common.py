"""Shared CLI plumbing: one-line errors instead of tracebacks, and the rich consoles."""

from __future__ import annotations

import sys

import click
from rich.console import Console

console = Console()
err_console = Console(stderr=True)


class UserError(click.ClickException):
    """A problem with the user's input: printed as one line, exit code 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        err_console.print(f"[bold red]error:[/] {self.message}", highlight=False, soft_wrap=True)


def main_entry(group: click.Group) -> None:
    """Run the click group; known library errors become one-line messages (exit 2), Ctrl-C exits 130."""
    from ..assets import AssetError
    from ..bridges import TokenizerLoadError, UnsupportedTokenizer
    from ..config import ConfigError
    from ..models import ModelLoadError, UnsupportedModel

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars: the commands show their own progress
    try:
        group.main(standalone_mode=False)
    except click.exceptions.Abort:
        err_console.print("interrupted")
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (AssetError, TokenizerLoadError, UnsupportedTokenizer, ModelLoadError, ConfigError, UnsupportedModel) as e:
        UserError(str(e)).show()
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)

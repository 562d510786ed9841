"""Shared CLI plumbing: one-line errors and warnings instead of tracebacks, the rich consoles and tables.

Messages are never wrapped (``soft_wrap``): a log file or a pipe gets each message on one line, whatever the
terminal width. Tables fit the width — the terminal's, else ``COLUMNS``, else 80 columns — and nothing in
them is ever cut with an ellipsis: cells and headers wrap (long words fold), see ``print_table``.
"""

from __future__ import annotations

import os
import sys
import warnings

import click
from rich.console import Console

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def print_table(table, out: Console | None = None) -> None:
    """Print a rich table whose columns wrap instead of being cut: no number, path or header is ever ellipsised,
    whatever the width (``COLUMNS`` is honoured; off a terminal without it rich uses 80 columns)."""
    for column in table.columns:
        column.overflow = "fold"
        column.no_wrap = False
        # a word of a header or of a short cell is never broken ("perplexit|y"); long paths still fold
        words = [w for text in (column.header, *column._cells) if isinstance(text, str) for w in text.split()]
        column.min_width = max([column.min_width or 0, *(len(w) for w in words if len(w) <= 16)])
    (out or console).print(table)


class UserError(click.ClickException):
    """A problem with the user's input: printed as one line, exit code 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        say_error(self.message)


def _known_errors() -> tuple[type[BaseException], ...]:
    """Library errors that mean "your input": each becomes one line and exit code 2."""
    from ..assets import AssetError
    from ..bridges import TokenizerLoadError, UnsupportedTokenizer
    from ..checks import InputError
    from ..models import ModelLoadError, UnsupportedModel

    return InputError, AssetError, TokenizerLoadError, UnsupportedTokenizer, ModelLoadError, UnsupportedModel


class Commands(click.Group):
    """The ``rsd`` group: a known library error raised by any command becomes a UserError."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except _known_errors() as e:
            text = str(e).strip()
            raise UserError(text.splitlines()[0] if text else type(e).__name__) from None


def say_error(message: str) -> None:
    err_console.print("[bold red]error:[/] ", end="", highlight=False)
    err_console.print(message, highlight=False, markup=False)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Our InputWarnings as one line each; library warnings only with --verbose."""
    from ..checks import InputWarning

    if issubclass(category, InputWarning):
        err_console.print("[yellow]warning:[/] ", end="", highlight=False)
        err_console.print(str(message), highlight=False, markup=False)
    elif os.environ.get("RSD_VERBOSE"):
        err_console.print(f"[dim]{category.__name__}: {message}[/]", highlight=False, markup=False)


def show_warnings() -> None:
    warnings.showwarning = _show_warning


def set_verbosity(verbose: bool) -> None:
    """Library progress bars and warnings (datasets, hub downloads, GGUF conversion) only with --verbose:
    the commands show their own progress."""
    if verbose:
        os.environ["RSD_VERBOSE"] = "1"
        return
    os.environ.pop("RSD_VERBOSE", None)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "datasets" in sys.modules:  # already imported (tests, notebooks): the variable came too late
        sys.modules["datasets"].disable_progress_bars()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars


def main_entry(group: click.Group) -> None:
    """Run the click group: usage errors in one line (exit 2), Ctrl-C exits 130."""
    try:
        group.main(standalone_mode=False)
    except click.exceptions.Abort:
        err_console.print("interrupted")
        sys.exit(130)
    except click.UsageError as e:
        where = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        say_error(f"{e.format_message()}{where}")
        sys.exit(2)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)

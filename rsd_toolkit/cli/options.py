"""Click options generated from the config dataclasses: one definition for library and CLI."""

from __future__ import annotations

import dataclasses

import click

from .. import checks


class FiniteFloat(click.ParamType):
    """A float option that refuses nan and inf at parse time (``float('nan')`` parses, then poisons a run)."""

    name = "float"

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if number != number or number in (float("inf"), float("-inf")):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


FLOAT = FiniteFloat()


def _device(ctx, param, value):
    return checks.device(value, "--device")


def model_options(device_map: str | None = None):
    """--dtype, --device (checked here: unknown or absent devices fail before anything loads),
    [--<device_map>], --trust-remote-code: the options of every command that loads a model."""
    opts = [
        click.option("--dtype", type=click.Choice(checks.DTYPES), default="auto", show_default=True, help="Model dtype."),
        click.option("--device", default=None, callback=_device,
                     help="Device: cpu, cuda, cuda:N, mps (default: cuda:LOCAL_RANK if available, else cpu)."),
    ]  # fmt: skip
    if device_map:
        opts.append(click.option(f"--{device_map}", default=None, help="e.g. auto: spread a large model over the visible GPUs."))
    opts.append(click.option("--trust-remote-code", is_flag=True, help="Allow custom model/tokenizer code from hub or folders."))

    def decorate(fn):
        for opt in reversed(opts):
            fn = opt(fn)
        return fn

    return decorate


def output_file_option(*decls, **kw):
    """An output file option checked at parse time: not a folder, its folder exists and is writable."""
    flag = decls[0]

    def check(ctx, param, value):
        return checks.output_file(value, flag) if value is not None else None

    return click.option(*decls, callback=check, **kw)



def dataclass_options(cls, exclude: tuple[str, ...] = (), rename: dict | None = None):
    """A decorator adding one option per dataclass field (name, default, help and choices from the field)."""
    rename = rename or {}

    def decorate(fn):
        for f in reversed(dataclasses.fields(cls)):
            if f.name in exclude:
                continue
            flag = "--" + rename.get(f.name, f.name).replace("_", "-")
            help_text = f.metadata.get("help", "")
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if isinstance(default, bool):
                fn = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=default, show_default=True, help=help_text)(fn)
            elif isinstance(default, tuple):
                fn = click.option(flag, f.name, multiple=True, default=default, help=help_text + " Repeatable.")(fn)
            elif "choices" in f.metadata:
                fn = click.option(flag, f.name, type=click.Choice(f.metadata["choices"]), default=default,
                                  show_default=True, help=help_text)(fn)  # fmt: skip
            else:
                kind = FLOAT if isinstance(default, float) else type(default)
                fn = click.option(flag, f.name, type=kind, default=default, show_default=True, help=help_text)(fn)
        return fn

    return decorate


def pick(cls, kwargs: dict) -> dict:
    """The entries of ``kwargs`` that are fields of ``cls`` (removed from ``kwargs``)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: kwargs.pop(k) for k in list(kwargs) if k in names}

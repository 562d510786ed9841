"""Click options generated from the config dataclasses: one definition for library and CLI."""

from __future__ import annotations

import dataclasses

import click


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
                fn = click.option(flag, f.name, type=type(default), default=default, show_default=True, help=help_text)(fn)
        return fn

    return decorate


def pick(cls, kwargs: dict) -> dict:
    """The entries of ``kwargs`` that are fields of ``cls`` (removed from ``kwargs``)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: kwargs.pop(k) for k in list(kwargs) if k in names}

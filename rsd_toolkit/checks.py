"""Input checks that every command runs before any model loads, and the one error type they raise.

Each check names the option or file, what is wrong and how to fix it, in one line; the CLI prints any
``InputError`` as ``error: …`` with exit code 2. The library's own input errors (config values, data and
trace files, benchmarks) derive from it, so every command reports bad input the same way.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator


class InputError(ValueError):
    """Input we cannot run with; the message is one line: what is wrong and how to fix it."""


class InputWarning(UserWarning):
    """Input we run with, but the user should know about (skipped lines or problems); the CLI prints one line."""


def number(value, name: str, *, low=None, high=None, low_open: bool = False, high_open: bool = False,
           error: type[InputError] = InputError):
    """``value`` if it is a finite number in the range (None passes: "not given"); else ``error`` (an InputError)."""
    if value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{name} must be a number; got {value!r}")
    if not math.isfinite(value):
        raise error(f"{name} must be a finite number; got {value}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise error(f"{name} must be {_range_text(low, high, low_open, high_open)}; got {value}")
    return value


def _range_text(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    return f"{'<' if high_open else '<='} {high:g}"


def regex(pattern: str, name: str) -> re.Pattern:
    """The compiled pattern, or InputError quoting the regex error."""
    try:
        return re.compile(pattern)
    except re.error as e:
        raise InputError(f"{name} {pattern!r} is not a valid regular expression ({e})") from None


DTYPES = ("auto", "float32", "bfloat16", "float16")


def dtype(value: str, name: str = "--dtype") -> str:
    if value not in DTYPES:
        raise InputError(f"{name} {value!r}: unknown dtype; use one of {', '.join(DTYPES)}")
    return value


def device(spec: str | None, name: str = "--device") -> str | None:
    """A device torch can use here (``cpu``, ``cuda``, ``cuda:1``, ``mps``…); None passes (the default)."""
    if spec is None:
        return None
    import torch

    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise InputError(f"{name} {spec!r}: not a device name; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cpu":
        return spec
    backend = {"cuda": torch.cuda, "mps": getattr(torch.backends, "mps", None)}.get(dev.type) or getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise InputError(f"{name} {spec!r}: no {dev.type} device is available here; use --device cpu")
    count = getattr(backend, "device_count", None)
    if dev.index is not None and count is not None and dev.index >= count():
        raise InputError(f"{name} {spec!r}: only {count()} {dev.type} device(s) here (cuda:0 … cuda:{count() - 1})")
    return spec


# --------------------------------------------------------------------------------------------- paths
def input_file(path: str, name: str) -> str:
    """An existing, readable regular file."""
    if not os.path.exists(path):
        raise InputError(f"{name} {path}: no such file")
    if os.path.isdir(path):
        raise InputError(f"{name} {path}: is a folder, expected a file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{name} {path}: not readable (permission denied)")
    return path


def _writable_folder(folder: str, name: str, path: str) -> None:
    if not os.path.isdir(folder):
        what = "is a file" if os.path.exists(folder) else "does not exist"
        raise InputError(f"{name} {path}: folder {folder} {what}; create the folder or choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{name} {path}: folder {folder} is not writable")


def output_file(path: str, name: str) -> str:
    """A path we can create or append to: not a folder, in an existing writable folder, writable if present."""
    if not path or path.endswith(os.sep):
        raise InputError(f"{name} {path!r}: expected a file name")
    if os.path.isdir(path):
        raise InputError(f"{name} {path}: is a folder, expected a file name (e.g. {os.path.join(path, 'out.jsonl')})")
    if os.path.exists(path) and not os.path.isfile(path):
        raise InputError(f"{name} {path}: exists and is not a regular file")
    _writable_folder(os.path.dirname(os.path.abspath(path)), name, path)
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise InputError(f"{name} {path}: the file exists and is not writable")
    return path


def output_folder(path: str, name: str) -> str:
    """A folder we can create (with its parents) or write into."""
    if not path:
        raise InputError(f"{name}: expected a folder name")
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise InputError(f"{name} {path}: is a file, expected a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise InputError(f"{name} {path}: folder is not writable")
        return path
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    _writable_folder(parent, name, path)
    return path


# ------------------------------------------------------------------------------------------ encodings
def text_lines(path: str, data: bytes | None = None) -> Iterator[tuple[int, str, bool]]:
    """``(line number, text, complete)`` of a UTF-8 file; a line that is not UTF-8 is an InputError naming it.

    ``complete`` is False only for a last line without its newline (a writer cut short).
    """
    if data is None:
        with open(path, "rb") as f:
            data = f.read()
    start, n = 0, 0
    if data.startswith(b"\xef\xbb\xbf"):  # a BOM some editors write
        start = 3
    while start < len(data):
        end = data.find(b"\n", start)
        complete = end >= 0
        end = end if complete else len(data)
        n += 1
        raw = data[start:end]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(
                f"{path} line {n}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                "convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
            ) from None
        yield n, text.rstrip("\r"), complete
        start = end + 1

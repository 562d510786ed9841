"""The trace file: one JSON line per finished problem, appended atomically, resumable.

A line is written with one ``write`` + ``fsync``; a process killed mid-write leaves a last line without
its newline, which the next run cuts off. Every record carries the run's configuration; a rerun with a
different configuration is refused unless forced (the old file is then kept as ``…​.bak-N``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import tempfile
import time

from ..checks import InputError, output_file, text_lines
from .data import read_jsonl


class TraceFileError(InputError):
    """The output file cannot be continued as asked (message says why and what to pass)."""


class OutputLock:
    """An exclusive lock on an output path, so two runs never write the same file.

    ``flock`` on ``PATH.lock``; the kernel releases it when the holder dies (even by SIGKILL), so a lock
    file left by a killed run does not block the resume. The file names the holder (pid, host) for the
    message the second writer sees.
    """

    def __init__(self, path: str, what: str = "--out"):
        self.path = path + ".lock"
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask decides, as for open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                raise TraceFileError(
                    f"{what} {path} is being written by {holder}; wait for that run to finish or stop it "
                    "(its finished work is kept), or choose another output"
                ) from None
            try:  # the previous holder may have removed the file between our open and our lock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})".encode())
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class TraceFile:
    """Use as a context manager: the output stays locked against other writers until it is closed."""

    def __init__(self, path: str, run_config: dict, force: bool = False, lock: OutputLock | None = None):
        self.path = path
        self.run_config = run_config
        self.records: dict[str, dict] = {}
        output_file(path, "--out")
        self.lock = lock or OutputLock(path)
        try:
            if os.path.exists(path):
                self._load(force)
            with open(path, "ab"):  # fail now, not after the first problem
                pass
        except BaseException:
            self.lock.release()
            raise

    def close(self) -> None:
        self.lock.release()

    def __enter__(self) -> "TraceFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _load(self, force: bool) -> None:
        with open(self.path, "rb") as f:
            data = f.read()
        end = data.rfind(b"\n") + 1
        for n, line, _ in text_lines(self.path, data[:end]):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                rec = None
            if not isinstance(rec, dict) or "id" not in rec:
                raise TraceFileError(f"{self.path} line {n} is not a trace record; is this a trace file of `rsd generate`?")
            if rec.get("run") != self.run_config:
                if not force:
                    old = rec.get("run") if isinstance(rec.get("run"), dict) else {}
                    diff = setting_changes(old, self.run_config)
                    raise TraceFileError(
                        f"{self.path} was made with other settings ({'; '.join(diff) or 'unknown'}); use another --out, "
                        f"or --force to start over (the old file is kept as {next_backup(self.path)})"
                    )
                self._set_aside()
                return
            self.records[str(rec["id"])] = rec
        if end < len(data):  # a write was cut short (and the file is ours): drop the partial line
            with open(self.path, "r+b") as f:
                f.truncate(end)

    def _set_aside(self) -> None:
        set_aside(self.path)
        self.records = {}

    def done(self, problem_id: str) -> bool:
        return str(problem_id) in self.records

    def append(self, record: dict) -> None:
        record = {**record, "run": self.run_config}
        line = (json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # the umask decides, as for open()
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.records[str(record["id"])] = record


def next_backup(path: str) -> str:
    """The first free ``path.bak-N``: where ``set_aside`` would move ``path``."""
    n = 1
    while os.path.exists(f"{path}.bak-{n}"):
        n += 1
    return f"{path}.bak-{n}"


def set_aside(path: str) -> str:
    """Move ``path`` to the first free ``path.bak-N``; returns the new name."""
    backup = next_backup(path)
    os.replace(path, backup)
    return backup


def setting_changes(old: dict, new: dict, prefix: str = "", limit: int = 4) -> list[str]:
    """``["rsd.pth 0.01 → 0.03", "generate.instruction (none) → '…'"]``: the settings that differ, old → new,
    nested keys dotted; at most ``limit`` listed, then ``and N more``."""
    changes: list[str] = []

    def show(v) -> str:
        if v is None:
            return "(none)"
        text = json.dumps(v, ensure_ascii=False)
        return text if len(text) <= 40 else text[:37] + '..."'

    def walk(a, b, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b), key=str):
                walk(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        elif a != b:
            changes.append(f"{path} {show(a)} → {show(b)}")

    walk(old, new, prefix)
    return changes[:limit] + ([f"and {len(changes) - limit} more"] if len(changes) > limit else [])


def read_records(path: str) -> list[dict]:
    """All complete records of a trace file (a cut-off last line is ignored, with a warning)."""
    return read_jsonl(path)


def write_atomic(path: str, text: str | bytes) -> None:
    """Replace ``path`` with ``text`` (UTF-8, or ``bytes`` as they are) in one step: a temporary file beside it,
    then a rename (no stray temporary left behind, whatever fails).

    The result has the mode a plain ``open(path, "w")`` would give (``0o666`` less the umask; an existing
    file keeps its mode), not ``mkstemp``'s private 0600: colleagues on a shared machine can read results."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, _mode_for(path))
        with os.fdopen(fd, "wb") if isinstance(text, bytes) else os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _mode_for(path: str) -> int:
    """The permission bits a newly written ``path`` should get: an existing file's, else 0o666 & ~umask."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        pass
    mask = os.umask(0)  # the only portable way to read the umask
    os.umask(mask)
    return 0o666 & ~mask

"""The trace file: one JSON line per finished problem, appended atomically, resumable.

A line is written with one ``write`` + ``fsync``; a process killed mid-write leaves a last line without
its newline, which the next run cuts off. Every record carries the run's configuration; a rerun with a
different configuration is refused unless forced (the old file is then kept as ``…​.bak-N``).
"""

from __future__ import annotations

import json
import os


class TraceFileError(ValueError):
    """The output file cannot be continued as asked (message says why and what to pass)."""


class TraceFile:
    def __init__(self, path: str, run_config: dict, force: bool = False):
        self.path = path
        self.run_config = run_config
        self.records: dict[str, dict] = {}
        if os.path.exists(path):
            self._load(force)
        try:  # fail now, not after the first problem: missing folder, read-only file…
            with open(path, "ab"):
                pass
        except OSError as e:
            raise TraceFileError(f"{path}: cannot write ({e.strerror})") from None

    def _load(self, force: bool) -> None:
        with open(self.path, "rb") as f:
            data = f.read()
        end = data.rfind(b"\n") + 1
        try:
            lines = data[:end].decode("utf-8").splitlines()
        except UnicodeDecodeError:
            raise TraceFileError(f"{self.path} is not UTF-8 JSONL; is this a trace file of `rsd generate`?") from None
        for n, line in enumerate(lines, 1):
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
                    diff = sorted(k for k in set(rec.get("run", {})) | set(self.run_config)
                                  if rec.get("run", {}).get(k) != self.run_config.get(k))  # fmt: skip
                    raise TraceFileError(
                        f"{self.path} was made with other settings ({', '.join(diff) or 'unknown'}); "
                        "use another --out, or --force to start over (the old file is kept as .bak)"
                    )
                self._set_aside()
                return
            self.records[str(rec["id"])] = rec
        if end < len(data):  # a write was cut short (and the file is ours): drop the partial line
            with open(self.path, "r+b") as f:
                f.truncate(end)

    def _set_aside(self) -> None:
        n = 1
        while os.path.exists(f"{self.path}.bak-{n}"):
            n += 1
        os.replace(self.path, f"{self.path}.bak-{n}")
        self.records = {}

    def done(self, problem_id: str) -> bool:
        return str(problem_id) in self.records

    def append(self, record: dict) -> None:
        record = {**record, "run": self.run_config}
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.records[str(record["id"])] = record


def read_records(path: str) -> list[dict]:
    """All complete records of a trace file (a cut-off last line is ignored)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.endswith("\n") or not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise TraceFileError(f"{path} line {n} is not JSON") from None
    return out

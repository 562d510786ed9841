"""`rsd demo`: runs offline and shows the mechanism (RSD traces far less surprising to the student)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from conftest import require_assets
from rsd_toolkit.cli import cli


def test_demo_fast_shows_rsd_traces_less_surprising_than_teacher_traces():
    require_assets()
    require_assets("smollm2")
    result = CliRunner().invoke(cli, ["demo", "--fast", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    teacher, rsd = out["sets"]["teacher only"], out["sets"]["RSD"]
    assert out["bridge"] == "bridged" and teacher["traces"] == rsd["traces"] == 4
    assert teacher["sub_pth_ratio"] > 0.1  # the teacher's chatty tokens surprise the terse student
    assert rsd["sub_pth_ratio"] < teacher["sub_pth_ratio"] / 4
    assert rsd["perplexity"] < teacher["perplexity"] and 0 < rsd["acceptance_rate"] < 1


def test_demo_renders_the_story():
    require_assets()
    require_assets("smollm2")
    result = CliRunner().invoke(cli, ["demo", "--fast", "--show", "1"])
    assert result.exit_code == 0, result.output
    for part in ("1. The tokenizers", "Verdict", "bridged", "2. Traces", "made by", "teacher only", "RSD", "legend:", "trace "):
        assert part in result.stdout, part

"""README's library example runs as written."""

import re
from pathlib import Path

from conftest import require_assets


def test_readme_python_example_runs(vocab):
    vocab("qwen2")
    require_assets("smollm2")
    readme = Path(__file__).resolve().parents[1] / "README.md"
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


def test_readme_quick_start_is_make_demo_and_make_test():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    assert quick.split("\n")[:2] == ["make demo", "make test"]
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "make test" in ci


# ------------------------------------------------------------------------- every documented command
DOCS = ["README.md", "examples/README.md"]
# Commands that need no model hub and run here in full (the demo has its own test).
RUN_OFFLINE = {"rsd assets list", "rsd compat asset:qwen2 asset:llama-bpe", "rsd compat asset:mistral-v1 asset:mistral-v3 --json"}


def documented_commands() -> list[tuple[str, list[str]]]:
    """Every `rsd …` / `-m rsd_toolkit.cli …` line of the docs' bash blocks, as (line, rsd arguments)."""
    import shlex

    root = Path(__file__).resolve().parents[1]
    out = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", (root / doc).read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].split(" >")[0].strip()
                if line.startswith("rsd "):
                    out.append((line, shlex.split(line)[1:]))
                elif "-m rsd_toolkit.cli " in line and not line.startswith("#"):
                    out.append((line, shlex.split(line.split("-m rsd_toolkit.cli ", 1)[1])))
    return out


def test_every_documented_command_parses():
    """Options, choices and required arguments of each documented command are valid for the CLI."""
    import click

    from rsd_toolkit.cli import cli

    commands = documented_commands()
    assert len(commands) >= 25
    for line, args in commands:
        assert "…" not in line, f"placeholder in a documented command: {line}"
        group_ctx = cli.make_context("rsd", list(args), resilient_parsing=False)
        name, cmd, rest = cli.resolve_command(group_ctx, [*group_ctx._protected_args, *group_ctx.args])
        while isinstance(cmd, click.Group):  # rsd assets fetch
            sub = cmd.make_context(name, rest, parent=group_ctx)
            name, cmd, rest = cmd.resolve_command(sub, [*sub._protected_args, *sub.args])
        try:
            cmd.make_context(name, rest, parent=group_ctx)
        except click.UsageError as e:
            raise AssertionError(f"{line}: {e.format_message()}") from None


def test_offline_documented_commands_run(vocab):
    from click.testing import CliRunner

    from rsd_toolkit.cli import cli

    vocab("qwen2")
    lines = {line for line, _ in documented_commands()}
    assert RUN_OFFLINE <= lines, RUN_OFFLINE - lines
    for line in sorted(RUN_OFFLINE):
        result = CliRunner().invoke(cli, line.split()[1:])
        assert result.exit_code == 0, f"{line}: {result.output}"

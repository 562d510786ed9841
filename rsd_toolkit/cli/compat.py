"""``rsd compat``: how a teacher and a student tokenizer relate, and what that means for RSD."""

from __future__ import annotations

import json

import click
from rich.panel import Panel
from rich.table import Table

from .common import UserError, console, print_table

_VERDICT_STYLE = {"identical": "green", "remappable": "cyan", "bridged": "yellow"}


def read_text_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise UserError(f"--text {path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"--text {path}: is a folder, expected a UTF-8 text file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"--text {path}: not UTF-8 text (byte {e.start}); convert it to UTF-8") from None


@click.command(short_help="Is a tokenizer pair identical, remappable or bridged, and why.")
@click.argument("teacher")
@click.argument("student")
@click.option("--text", "text_file", metavar="FILE", help="Measure fertility/round-trip on this UTF-8 file "
              "instead of the built-in multilingual sample.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--trust-remote-code", is_flag=True, help="Allow custom tokenizer code from hub/folder specs.")
def compat(teacher: str, student: str, text_file: str | None, as_json: bool, trust_remote_code: bool) -> None:
    """Classify a TEACHER/STUDENT tokenizer pair: identical, remappable or bridged.

    TEACHER and STUDENT are hub ids, model folders, tokenizer.json / SentencePiece .model / GGUF /
    Tekken files, or fetched assets (asset:NAME, see `rsd assets list`). Exit code 0 for any verdict.

    \b
    Example:
      rsd compat asset:qwen2 asset:llama-bpe
      rsd compat asset:mistral-v1 asset:mistral-v3 --json
    """
    from ..bridges import analyse, load_vocab

    text = read_text_file(text_file) if text_file else None
    if text is not None and not text.strip():
        raise UserError(f"--text {text_file}: file is empty")
    with console.status("loading tokenizers…") if not as_json else _nullcontext():
        t = load_vocab(teacher, trust_remote_code=trust_remote_code)
        s = load_vocab(student, trust_remote_code=trust_remote_code)
        report = analyse(t, s, text)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
        return
    render(report)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _steps(pipeline) -> str:
    """``ByteFallback+Fuse+Strip`` as ``ByteFallback + Fuse + Strip``: a narrow column wraps between steps."""
    return str(pipeline).replace("+", " + ")


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def render(r) -> None:
    t, s = r.teacher, r.student
    facts = Table(title="Tokenizers", show_lines=False)
    facts.add_column("", style="bold")
    facts.add_column("teacher", overflow="fold")
    facts.add_column("student", overflow="fold")
    size = lambda f: f"{f.vocab_size}" + (f" (model {f.model_vocab_size})" if f.model_vocab_size else "")  # noqa: E731
    rows = [
        ("source", t.name, s.name),
        ("vocab (real / padded)", size(t), size(s)),
        ("model", t.model_type, s.model_type),
        ("normaliser", _steps(t.normalizer), _steps(s.normalizer)),
        ("pre-tokeniser", _steps(t.pre_tokenizer), _steps(s.pre_tokenizer)),
        ("decoder", _steps(t.decoder), _steps(s.decoder)),
        ("byte-level / byte-fallback", f"{t.byte_level} / {t.byte_fallback}", f"{s.byte_level} / {s.byte_fallback}"),
        ("added tokens", str(t.added_tokens), str(s.added_tokens)),
        ("round-trip on sample ¹", _pct(t.round_trip), _pct(s.round_trip)),
        ("tokens / 1k chars", f"{t.fertility:.0f}", f"{s.fertility:.0f}"),
    ]
    for row in rows:
        facts.add_row(*row)
    print_table(facts)
    console.print("[dim]¹ share of the sample's lines that decode(encode(line)) gives back exactly (normalisers such "
                  "as SentencePiece's leading space change the others)[/]", highlight=False)  # fmt: skip

    pair = Table(title="Pair")
    pair.add_column("measure", style="bold")
    pair.add_column("value")
    pair.add_row("pieces shared (of teacher / of student)", f"{_pct(r.piece_overlap_teacher)} / {_pct(r.piece_overlap_student)}")
    pair.add_row("shared pieces with the same id", _pct(r.id_agreement))
    pair.add_row("token boundaries in common", _pct(r.boundary_agreement))
    pair.add_row("sample lines the bridge maps exactly", _pct(r.bridge_exact))
    print_table(pair)

    spec = Table(title="Special tokens (teacher → student)")
    for col in ("role", "teacher", "student", "how"):
        spec.add_column(col)
    rows: dict[int, list] = {}  # one row per teacher token: GPT-2's <|endoftext|> is bos, eos and end_of_text at once
    for m in r.special_map:
        student_tok = "—" if m["student"] is None else f"{m['student']} ({m['student_id']})"
        if m["teacher_id"] in rows:
            rows[m["teacher_id"]][0].append(m["role"])
        else:
            rows[m["teacher_id"]] = [[m["role"]], f"{m['teacher']} ({m['teacher_id']})", student_tok, m["how"]]
    for roles, teacher_tok, student_tok, how in rows.values():
        spec.add_row(", ".join(roles), teacher_tok, student_tok, how)
    print_table(spec)

    for side, f in (("teacher", t), ("student", s)):
        for w in f.warnings:
            console.print(f"[yellow]warning ({side}):[/] {w}", highlight=False)
    style = _VERDICT_STYLE[r.verdict]
    console.print(Panel(f"[bold {style}]{r.verdict}[/]\n{r.meaning}", title="Verdict", expand=False), soft_wrap=False)  # wrap inside the box

"""A toy end-to-end replication on CPU: fine-tune a small student on teacher traces vs on RSD traces.

Teacher: the real SmolLM2-135M-Instruct. Student: `rsd demo`'s small model (Mistral SentencePiece
tokenizer, trained on terse synthetic arithmetic). Every step is an `rsd` command (printed as it runs):

  1. rsd generate --mode teacher   (direct distillation data)  and  --mode rsd   (RSD data)
  2. rsd compare                   (both trace sets under the student)
  3. rsd sft                       (one fine-tuned student per trace set)
  4. rsd eval                      (base, teacher-SFT and RSD-SFT students on held-out problems, --compare)

    python examples/toy_replication.py --out toy_run        # ~10-20 min on 2 CPU cores

Results land in OUT/ (trace files, models, eval JSON) and OUT/results.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rsd_toolkit import demo  # noqa: E402


def sh(args: list[str], log: list[str]) -> str:
    line = "rsd " + " ".join(shlex.quote(a) for a in args)
    print(f"\n$ {line}", flush=True)
    log.append(line)
    done = subprocess.run([sys.executable, "-m", "rsd_toolkit.cli", *args], check=True, stdout=subprocess.PIPE, text=True)
    print(done.stdout, flush=True)
    return done.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="toy_run")
    ap.add_argument("--train-problems", type=int, default=96)
    ap.add_argument("--eval-problems", type=int, default=100)
    ap.add_argument("--attempts", type=int, default=4)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    student = demo.student_dir()
    held_out = demo.arithmetic_problems(args.eval_problems, seed=1)
    eval_ids = {p.id for p in held_out}
    train = [p for p in demo.arithmetic_problems(args.train_problems + args.eval_problems, seed=2) if p.id not in eval_ids]
    train = train[: args.train_problems]
    for name, problems in (("train.jsonl", train), ("eval.jsonl", held_out)):
        with open(out / name, "w") as f:
            for p in problems:
                f.write(json.dumps({"id": p.id, "question": p.question, "answer": p.answer}) + "\n")
    log: list[str] = []
    common = ["--teacher", demo.TEACHER, "--student", student, "--dataset", str(out / "train.jsonl"), "--attempts", str(args.attempts),
              "--max-new-tokens", "48", "--batch-size", "16", "--device", "cpu", "--dtype", "float32"]  # fmt: skip
    for mode in ("teacher", "rsd"):
        sh(["generate", *common, "--mode", mode, "--out", str(out / f"{mode}.jsonl")], log)
    compare = json.loads(sh(["compare", "--student", student, str(out / "teacher.jsonl"), str(out / "rsd.jsonl"),
                             "--label", "teacher", "--label", "rsd", "--device", "cpu", "--json"], log))  # fmt: skip
    sft = ["--learning-rate", "5e-4", "--epochs", "3", "--batch-size", "16", "--per-device-batch-size", "16", "--no-bf16", "--json"]
    for mode in ("teacher", "rsd"):
        sh(["sft", "--student", student, "--traces", str(out / f"{mode}.jsonl"), "--out", str(out / f"sft-{mode}"), *sft], log)
    ev = ["--benchmark", str(out / "eval.jsonl"), "--answer-field", "answer", "--no-instruction", "--samples", "4",
          "--max-new-tokens", "48", "--device", "cpu", "--json"]  # fmt: skip
    results = {"base": json.loads(sh(["eval", "--model", student, *ev, "--out", str(out / "eval-base.json")], log))}
    for mode in ("teacher", "rsd"):
        results[mode] = json.loads(sh(["eval", "--model", str(out / f"sft-{mode}"), *ev, "--out", str(out / f"eval-{mode}.json"),
                                       "--compare", str(out / "eval-base.json")], log))  # fmt: skip
    minutes = (time.time() - t0) / 60
    data = {"compare": compare, "eval": results, "commands": log, "minutes": minutes}
    (out / "results.json").write_text(json.dumps(data, indent=2))
    print(report(data, " ".join(sys.argv[1:])))


def report(data: dict, argv: str) -> str:
    """The results as a Markdown page (what examples/results/toy_replication.md holds)."""
    rows = {r["set"]: r for r in data["compare"]["rows"]}
    lines = [f"# Toy replication: `python examples/toy_replication.py {argv}`", "",
             f"One run, 2-core CPU, {data['minutes']:.0f} minutes in all.", "",
             "## Trace sets under the (untuned) student", "",
             "| trace set | traces | tokens | p_s < 1 % | perplexity | correct |", "|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in rows.items():
        lines.append(f"| {name} | {r['traces']} | {r['tokens']} | {r['sub_pth_ratio']:.1%} | {r['perplexity']:.2f} | "
                     f"{r['accuracy']:.0%} |")  # fmt: skip
    lines += ["", "## Students on the held-out problems (pass@1 over 4 samples)", "",
              "| student | pass@1 | change vs base | relative change |", "|---|---|---|---|"]  # fmt: skip
    for name, ev in data["eval"].items():
        (bench, summary), = ev["summaries"].items()
        cmp = ev.get("compare", {}).get(bench)
        change = f"{cmp['change']:+.3f}" if cmp else "–"
        rel = f"{cmp['relative']:+.1%}" if cmp and cmp["relative"] is not None else "–"
        label = {"base": "base student", "teacher": "SFT on teacher traces", "rsd": "SFT on RSD traces"}[name]
        lines.append(f"| {label} | {summary['pass@1']:.3f} | {change} | {rel} |")
    lines += ["", "## Commands", "", "```bash", *data["commands"], "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

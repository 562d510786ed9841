"""Supervised fine-tuning of a student on `rsd generate` traces, with transformers' ``Trainer``.

Each trace record becomes one example: the question in the student's own chat template (prompt, labels
masked with -100) followed by the trace text (completion, labelled). ``full`` records end with the
student's end-of-turn token, so the model learns to stop; ``upft_prefix`` records are a prefix of an
unsolved problem's trace (UPFT) and get no end token: only the prefix is learned.

Traces written in s1K's ``<|im_start|>think`` / ``<|im_start|>answer`` style can be rewritten into the
student's own thinking markers (Qwen3's ``<think>`` / ``</think>``) first.

Defaults are the paper's (arXiv 2509.22230, following s1): lr 1e-5, AdamW, 5 % linear warmup then cosine
decay, effective batch 16, bf16, 15 epochs, sequences up to 8192 tokens.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from .checks import InputError, input_file, number
from .config import ConfigError

log = logging.getLogger("rsd_toolkit.sft")

S1K_MARKERS = "<|im_start|>think,<|im_start|>answer"
DTYPES = ("float32", "bfloat16", "float16", "auto")
CONFIG_FILE = "rsd_sft_config.json"


class SFTError(InputError):
    """The traces or the student cannot be trained on as given; the message says why and what to do."""


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class SFTConfig:
    learning_rate: float = _f(1e-5, "Peak learning rate (AdamW).")
    epochs: float = _f(15.0, "Training epochs over the traces.")
    max_steps: int = _f(-1, "Stop after this many optimizer steps (-1: run all epochs).")
    batch_size: int = _f(16, "Effective batch: per-device batch x gradient accumulation x devices (accumulation "
                         "is computed from the device count).")  # fmt: skip
    per_device_batch_size: int = _f(1, "Sequences per device and forward pass.")
    warmup_ratio: float = _f(0.05, "Share of the steps with linear warmup; cosine decay follows.")
    weight_decay: float = _f(1e-4, "AdamW weight decay (s1's recipe).")
    max_length: int = _f(8192, "Longest example in tokens; longer completions are cut (prompt kept).")
    bf16: bool = _f(True, "bf16 mixed precision where the GPU supports it (else fp32, with a notice).")
    dtype: str = _f("float32", "Dtype the weights load in; float32 master weights with bf16 autocast is the "
                    "usual mixed-precision recipe.", choices=DTYPES)  # fmt: skip
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass (less memory, ~30 % slower).")
    include_upft: bool = _f(True, "Train on upft_prefix records (prefix only) as well as on full traces.")
    think_markers: str = _f("auto", "Rewrite the source thinking markers into the student's: auto = its <think>/</think> "
                            "tokens when its tokenizer has them; none = leave the text; 'START,END' = these strings.")  # fmt: skip
    source_markers: str = _f(S1K_MARKERS, "The thinking markers of the traces, 'START,END' (s1K style by default).")
    chat_template: bool = _f(True, "Wrap questions in the student's chat template (when it has one).")
    lora: bool = _f(False, "Train LoRA adapters instead of all weights (needs the 'lora' extra: peft); the saved "
                    "model is merged, the adapter is kept in OUT/adapter.")  # fmt: skip
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA alpha (scale = alpha / r).")
    lora_dropout: float = _f(0.05, "LoRA dropout.")
    lora_target_modules: str = _f("all-linear", "Modules given LoRA adapters: all-linear or comma-separated names.")
    logging_steps: int = _f(10, "Log loss and learning rate every N steps.")
    save_steps: int = _f(0, "Checkpoint every N steps (0: at the end of every epoch); a rerun resumes from the last.")
    save_total_limit: int = _f(2, "Checkpoints kept in OUT (older ones are deleted).")
    resume: bool = _f(True, "Continue from the last checkpoint in OUT when there is one.")
    seed: int = _f(0, "Seed for initialisation (LoRA), data order and dropout.")
    report_to: str = _f("none", "Trainer integrations to log to (none, tensorboard, wandb…).")

    def __post_init__(self):
        number(self.learning_rate, "learning_rate", low=0, low_open=True, error=ConfigError)
        number(self.epochs, "epochs", low=0, low_open=True, error=ConfigError)
        for name in ("batch_size", "per_device_batch_size", "lora_r", "lora_alpha", "logging_steps"):
            number(getattr(self, name), name, low=1, error=ConfigError)
        number(self.max_length, "max_length", low=2, error=ConfigError)
        number(self.warmup_ratio, "warmup_ratio", low=0, high=1, high_open=True, error=ConfigError)
        number(self.weight_decay, "weight_decay", low=0, error=ConfigError)
        number(self.lora_dropout, "lora_dropout", low=0, high=1, high_open=True, error=ConfigError)
        number(self.save_steps, "save_steps", low=0, error=ConfigError)
        number(self.save_total_limit, "save_total_limit", low=1, error=ConfigError)
        number(self.seed, "seed", low=0, error=ConfigError)
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"max_steps must be >= 1 or -1 (all epochs); got {self.max_steps}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        parse_markers(self.source_markers, "source markers")
        if self.think_markers not in ("auto", "none"):
            parse_markers(self.think_markers, "think markers")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------- markers
def parse_markers(value: str, what: str = "markers") -> tuple[str, str]:
    parts = value.split(",")
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise ConfigError(f"{what} must be 'START,END' (two non-empty strings); got {value!r}")
    return parts[0].strip(), parts[1].strip()


def rewrite_think(text: str, source: tuple[str, str], target: tuple[str, str]) -> str:
    """Replace the source thinking markers by the target ones, in one pass.

    ``rewrite_think(rewrite_think(t, s, d), d, s) == t`` whenever ``t`` holds no target marker.
    """
    table = dict(zip(source, target))
    return re.sub("|".join(re.escape(m) for m in source), lambda m: table[m.group(0)], text)


def student_markers(config: SFTConfig, vocab) -> tuple[tuple[str, str], tuple[str, str]] | None:
    """(source, target) markers to rewrite for this student, or None to leave texts as they are."""
    if config.think_markers == "none":
        return None
    source = parse_markers(config.source_markers, "source markers")
    if config.think_markers == "auto":
        start, end = vocab.roles.get("think_start"), vocab.roles.get("think_end")
        if start is None or end is None:
            return None  # e.g. Qwen2.5 (s1's student) keeps s1K's markers
        target = (vocab.added[start], vocab.added[end])
    else:
        target = parse_markers(config.think_markers, "think markers")
    return (source, target) if source != target else None


# ---------------------------------------------------------------------------------------------- data
def read_traces(path: str) -> list[dict]:
    """The records of a trace file of `rsd generate`, checked for the fields SFT needs (a cut-off last line
    is skipped with a warning, as everywhere a trace file is read)."""
    from .traces.store import read_records

    if not os.path.exists(path):
        raise SFTError(f"{path}: no such trace file; make one with `rsd generate … --out {path}`")
    input_file(path, "--traces")
    records = read_records(path)
    if not records:
        raise SFTError(f"{path}: the trace file is empty")
    for n, rec in enumerate(records, 1):
        missing = [k for k in ("question", "text", "kind") if k not in rec]
        if missing:
            raise SFTError(f"{path} record {n}: no {', '.join(missing)}; is this a trace file of `rsd generate`?")
        for key in ("question", "text"):
            if not isinstance(rec[key], str):
                what = "null" if rec[key] is None else f"a {type(rec[key]).__name__}"
                raise SFTError(f"{path} record {n} (id {rec.get('id')!r}): {key!r} is {what}, expected text; "
                               "fix or remove that record")  # fmt: skip
        if rec["kind"] not in ("full", "upft_prefix"):
            raise SFTError(f"{path} record {n}: unknown kind {rec['kind']!r} (expected full or upft_prefix)")
    return records


def check_tokenizer(records: list[dict], lm, path: str) -> None:
    """Refuse traces made for another student tokenizer.

    A record's ``ids`` are the generating student's tokens and its ``text`` is their decoding, so with the
    same tokenizer they decode back to the text exactly; with another one they are out of range or decode
    to something else. (Names are not compared: a local copy of the same model is fine.)
    """
    size = lm.vocab.size
    for n, rec in enumerate(records, 1):
        ids = rec.get("ids")
        if not isinstance(ids, list) or not ids:
            continue
        ok = all(isinstance(i, int) and 0 <= i < size for i in ids)
        ok = ok and rec["text"] in (lm.vocab.text_of(ids), lm.vocab.text_of(ids[:-1]))
        if not ok:
            made_for = rec.get("student") or rec.get("run", {}).get("student") or "another student"
            raise SFTError(
                f"{path} was made for the tokenizer of student {made_for!r}, not that of {lm.name!r} (record {n}, id "
                f"{rec.get('id')!r}: its token ids do not decode to its text); train {made_for!r} on it, or "
                f"generate traces with --student {lm.name}"
            )


def encode_record(record: dict, lm, config: SFTConfig, markers=None) -> dict | None:
    """``{"input_ids", "labels"}`` for one record: prompt labels -100, completion labelled; None if the prompt
    alone exceeds ``max_length``. ``markers`` = (source, target) thinking markers to rewrite."""
    from .config import RSDConfig

    prompt_text, prompt_ids = lm.prompt(record["question"], RSDConfig(chat_template=config.chat_template))
    text = record["text"]
    if markers is not None:
        text = rewrite_think(text, *markers)
        start = markers[1][0]
        if prompt_text.rstrip().endswith(start) and text.lstrip().startswith(start):
            text = text.lstrip()[len(start) :]  # the template already opened the thinking block
    completion = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    if record["kind"] == "full" and lm.primary_stop is not None:
        completion = completion + [lm.primary_stop]
    room = config.max_length - len(prompt_ids)
    if room < 1:
        return None
    completion = completion[:room]
    return {"input_ids": list(prompt_ids) + completion, "labels": [-100] * len(prompt_ids) + completion}


def build_examples(records: list[dict], lm, config: SFTConfig) -> tuple[list[dict], Counter]:
    """Tokenised examples and counts (full, upft_prefix, skipped_upft, too_long, truncated)."""
    markers = student_markers(config, lm.vocab)
    examples, stats = [], Counter()
    for rec in records:
        if rec["kind"] == "upft_prefix" and not config.include_upft:
            stats["skipped_upft"] += 1
            continue
        ex = encode_record(rec, lm, config, markers)
        if ex is None:
            stats["too_long"] += 1
            continue
        if rec["kind"] == "full" and ex["labels"][-1] != lm.primary_stop:
            stats["truncated"] += 1
        stats[rec["kind"]] += 1
        examples.append(ex)
    stats["rewrote_markers"] = int(markers is not None)
    return examples, stats


def pad_collator(pad_id: int) -> Callable[[list[dict]], dict]:
    """Right-pad a batch: pad ids, attention mask 0, labels -100."""
    import torch

    def collate(batch: list[dict]) -> dict:
        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"])
            labels[i, :k] = torch.tensor(b["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


# ------------------------------------------------------------------------------------------ training
_UNTRAINABLE = "cannot be fine-tuned as it is ({why}); use an unquantised model (a hub id or a folder with full " \
    "weights{lora})"


def precheck_trainable(student: str, config: SFTConfig, *, trust_remote_code: bool = False) -> None:
    """Refuse, from the model's config alone (no weights), a student Trainer would refuse: a model saved with a
    quantisation method that cannot be trained. Called before anything is written; a config that cannot be
    read here is left to the loader, which reports it."""
    from transformers import AutoConfig

    from .models import ModelLoadError, resolve_model_dir

    try:
        source = resolve_model_dir(student)
        model_config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except ModelLoadError:
        raise
    except Exception:  # noqa: BLE001 - the loader gives the one-line reason later
        return
    quant = getattr(model_config, "quantization_config", None)
    if not quant:
        return
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    method = getattr(method, "value", method)
    if method == "gguf" or not config.lora:
        raise SFTError(f"student {student!r} " + _UNTRAINABLE.format(
            why=f"its config.json says quant_method {method!r}", lora="" if method == "gguf" else ", or --lora"))


def check_trainable(model, student: str, config: SFTConfig) -> None:
    """Trainer's own check of quantised models, as one line before Trainer is built."""
    from transformers.trainer_utils import validate_quantization_for_training

    try:
        validate_quantization_for_training(model)
    except ValueError as e:
        why = (str(e).strip().splitlines() or ["Trainer refuses it"])[0].split(". ")[0].rstrip(".")
        raise SFTError(f"student {student!r} " + _UNTRAINABLE.format(why=why, lora="" if config.lora else ", or --lora")) from None


def world_size() -> int:
    """Processes of this run (torchrun / accelerate launch set WORLD_SIZE)."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def accumulation(config: SFTConfig, devices: int) -> int:
    """Gradient accumulation steps that make per-device batch x devices x steps closest to ``batch_size``."""
    return max(1, round(config.batch_size / (config.per_device_batch_size * devices)))


def bf16_supported() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _checkpointing_arg() -> str:
    """``activation_checkpointing`` in newer transformers 5.x, ``gradient_checkpointing`` before."""
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def _apply_lora(model, config: SFTConfig):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise SFTError("--lora needs peft: pip install 'rsd-toolkit[lora]'") from None
    targets = config.lora_target_modules
    targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")  # fmt: skip
    model = get_peft_model(model, lora)
    if config.gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    return model


def train(
    student: str,
    traces: str,
    out: str,
    config: SFTConfig | None = None,
    *,
    trust_remote_code: bool = False,
    info: Callable[[str], None] | None = None,
    callbacks: list | None = None,
) -> dict:
    """Fine-tune ``student`` on a trace file; saves model, tokenizer and ``rsd_sft_config.json`` in ``out``.

    Checkpoints go to ``out/checkpoint-N``; with ``config.resume`` a rerun continues from the last one.
    Returns a summary (examples, steps, final training loss, where it resumed from).
    """
    import torch
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    from .models import load_lm

    config = config or SFTConfig()
    info = info or log.info
    records = read_traces(traces)
    lm = load_lm(student, dtype=config.dtype, trust_remote_code=trust_remote_code)
    check_tokenizer(records, lm, traces)
    examples, stats = build_examples(records, lm, config)
    if not examples:
        raise SFTError(f"{traces}: no example to train on ({dict(stats)}); check --max-length / --include-upft")
    devices = world_size()
    accum = accumulation(config, devices)
    effective = config.per_device_batch_size * devices * accum
    if effective != config.batch_size:
        info(f"effective batch {effective} (per-device {config.per_device_batch_size} x {devices} devices x {accum} "
             f"accumulation), the closest to --batch-size {config.batch_size}")  # fmt: skip
    use_bf16 = config.bf16 and bf16_supported()
    if config.bf16 and not use_bf16:
        info("bf16 is not supported here (CPU or a GPU without bf16): training in fp32")
    model = lm.model
    if config.gradient_checkpointing:
        model.config.use_cache = False
    if config.lora:
        model = _apply_lora(model, config)
    check_trainable(model, student, config)
    from datasets import Dataset

    args = TrainingArguments(
        output_dir=out,
        learning_rate=config.learning_rate,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_batch_size,
        gradient_accumulation_steps=accum,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup_ratio,  # a float < 1 is a share of the steps
        weight_decay=config.weight_decay,
        bf16=use_bf16,
        **{_checkpointing_arg(): config.gradient_checkpointing},
        logging_steps=config.logging_steps,
        save_strategy="steps" if config.save_steps else "epoch",
        save_steps=config.save_steps or 500,
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        report_to=config.report_to,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
    )
    pad = lm.tokenizer.pad_token_id
    pad = pad if pad is not None else lm.primary_stop if lm.primary_stop is not None else 0
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(examples),
        data_collator=pad_collator(pad),
        processing_class=lm.tokenizer,
        callbacks=callbacks,
    )
    if any(getattr(c, "replaces_trainer_output", False) for c in callbacks or ()):
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(ProgressCallback)  # the caller shows progress, loss and learning rate itself
        trainer.remove_callback(PrinterCallback)
    last = get_last_checkpoint(out) if config.resume and os.path.isdir(out) else None
    info(f"{len(examples)} examples ({stats['full']} full, {stats['upft_prefix']} UPFT prefixes"
         f"{', markers rewritten' if stats['rewrote_markers'] else ''})"
         f"{f'; resuming from {last}' if last else ''}")  # fmt: skip
    result = trainer.train(resume_from_checkpoint=last)
    summary = {
        "out": out, "student": student, "traces": traces, "examples": len(examples), "stats": dict(stats),
        "effective_batch": effective, "gradient_accumulation": accum, "devices": devices, "bf16": use_bf16,
        "global_step": trainer.state.global_step, "train_loss": result.training_loss, "resumed_from": last,
        "config": config.to_dict(),
    }  # fmt: skip
    save(trainer, lm, out, config, summary)
    return summary


def save(trainer, lm, out: str, config: SFTConfig, summary: dict) -> None:
    """Model (LoRA: merged, adapter in out/adapter), tokenizer and the training config, on the main process."""
    if not config.lora:
        trainer.save_model(out)  # every process takes part (FSDP / DeepSpeed gather the weights)
    if not trainer.is_world_process_zero():
        return
    if config.lora:
        trainer.model.save_pretrained(os.path.join(out, "adapter"))
        trainer.model.merge_and_unload().save_pretrained(out)
    lm.tokenizer.save_pretrained(out)
    with open(os.path.join(out, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)

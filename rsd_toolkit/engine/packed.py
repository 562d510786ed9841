"""Linear layers over a few rows at the cost of one pass over their weights, on CPU.

A decode step at small batch is memory-bound: its physical cost is one read of every weight, whatever the
number of positions. On CPU, ``F.linear`` over one row takes MKL's matrix-vector path, which reads the weight
near memory bandwidth; over 2-16 rows it falls onto MKL's GEMM, which repacks the weight on every call: on
2 cores (benchmarks/bench_forward_cost.py) a [8960, 1536] fp32 weight took 1.9 ms for 1 row, 4.1 ms for 5,
5.9 ms for 9. oneDNN's GEMM over a weight packed once ahead of time (the layout inductor's CPU freezing
uses) took 2.2 ms for 5 rows and 2.7 ms for 9. So a speculative verify over K+1 positions, and every step at
batch 2-16, costs close to one weight pass again.

``PackedLinears(model)`` packs the model's linear weights once (a copy: CPU weight memory doubles). Used as a
context manager around a forward, it runs those linear layers on oneDNN, one-row steps included (faster on the
real models than MKL's matrix-vector path, see ``MIN_ROWS``). Nothing global is patched: inside the ``with`` block (and only there)
each of the model's ``nn.Linear`` modules gets an instance-level ``forward``; leaving the block restores
what was there (a ``TorchFunctionMode`` would do the same without touching the modules, but it intercepts
every torch call of the forward: +25 ms on SmolLM2's 45 ms step). A weight changed in place after packing
(its version counter moves) runs plain until ``repack``. Results are fp32 to rounding (another summation
order: ~1e-6 of the largest logit on the real models, tested).
"""

from __future__ import annotations

import functools

import torch

# From one row on: on the real 1.5B model a one-position step took 321 ms packed against 424 ms through MKL's
# matrix-vector path (one weight pass: 238 ms), though on one cache-cold [8960, 1536] weight MKL was ahead (1.9
# vs 2.1 ms): the head and the small projections gain more than the MLP loses.
MIN_ROWS = 1


def available(model) -> bool:
    """Packing helps CPU models in float32, or bfloat16 where this CPU has oneDNN's bf16 path (AVX-512 or
    AVX-NE-CONVERT: on an AVX2-only CPU the bf16 reorder raises), where torch was built with oneDNN."""
    weight = model.get_input_embeddings().weight
    return (weight.device.type == "cpu" and torch.backends.mkldnn.is_available()
            and (weight.dtype == torch.float32 or weight.dtype == torch.bfloat16 and onednn_bf16()))  # fmt: skip


def onednn_bf16() -> bool:
    """Whether oneDNN has a bf16 path on this CPU (not ``sft.bf16_supported``, which asks about CUDA)."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def default(model) -> bool:
    """On by default where ``available`` and the packed copy leaves half of the free memory free."""
    if not available(model):
        return False
    weights = sum(m.weight.numel() * m.weight.element_size() for m in _linears(model))
    return weights <= available_memory() / 2


def available_memory() -> int:
    """Bytes of memory the system can still give (``MemAvailable``); 0 where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _linears(model) -> list[torch.nn.Linear]:
    return [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.device.type == "cpu"]


class PackedLinears:
    """``with packed: model(...)`` runs the model's linear layers on prepacked oneDNN weights (from ``min_rows`` rows on)."""

    def __init__(self, model, rows_hint: int = 8, min_rows: int = MIN_ROWS):
        self.rows_hint = rows_hint
        self.min_rows = min_rows
        self.modules = _linears(model)
        self.packs: dict[int, tuple[torch.Tensor, int]] = {}  # id(weight) -> (packed weight, weight._version)
        self.repack()

    @torch.inference_mode(False)
    @torch.no_grad()
    def repack(self) -> None:
        """Pack every linear weight again (after the model's weights were changed in place)."""
        self.packs = {}
        for m in self.modules:
            if id(m.weight) not in self.packs:  # a weight shared by two modules is packed once
                self.packs[id(m.weight)] = (torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), self.rows_hint), m.weight._version)

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in {id(m.weight): m.weight for m in self.modules}.values())

    def __enter__(self) -> "PackedLinears":
        self._saved = [(m, m.__dict__.get("forward")) for m in self.modules]
        for m in self.modules:
            m.forward = functools.partial(self._linear, m, m.__dict__.get("forward") or m.forward)
        return self

    def __exit__(self, *exc) -> None:
        for m, own in self._saved:
            if own is None:
                del m.forward
            else:
                m.forward = own
        del self._saved

    def _linear(self, module: torch.nn.Linear, plain, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N]: oneDNN on the packed weight from ``min_rows`` rows on, else the module's own forward."""
        packed, version = self.packs[id(module.weight)]
        if (version == module.weight._version and x.dtype == module.weight.dtype and not torch.is_grad_enabled()
                and x.numel() >= self.min_rows * x.shape[-1]):  # fmt: skip
            out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, module.bias, "none", [], "")
            return out.reshape(*x.shape[:-1], module.weight.shape[0])
        return plain(x)

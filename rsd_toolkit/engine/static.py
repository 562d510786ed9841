"""The common decode step at fixed shapes, replayed as a CUDA graph.

Most forwards of a trace append one token to every row. Run eagerly, such a step launches a dozen small
kernels per layer and per model, and on a GPU the launches, not the maths, set the pace. Here that step
runs at fixed shapes: rows padded to a batch bucket, keys cut to a multiple of ``COLUMN_CHUNK`` columns,
its inputs (ids, positions, mask, the column it writes) read from tensors that stay in place. One CUDA
graph per (bucket, columns) then replays it. The maths is the model's own forward over the same
``SlotCache`` buffers as the eager path. Only the shapes differ: padded rows and masked columns. On CPU
or MPS the same function runs eagerly (tests compare it with the general step). Blocks wider than one
token (prefill, spans, catch-ups) always take the general, eager path.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .kv import SlotCache

log = logging.getLogger("rsd_toolkit.engine")

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
COLUMN_CHUNK = 256


@dataclass(frozen=True)
class StaticShapes:
    """How the fixed-shape step pads: rows to a bucket, columns to a chunk multiple."""

    buckets: tuple[int, ...] = BUCKETS
    chunk: int = COLUMN_CHUNK

    def rows(self, n: int) -> int:
        """The smallest bucket holding ``n`` rows (``n`` itself past the largest bucket)."""
        return next((b for b in self.buckets if b >= n), n)

    def columns(self, n: int) -> int:
        return -(-n // self.chunk) * self.chunk

    def covers(self, rows: int) -> bool:
        return rows <= self.buckets[-1]


def cuda_graph(run: Callable[[], torch.Tensor], pool, stream) -> Callable[[], torch.Tensor]:
    """Capture ``run`` (which reads and writes only tensors that stay in place) as a CUDA graph on
    ``stream``; returns its replay, giving the same output tensor each time. Warm-up runs once on the same
    side stream, as capture needs; the outer stream context restores the caller's stream even when
    capture fails. The output is poisoned with NaN after capture, so a graph that computes nothing fails
    the caller's check instead of replaying stale logits."""
    stream.wait_stream(torch.cuda.current_stream(stream.device))
    with torch.cuda.stream(stream):
        run()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            out = run()
    torch.cuda.current_stream(stream.device).wait_stream(stream)
    out.fill_(float("nan"))

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


def graphs_possible(model) -> bool:
    """CUDA graphs need the whole model on one CUDA device, and a forward that never asks the host for a
    value (dynamic RoPE scaling checks the longest position on the host)."""
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        return False
    rope = getattr(model.config, "rope_parameters", None) or getattr(model.config, "rope_scaling", None) or {}
    kind = str(rope.get("rope_type", rope.get("type", ""))) if isinstance(rope, dict) else ""
    return "dynamic" not in kind


class StaticStep:
    """One model's fixed-shape step: ``step(cache, ids, positions, valid) -> logits [R, V]``.

    ``graphs``: capture and replay CUDA graphs (only where ``graphs_possible``). A graph is kept per (bucket, columns) while
    the cache's buffers stay where they were (``SlotCache.buffers``). Each new graph is checked once
    against an eager run of the same step. The step writes the same column with the same values, so
    running it twice is harmless. If capture fails or the check disagrees, graphs are switched off for
    this model with one warning, and the step stays eager. ``counts``: replayed, captured, eager, failed.
    """

    def __init__(self, model, shapes: StaticShapes, graphs: bool):
        self.model = model
        self.shapes = shapes
        self.graphs = graphs and graphs_possible(model)
        self.device = model.get_input_embeddings().weight.device
        self.dtype = model.get_input_embeddings().weight.dtype
        self.inputs: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # (rows, columns) -> fixed input tensors
        self.replays: dict[tuple[int, int], Callable[[], torch.Tensor]] = {}
        self.buffers: tuple[int, ...] = ()  # the cache buffers the graphs were captured on
        self.pool = None
        self.stream = None  # this model's own capture stream (graphs of two models never share one)
        self.counts: Counter = Counter()
        self._cache_kw = _cache_keyword(model)

    @classmethod
    def for_model(cls, model) -> "StaticStep":
        """Default shapes; CUDA graphs wherever ``graphs_possible`` (elsewhere the same step, eager)."""
        return cls(model, StaticShapes(), graphs=True)

    def step(self, cache: SlotCache, ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Append ``ids`` [R] at ``positions`` [R] to every row; ``valid`` [R, past] marks live columns.
        Returns the logits [R, V] predicting each row's next token (a tensor of its own)."""
        R, past = valid.shape
        rows, columns = self.shapes.rows(R), self.shapes.columns(past + 1)
        cache.reserve(rows, columns)
        key = (rows, columns)
        x = self.inputs.get(key)
        if x is None:
            x = self.inputs[key] = {
                "ids": torch.zeros(rows, 1, dtype=torch.long, device=self.device),
                "positions": torch.zeros(rows, 1, dtype=torch.long, device=self.device),
                "mask": torch.zeros(rows, 1, 1, columns, dtype=self.dtype, device=self.device),
                "at": torch.zeros(1, dtype=torch.long, device=self.device),
            }
        # padded rows read token 0 at position 0 and attend to their own column only
        x["ids"].zero_()
        x["ids"][:R, 0] = ids
        x["positions"].zero_()
        x["positions"][:R, 0] = positions
        allowed = torch.zeros(rows, columns, dtype=torch.bool, device=self.device)
        allowed[:R, :past] = valid
        allowed[:, past] = True
        x["mask"].fill_(torch.finfo(self.dtype).min)
        x["mask"].masked_fill_(allowed[:, None, None, :], 0.0)
        x["at"].fill_(past)

        cache.begin_static(rows, columns, x["at"])
        try:
            logits = self._run(cache, key, x)
        except BaseException:
            cache.end_static(R, wrote=False)
            raise
        cache.end_static(R)
        return logits[:R].clone()  # a graph's output tensor is overwritten by its next replay

    def _run(self, cache: SlotCache, key, x) -> torch.Tensor:
        def forward() -> torch.Tensor:
            out = self.model(
                input_ids=x["ids"], attention_mask=x["mask"], position_ids=x["positions"],
                use_cache=True, logits_to_keep=1, **{self._cache_kw: cache},
            )  # fmt: skip
            return out.logits[:, -1]

        if not self.graphs:
            self.counts["eager"] += 1
            return forward()
        if cache.buffers != self.buffers:  # buffers moved: graphs captured on the old ones are void
            self._drop_graphs()
            self.buffers = cache.buffers
        replay = self.replays.get(key)
        if replay is not None:
            self.counts["replayed"] += 1
            return replay()
        expected = forward()  # the reference, and the first warm-up
        try:
            with torch.cuda.device(self.device):
                if self.pool is None:
                    self.pool = torch.cuda.graph_pool_handle()
                    self.stream = torch.cuda.Stream(self.device)
                replay = cuda_graph(forward, self.pool, self.stream)
                got = replay()
            if not torch.allclose(got.float(), expected.float(), rtol=1e-2, atol=1e-2):  # NaN: nothing captured
                raise RuntimeError(f"replayed logits differ from eager by {(got.float() - expected.float()).abs().max():.3g}")
        except torch.cuda.OutOfMemoryError:
            raise  # the engine halves the batch
        except Exception as e:  # noqa: BLE001 - any capture problem means: stay eager, correctly
            cause = f"{e}; {e.__context__}" if e.__context__ else str(e)
            log.warning("CUDA graphs off for %s (%s): the decode step runs eagerly", type(self.model).__name__, cause)
            self.graphs = False
            self._drop_graphs()
            self.counts["failed"] += 1
            return forward()  # again, eagerly: a bad replay may have written this column
        self.replays[key] = replay
        self.counts["captured"] += 1
        return got

    def _drop_graphs(self) -> None:
        """Forget every graph and their pool (a pool is reused only while a graph of it lives)."""
        self.replays.clear()
        self.pool = None


def _cache_keyword(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` during v5."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

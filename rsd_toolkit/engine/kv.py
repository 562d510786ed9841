"""A preallocated key/value store: appends write into the next columns in place, no per-step copy.

transformers' ``DynamicCache`` grows by ``torch.cat`` of the whole cache on every forward, so a step costs
O(context) in copying and a trace of n tokens O(n²). ``SlotCache`` keeps per-layer buffers
``[batch, kv_heads, capacity, head_dim]`` that double when full (amortised O(1) per token); the model sees
a view of the columns in use. Row and column edits (drop finished rows, compact holes, join new rows) are
explicit operations here, called by ``BatchedContext``, which owns the slot/hole bookkeeping. Edits write
back into the same buffers whenever they fit, so a buffer's address changes only when it grows: a captured
CUDA graph (``engine/static.py``) stays valid across steps, rollbacks, compaction and finished rows.

With ``shapes`` (a ``StaticShapes``) buffers are sized for the fixed-shape step: rows rounded up to a batch
bucket, columns to a multiple of the column chunk; a layer then serves a ``static`` write (one column, at
a position given as a tensor) and returns the whole bucket-by-chunk block.
"""

from __future__ import annotations

import itertools

import torch
from transformers.cache_utils import Cache, DynamicLayer

MIN_CAPACITY = 64
_BUFFER_IDS = itertools.count(1)  # process-wide: two caches never share an id


class SlotLayer(DynamicLayer):
    """One attention layer's keys and values in a buffer with room to grow."""

    def __init__(self, shapes=None):
        super().__init__()
        self.k_buf: torch.Tensor | None = None  # [rows >= B, H, capacity, D]
        self.v_buf: torch.Tensor | None = None
        self.length = 0  # columns in use (the same in every row: blocks are padded)
        self.shapes = shapes  # StaticShapes or None: how buffers are sized
        self.static: tuple[int, int, torch.Tensor] | None = None  # (rows, columns, write column [1]) during a static step
        self.buffer_id = 0  # changes whenever the buffers are (re)allocated: a captured graph needs the same ones

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def _reserve(self, like_k: torch.Tensor, like_v: torch.Tensor, columns: int, rows: int | None = None) -> None:
        """Room for ``rows`` (default: ``like_k``'s) rows and ``columns`` columns: keep the buffers, or grow
        them (columns at least double; zeros: a masked column must still be finite). Live rows are kept."""
        B, H, _, Dk = like_k.shape
        rows = B if rows is None else rows
        have_rows, have = (0, 0) if self.k_buf is None else (self.k_buf.shape[0], self.k_buf.shape[2])
        if columns <= have and rows <= have_rows:
            return
        capacity = have if columns <= have else max(MIN_CAPACITY, columns, 2 * have)
        if self.shapes is not None:
            rows, capacity = self.shapes.rows(max(rows, have_rows)), self.shapes.columns(capacity)
        rows = max(rows, have_rows)
        k_buf = like_k.new_zeros(rows, H, capacity, Dk)
        v_buf = like_v.new_zeros(rows, H, capacity, like_v.shape[3])
        if self.length:
            k_buf[:have_rows, :, : self.length] = self.k_buf[:, :, : self.length]
            v_buf[:have_rows, :, : self.length] = self.v_buf[:, :, : self.length]
        self.k_buf, self.v_buf = k_buf, v_buf
        self.buffer_id = next(_BUFFER_IDS)

    def _view(self, rows: int) -> None:
        self.keys = self.k_buf[:rows, :, : self.length]
        self.values = self.v_buf[:rows, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # key_states, value_states: [B, H, n, D] for the n new columns
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.static is not None:  # fixed shapes: write column ``at``, return the whole [rows, H, columns, D] block
            rows, columns, at = self.static
            self.k_buf[:rows].index_copy_(2, at, key_states)
            self.v_buf[:rows].index_copy_(2, at, value_states)
            return self.k_buf[:rows, :, :columns], self.v_buf[:rows, :, :columns]
        B, _, n, _ = key_states.shape
        self._reserve(key_states, value_states, self.length + n)
        self.k_buf[:B, :, self.length : self.length + n] = key_states
        self.v_buf[:B, :, self.length : self.length + n] = value_states
        self.length += n
        self._view(B)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def set(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the contents by ``keys``/``values`` [B', H, L, D], fresh tensors that do not alias the
        buffer (row and column edits end here). Written into the same buffers when they fit."""
        B, _, L, _ = keys.shape
        fits = self.k_buf is not None and self.k_buf.shape[0] >= B and self.k_buf.shape[2] > L
        if not fits:
            self.length = 0  # nothing to carry over: ``keys`` is the new content
            self._reserve(keys, values, L + max(MIN_CAPACITY, L // 4), B)  # room for the next steps
        self.k_buf[:B, :, :L] = keys
        self.v_buf[:B, :, :L] = values
        self.length = L
        self.is_initialized = True
        self.device = keys.device
        self._view(B)


class SlotCache(Cache):
    """The cache ``BatchedContext`` hands the model: one ``SlotLayer`` per decoder layer."""

    def __init__(self, num_layers: int, shapes=None):
        super().__init__(layers=[SlotLayer(shapes) for _ in range(num_layers)])
        self.shapes = shapes

    @classmethod
    def for_model(cls, config, shapes=None) -> "SlotCache":
        from transformers.cache_utils import get_layer_types_and_kwargs

        from ..models import UnsupportedModel

        text = config.get_text_config(decoder=True)
        layer_types, _ = get_layer_types_and_kwargs(text)
        other = sorted({t for t in layer_types if t != "full_attention"})
        if other:
            raise UnsupportedModel(
                f"{type(config).__name__} has {', '.join(other)} layers; the engine needs plain full-attention layers to "
                "roll rows back (sliding-window and recurrent layers are not supported)"
            )
        return cls(len(layer_types), shapes)

    @property
    def filled(self) -> list[SlotLayer]:
        return [layer for layer in self.layers if layer.k_buf is not None]

    @property
    def buffers(self) -> tuple[int, ...]:
        """Identifies the buffers: unchanged means every buffer is where it was."""
        return tuple(layer.buffer_id for layer in self.layers)

    # -- the fixed-shape step (engine/static.py) ----------------------------------------------------
    def reserve(self, rows: int, columns: int) -> None:
        """Buffers of at least ``rows`` rows and ``columns`` columns in every layer."""
        for layer in self.filled:
            layer._reserve(layer.keys, layer.values, columns, rows)
            layer._view(layer.keys.shape[0])

    def begin_static(self, rows: int, columns: int, at: torch.Tensor) -> None:
        """Until ``end_static``, each layer writes its new column at ``at`` [1] and attends over
        ``[rows, columns]`` of its buffer (shapes that do not change between replays of a graph)."""
        for layer in self.layers:
            layer.static = (rows, columns, at)

    def end_static(self, live_rows: int, wrote: bool = True) -> None:
        """The static step wrote one column: it is now in use (``wrote=False``: the step failed, nothing is)."""
        for layer in self.filled:
            layer.static = None
            layer.length += int(wrote)
            layer._view(live_rows)

    # -- row and column edits (every layer alike) --------------------------------------------------
    def select_rows(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` [R] in that order."""
        for layer in self.filled:
            i = index.to(layer.k_buf.device)
            layer.set(layer.keys.index_select(0, i), layer.values.index_select(0, i))

    def gather_columns(self, index: torch.Tensor) -> None:
        """Row b keeps columns ``index[b]`` [B, L] (compaction: live slots to the right end)."""
        for layer in self.filled:
            i = index.to(layer.k_buf.device)[:, None, :, None]
            keys = layer.keys.gather(2, i.expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3]))
            values = layer.values.gather(2, i.expand(-1, layer.values.shape[1], -1, layer.values.shape[3]))
            layer.set(keys, values)

    def rows(self, index: torch.Tensor) -> "SlotCache":
        """A new cache holding copies of rows ``index`` (for a sub-batch forward)."""
        sub = SlotCache(len(self.layers))  # plain buffers: sub-batches always run eager
        for mine, theirs in zip(self.layers, sub.layers):
            if mine.k_buf is not None:
                i = index.to(mine.k_buf.device)
                theirs.set(mine.keys.index_select(0, i), mine.values.index_select(0, i))
        return sub

    def put_rows(self, index: torch.Tensor, sub: "SlotCache", n: int) -> None:
        """Take a sub-batch's ``n`` new columns back into rows ``index``; every other row gets ``n`` holes."""
        for mine, theirs in zip(self.filled, sub.filled):
            start, B = mine.length, mine.keys.shape[0]
            mine._reserve(mine.keys, mine.values, start + n)
            mine.k_buf[:B, :, start : start + n] = 0
            mine.v_buf[:B, :, start : start + n] = 0
            i = index.to(mine.k_buf.device)
            mine.k_buf[i, :, start : start + n] = theirs.keys[:, :, -n:]
            mine.v_buf[i, :, start : start + n] = theirs.values[:, :, -n:]
            mine.length = start + n
            mine._view(B)

    def concat_rows(self, other: "SlotCache", width: int) -> None:
        """Append ``other``'s rows after ours, both left-padded with holes to ``width`` columns."""
        for mine, theirs in zip(self.filled, other.filled):
            keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)], dim=0)
            values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)], dim=0)
            mine.set(keys, values)


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """[B, H, L, D] -> [B, H, width, D] with zero (hole) columns on the left."""
    if t.shape[2] == width:
        return t
    return torch.cat([t.new_zeros(t.shape[0], t.shape[1], width - t.shape[2], t.shape[3]), t], dim=2)

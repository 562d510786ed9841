"""A preallocated key/value store: appends write into the next columns in place, no per-step copy.

transformers' ``DynamicCache`` grows by ``torch.cat`` of the whole cache on every forward, so a step costs
O(context) in copying and a trace of n tokens O(n²). ``SlotCache`` keeps per-layer buffers
``[batch, kv_heads, capacity, head_dim]`` that double when full (amortised O(1) per token); the model sees
a view of the columns in use. Row and column edits (drop finished rows, compact holes, join new rows) are
explicit operations here, called by ``BatchedContext``, which owns the slot/hole bookkeeping.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

MIN_CAPACITY = 64


class SlotLayer(DynamicLayer):
    """One attention layer's keys and values in a buffer with room to grow."""

    def __init__(self):
        super().__init__()
        self.k_buf: torch.Tensor | None = None  # [B, H, capacity, D]
        self.v_buf: torch.Tensor | None = None
        self.length = 0  # columns in use (the same in every row: blocks are padded)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def _reserve(self, like_k: torch.Tensor, like_v: torch.Tensor, columns: int) -> None:
        """Room for ``columns`` columns: allocate, or double (zeros: a masked column must still be finite)."""
        have = 0 if self.k_buf is None else self.k_buf.shape[2]
        if columns <= have:
            return
        capacity = max(MIN_CAPACITY, columns, 2 * have)
        B, H, _, Dk = like_k.shape
        k_buf = like_k.new_zeros(B, H, capacity, Dk)
        v_buf = like_v.new_zeros(B, H, capacity, like_v.shape[3])
        if self.length:
            k_buf[:, :, : self.length] = self.k_buf[:, :, : self.length]
            v_buf[:, :, : self.length] = self.v_buf[:, :, : self.length]
        self.k_buf, self.v_buf = k_buf, v_buf

    def _view(self) -> None:
        self.keys = self.k_buf[:, :, : self.length]
        self.values = self.v_buf[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # key_states, value_states: [B, H, n, D] for the n new columns
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[2]
        self._reserve(key_states, value_states, self.length + n)
        self.k_buf[:, :, self.length : self.length + n] = key_states
        self.v_buf[:, :, self.length : self.length + n] = value_states
        self.length += n
        self._view()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def set(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the contents by ``keys``/``values`` [B', H, L, D] (row and column edits end here)."""
        self.k_buf = self.v_buf = None
        self.length = 0
        self._reserve(keys, values, keys.shape[2] + max(MIN_CAPACITY, keys.shape[2] // 4))  # room for the next steps
        self.k_buf[:, :, : keys.shape[2]] = keys
        self.v_buf[:, :, : keys.shape[2]] = values
        self.length = keys.shape[2]
        self.is_initialized = True
        self.device = keys.device
        self._view()


class SlotCache(Cache):
    """The cache ``BatchedContext`` hands the model: one ``SlotLayer`` per decoder layer."""

    def __init__(self, num_layers: int):
        super().__init__(layers=[SlotLayer() for _ in range(num_layers)])

    @classmethod
    def for_model(cls, config) -> "SlotCache":
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
        return cls(len(layer_types))

    @property
    def filled(self) -> list[SlotLayer]:
        return [layer for layer in self.layers if layer.k_buf is not None]

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
        sub = SlotCache(len(self.layers))
        for mine, theirs in zip(self.layers, sub.layers):
            if mine.k_buf is not None:
                i = index.to(mine.k_buf.device)
                theirs.set(mine.keys.index_select(0, i), mine.values.index_select(0, i))
        return sub

    def put_rows(self, index: torch.Tensor, sub: "SlotCache", n: int) -> None:
        """Take a sub-batch's ``n`` new columns back into rows ``index``; every other row gets ``n`` holes."""
        for mine, theirs in zip(self.filled, sub.filled):
            start = mine.length
            mine._reserve(mine.keys, mine.values, start + n)
            mine.k_buf[:, :, start : start + n] = 0
            mine.v_buf[:, :, start : start + n] = 0
            i = index.to(mine.k_buf.device)
            mine.k_buf[i, :, start : start + n] = theirs.keys[:, :, -n:]
            mine.v_buf[i, :, start : start + n] = theirs.values[:, :, -n:]
            mine.length = start + n
            mine._view()

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

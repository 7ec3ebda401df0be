"""The KV cache of an ORT-native decoder (export/ort_native.py) as one preallocated buffer per layer and K/V.

Each buffer is an OrtValue [rows, kv_heads, capacity, head_dim] bound (IOBinding) as both past_key_values.{i}.* and
present.{i}.*: GroupQueryAttention then writes each new token in place at its row's length, and no step copies the
cache. Rows are right-padded: row r holds lengths[r] tokens at positions 0..lengths[r]-1 (a prefix pack first).
A row is prefilled alone (GroupQueryAttention takes several new tokens only for batch 1) on a view of its own slice
of the buffers, so the prompt is written in place too; decode steps run every row at once.
"""

from __future__ import annotations

import numpy as np

from ..errors import VlexportError


class SharedKvBuffer:
    def __init__(self, session, num_layers: int, num_kv_heads: int, head_dim: int, rows: int, capacity: int):
        import onnxruntime as ort

        self.session, self.num_layers, self.rows, self.capacity = session, num_layers, rows, capacity
        self.names = [f"{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
        # The numpy arrays own the memory; the OrtValues are views of it (kept alive by self.arrays).
        self.arrays = [np.zeros((rows, num_kv_heads, capacity, head_dim), np.float32) for _ in self.names]
        self.values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.arrays]
        self.row_values = [[ort.OrtValue.ortvalue_from_numpy(a[r : r + 1]) for a in self.arrays] for r in range(rows)]
        self.lengths = np.zeros(rows, np.int64)
        self.vocab = int(next(o for o in session.get_outputs() if o.name == "logits").shape[-1])
        self._step = self._bind_cache(self.values)
        self._rows = [None] * rows

    def _bind_cache(self, values):
        io = self.session.io_binding()
        for name, v in zip(self.names, values):
            io.bind_ortvalue_input(f"past_key_values.{name}", v)
            io.bind_ortvalue_output(f"present.{name}", v)
        return io

    def _check_room(self, row_lengths: np.ndarray, new: int) -> None:
        if (row_lengths + new > self.capacity).any():
            raise VlexportError(f"the KV buffer holds {self.capacity} tokens per row and a row would need "
                                f"{int(row_lengths.max()) + new}; open it with a larger capacity")

    def clear(self, row: int) -> None:
        """Forget a row's tokens (its slot is reused by the next prefill)."""
        self.lengths[row] = 0

    def fill_prefix(self, row: int, pack: dict[str, np.ndarray]) -> None:
        """Write a prefix pack (past_key_values.{i}.key|value [kv, P, hd]) at positions 0..P-1 of the row."""
        p = None
        for name, array in zip(self.names, self.arrays):
            kv = np.asarray(pack[f"past_key_values.{name}"], np.float32)
            kv = kv.reshape(kv.shape[-3:])
            p = kv.shape[1]
            self._check_room(np.zeros(1, np.int64), p)
            array[row, :, :p] = kv
        self.lengths[row] = p or 0

    def prefill(self, row: int, inputs_embeds: np.ndarray, position_ids: np.ndarray, extra_feed: dict) -> np.ndarray:
        """Run the row's S new tokens after what it holds (its prefix); they are written into the row in place.
        Returns logits [1, 1, V] of the last token."""
        s = inputs_embeds.shape[1]
        self._check_room(self.lengths[row : row + 1], s)
        if self._rows[row] is None:
            self._rows[row] = self._bind_cache(self.row_values[row])
        io = self._rows[row]
        mask = np.ones((1, int(self.lengths[row]) + s), np.int64)
        self._bind_inputs(io, inputs_embeds, mask, position_ids, extra_feed)
        logits = self._bind_logits(io, 1)
        self.session.run_with_iobinding(io)
        self.lengths[row] += s
        return logits

    def step(self, inputs_embeds: np.ndarray, position_ids: np.ndarray, extra_feed: dict,
             active: np.ndarray | None = None) -> np.ndarray:
        """One decode step for every row (S=1), in place. Inactive rows compute a throwaway token just past their
        length, which the next real token overwrites. Returns logits [rows, 1, V]."""
        active = np.ones(self.rows, bool) if active is None else np.asarray(active, bool)
        self._check_room(self.lengths[active], 1)
        # An inactive row that is full writes its throwaway token over its last one, which is saved and put back.
        full = np.flatnonzero(~active & (self.lengths >= self.capacity))
        saved = [a[full, :, -1].copy() for a in self.arrays] if full.size else None
        write_at = np.minimum(self.lengths, self.capacity - 1)
        mask = (np.arange(int(write_at.max()) + 1)[None, :] <= write_at[:, None]).astype(np.int64)
        io = self._step
        self._bind_inputs(io, inputs_embeds, mask, position_ids, extra_feed)
        logits = self._bind_logits(io, self.rows)
        self.session.run_with_iobinding(io)
        if saved is not None:
            for a, keep in zip(self.arrays, saved):
                a[full, :, -1] = keep
        self.lengths[active] += 1
        return logits

    def _bind_logits(self, io, rows: int) -> np.ndarray:
        """A fresh array the run writes the logits into (returned to the caller, so never reused)."""
        logits = np.empty((rows, 1, self.vocab), np.float32)
        io.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        return logits

    def _bind_inputs(self, io, inputs_embeds, mask, position_ids, extra_feed: dict) -> None:
        import onnxruntime as ort

        feed = {"inputs_embeds": np.ascontiguousarray(inputs_embeds, np.float32), "attention_mask": mask,
                "position_ids": np.ascontiguousarray(position_ids, np.int64),
                **{name: np.ascontiguousarray(value) for name, value in (extra_feed or {}).items()}}
        # OrtValues over the arrays (no copy). bind_cpu_input would refuse the slot inputs: they have default values
        # (initializers), which its type lookup does not see. The arrays stay referenced until the next bind.
        self._bound = feed
        for name, array in feed.items():
            io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))

    def row_cache(self, row: int) -> dict[str, np.ndarray]:
        """The row's valid keys/values, past_key_values.{i}.key|value [kv, len, hd] (copies, for checks)."""
        n = int(self.lengths[row])
        return {f"past_key_values.{name}": a[row, :, :n].copy() for name, a in zip(self.names, self.arrays)}

"""The past keys and values of rows decoding together, each row with a past of its own length.

Rows join and leave at step boundaries, so their pasts differ in length: row ``r`` of every
buffer holds its own past from step 0, and what lies beyond its length is padding, masked out
of the attention (each row attends to its own :meth:`RowCache.attended_lengths`, or on a GPU
through :meth:`RowCache.masks`). Active rows are kept packed at the front
(``[:rows]``), so a step reads plain views, never a gathered copy: a row that leaves is
replaced by the last row. Buffers grow with the rows, doubling up to ``capacity`` (the
configured bound on rows decoding together), and in time by ``time_room`` steps at once, so a
step writes in place and the whole cache is copied only once every ``time_room`` steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

#: Steps of room added to the self-attention buffers when a row reaches their end (5 s).
TIME_ROOM = 256


@dataclass
class RowPast:
    """What one row brings when it joins: per layer, its past ``[heads, time, dim]`` keys and
    values, and the keys and values of the conditioning it cross-attends to (none for models
    that prepend their conditioning instead)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    cross_keys: list[torch.Tensor]
    cross_values: list[torch.Tensor]

    @property
    def length(self) -> int:
        return self.keys[0].shape[1]

    @property
    def cross_length(self) -> int:
        return self.cross_keys[0].shape[1] if self.cross_keys else 0


class RowCache:
    """Keys and values for up to ``capacity`` rows, ``[rows, heads, time, dim]`` per layer,
    kept in ``dtype`` (None: in the dtype they come in)."""

    def __init__(
        self, capacity: int, time_room: int = TIME_ROOM, dtype: torch.dtype | None = None
    ) -> None:
        self.capacity = capacity
        self.time_room = time_room
        self.dtype = dtype
        self.rows = 0
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._cross_keys: list[torch.Tensor] = []
        self._cross_values: list[torch.Tensor] = []
        #: Per row: past steps (also its position), conditioning length. Kept on the host
        #: too, so a step's longest past is known without waiting for the device.
        self._lengths: list[int] = []
        self._cross_lengths: list[int] = []
        self._device_lengths: torch.Tensor | None = None

    @property
    def free(self) -> int:
        return self.capacity - self.rows

    def add(self, pasts: Sequence[RowPast]) -> None:
        """Append rows at the end (``[rows, rows + len(pasts))``)."""
        if len(pasts) > self.free:
            raise ValueError(f"{len(pasts)} rows do not fit: {self.free} free.")
        if not self._keys:
            self._allocate(pasts[0], len(pasts))
        elif self.rows + len(pasts) > self._keys[0].shape[0]:
            self._grow_rows(self.rows + len(pasts))
        longest = max(past.length for past in pasts)
        if longest + 1 > self._keys[0].shape[2]:
            self._grow_time(longest + 1)
        widest = max(past.cross_length for past in pasts)
        if self._cross_keys and widest > self._cross_keys[0].shape[2]:
            self._grow_cross(widest)
        for past in pasts:
            row = self.rows
            for buffers, tensors in (
                (self._keys, past.keys),
                (self._values, past.values),
                (self._cross_keys, past.cross_keys),
                (self._cross_values, past.cross_values),
            ):
                for buffer, tensor in zip(buffers, tensors, strict=True):
                    buffer[row, :, : tensor.shape[1]] = tensor
            self._lengths.append(past.length)
            self._cross_lengths.append(past.cross_length)
            self.rows += 1
        self._device_lengths = None

    def remove(self, rows: Sequence[int]) -> None:
        """Drop ``rows``, moving the last rows into their places (highest first, so a pair
        of rows is replaced by the last pair, in order)."""
        for row in sorted(rows, reverse=True):
            last = self.rows - 1
            if row != last:
                self._move(last, row)
            self._lengths.pop()
            self._cross_lengths.pop()
            self.rows -= 1
        self._device_lengths = None
        if self.rows == 0:
            self.clear()

    def clear(self) -> None:
        """Drop every row and free the buffers."""
        self.rows = 0
        self._keys, self._values, self._cross_keys, self._cross_values = [], [], [], []
        self._lengths, self._cross_lengths = [], []
        self._device_lengths = None

    @property
    def lengths(self) -> torch.Tensor:
        """Each active row's past length (its next position), on the device."""
        if self._device_lengths is None:
            self._device_lengths = torch.tensor(
                self._lengths, dtype=torch.long, device=self._keys[0].device
            )
        return self._device_lengths

    def prepare_step(self) -> None:
        """Make room for one more step of every row."""
        if max(self._lengths) + 1 > self._keys[0].shape[2]:
            self._grow_time(max(self._lengths) + 1)

    def padded_time(self) -> int:
        """How many steps of keys a GPU's step attends to, every row at once (masked): the
        longest past and the step being written, rounded up to whole ``time_room`` steps. It
        changes once every ``time_room`` steps, so that a GPU sees the same shapes step after
        step (its kernels chosen once) and attends over at most ``time_room - 1`` steps of
        padding (not the whole buffer, which a long request that left may have grown)."""
        time = max(self._lengths) + 1
        return min(-(-time // self.time_room) * self.time_room, self._keys[0].shape[2])

    def masks(self, time: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This step's attention masks, True where a row may attend: over its past and the
        step being written (``[rows, 1, 1, time]``), and over its own conditioning (None
        without cross-attention)."""
        device = self._keys[0].device
        past = torch.arange(time, device=device) <= self.lengths[:, None]
        if not self._cross_keys:
            return past[:, None, None], None
        cross_lengths = torch.tensor(self._cross_lengths, device=device)
        cross_time = max(self._cross_lengths)
        cross = torch.arange(cross_time, device=device) < cross_lengths[:, None]
        return past[:, None, None], cross[:, None, None]

    def attended_lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """How many steps of keys each row attends to in this step, on the host: of its past
        and the step being written, and of its conditioning."""
        return (
            np.array(self._lengths, dtype=np.int64) + 1,
            np.array(self._cross_lengths, dtype=np.int64),
        )

    def write(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's ``[rows, heads, 1, dim]`` keys and values of ``layer`` at each
        row's own position; returns the layer's key and value buffers of the active rows
        (``[rows, heads, time, dim]``: each row's past, the step, then padding)."""
        rows = torch.arange(self.rows, device=keys.device)
        buffer = self._keys[layer]
        buffer[rows, :, self.lengths] = keys[:, :, 0].to(buffer.dtype)
        self._values[layer][rows, :, self.lengths] = values[:, :, 0].to(buffer.dtype)
        return self._keys[layer][: self.rows], self._values[layer][: self.rows]

    def cross(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value buffers of ``layer``'s cross-attention of the active rows (each
        row's conditioning, then padding)."""
        return self._cross_keys[layer][: self.rows], self._cross_values[layer][: self.rows]

    def advance(self) -> None:
        """Count the step just written in every row's past."""
        self._lengths = [length + 1 for length in self._lengths]
        self._device_lengths = None

    def _allocate(self, first: RowPast, rows: int) -> None:
        heads, _, dim = first.keys[0].shape
        layers = len(first.keys)
        like = first.keys[0]
        dtype = self.dtype or like.dtype
        shape = (rows, heads, self.time_room, dim)
        cross = (rows, heads, first.cross_length, dim)
        crosses = len(first.cross_keys)
        buffers = (
            [like.new_zeros(shape, dtype=dtype) for _ in range(layers)],
            [like.new_zeros(shape, dtype=dtype) for _ in range(layers)],
            [like.new_zeros(cross, dtype=dtype) for _ in range(crosses)],
            [like.new_zeros(cross, dtype=dtype) for _ in range(crosses)],
        )
        self._keys, self._values, self._cross_keys, self._cross_values = buffers

    # Buffers are replaced together, once all are made: out of memory half way, the cache is
    # as it was.

    def _grow_rows(self, needed: int) -> None:
        rows = min(self.capacity, max(needed, 2 * self._keys[0].shape[0]))
        self._keys, self._values, self._cross_keys, self._cross_values = (
            [_resized(buffer, rows=rows) for buffer in buffers]
            for buffers in (self._keys, self._values, self._cross_keys, self._cross_values)
        )

    def _grow_time(self, needed: int) -> None:
        time = needed + self.time_room
        keys = [_resized(buffer, time=time) for buffer in self._keys]
        values = [_resized(buffer, time=time) for buffer in self._values]
        self._keys, self._values = keys, values

    def _grow_cross(self, needed: int) -> None:
        keys = [_resized(buffer, time=needed) for buffer in self._cross_keys]
        values = [_resized(buffer, time=needed) for buffer in self._cross_values]
        self._cross_keys, self._cross_values = keys, values

    def _move(self, source: int, target: int) -> None:
        length, cross_length = self._lengths[source], self._cross_lengths[source]
        for buffers, time in (
            (self._keys, length),
            (self._values, length),
            (self._cross_keys, cross_length),
            (self._cross_values, cross_length),
        ):
            for buffer in buffers:
                buffer[target, :, :time] = buffer[source, :, :time]
        self._lengths[target] = length
        self._cross_lengths[target] = cross_length


def _resized(
    buffer: torch.Tensor, *, rows: int | None = None, time: int | None = None
) -> torch.Tensor:
    """``buffer`` copied into one of ``rows`` rows and ``time`` steps (as many as it has where
    not given), zeros beyond."""
    old_rows, heads, old_time, dim = buffer.shape
    grown = buffer.new_zeros(rows or old_rows, heads, time or old_time, dim)
    grown[:old_rows, :, :old_time] = buffer
    return grown

"""The shared step's weights in oneDNN's own layout, on a CPU.

PyTorch's CPU ``F.linear`` hands a bfloat16 weight to oneDNN in PyTorch's plain layout at every
call, which oneDNN reads slower than the blocked layout its kernels are written for, and a
float32 one to MKL, slow at a few rows. Reordered once into oneDNN's layout
(``mkldnn._reorder_linear_weight``, then ``mkldnn._linear_pointwise``: what ``torch.compile``
does for a CPU model it freezes), the weights of a MusicGen-small-sized step take, in bfloat16,
51 ms instead of 80 with 2 rows, 74 instead of 119 with 16 and 125 instead of 175 with 32
(2026-11-26), and in float32 72 ms instead of 184 with 2 rows, 149 instead of 300 with 16
(2026-11-27; one thread, an AMD EPYC with AVX512-BF16 without AMX).

A packed product gives other bits than ``F.linear`` (it sums in another order), the same for
every row whatever the number of rows: a request's tokens must not depend on what shares its
steps. That is checked once per weight dtype and shape, for every row count the loop can
hold; a shape where it does not hold keeps ``F.linear``. The packed copies double the memory of
the weights they copy, so a loop keeps them only while it has rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import partial

import torch

from generation.engine.precision import cpu_has_amx_tiles, onednn_computes_bf16

#: A weight's identity while it is alive: where its data starts, and its shape (a row slice
#: of a weight, such as a cross-attention's query projection, starts where the weight does).
_Key = tuple[int, tuple[int, ...]]

_active: ContextVar[PackedWeights | None] = ContextVar("packed_weights", default=None)

#: The fewest rows a weight is packed for. oneDNN lays a weight out for the number of rows it
#: is told to expect; told 1 to 4, it picks a layout that a step's float32 weights took 90 to
#: 103 ms through at 1 and 2 rows, against 56 to 60 ms packed for 8 to 64 (the same at 16
#: and more rows; one thread, an AMD EPYC with AVX512-BF16, 2026-11-27).
PACKED_FOR_ROWS = 16

#: The fewest rows a bfloat16 product computes where oneDNN has no AMX tiles, padded with zero
#: rows below. oneDNN's AVX-512 kernels for 1 and 2 rows read a step's bfloat16 weights slower
#: than its kernels for 3 to 6 rows: 40 and 49 ms against 34 to 35 ms (one thread, an AMD EPYC
#: with AVX512-BF16, 2026-11-27). Elsewhere padding gains nothing or costs: float32 took 61 to
#: 65 ms at 1 to 4 rows there, and on an Intel Xeon with AMX a one-request step took 198 ms
#: padded against 177 in float32, 153 against 149 in bfloat16 (medians of 7 and 15 runs
#: alternated in one process, 2026-11-27). The padding rows change no bits: each row's bits
#: are checked to be the same at any number of rows.
FEWEST_BF16_ROWS_WITHOUT_AMX = 4


def fewest_rows(dtype: torch.dtype) -> int:
    """The fewest rows a packed product of ``dtype`` is computed on (see
    :data:`FEWEST_BF16_ROWS_WITHOUT_AMX`)."""
    if dtype == torch.bfloat16 and not cpu_has_amx_tiles():
        return FEWEST_BF16_ROWS_WITHOUT_AMX
    return 1


def _packing_applies(weight: torch.Tensor) -> bool:
    """Whether this PyTorch packs weights like ``weight`` for oneDNN: float32 ones on a CPU,
    and bfloat16 ones where oneDNN computes in bfloat16."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.bfloat16:
        return onednn_computes_bf16()
    return weight.dtype == torch.float32


class PackedWeights:
    """Packed copies of the weights multiplied inside :meth:`active`, made on first use, for
    products of up to ``rows`` rows."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        #: Per weight: its packed copy and the fewest rows its products compute (None: not
        #: packed).
        self._packed: dict[_Key, tuple[torch.Tensor, int] | None] = {}
        self._invariant: dict[tuple[torch.dtype, tuple[int, ...]], bool] = {}

    @contextmanager
    def active(self) -> Iterator[None]:
        """Within this block, :func:`packed_linear` multiplies by the packed copies."""
        token = _active.set(self)
        try:
            yield
        finally:
            _active.reset(token)

    def __len__(self) -> int:
        """How many packed copies are held."""
        return sum(packed is not None for packed in self._packed.values())

    def clear(self) -> None:
        """Free the packed copies (made again on next use)."""
        self._packed.clear()

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor | None:
        """``F.linear(x, weight, bias)`` with the packed copy of ``weight``; None where
        ``weight`` is not packed."""
        if x.dtype != weight.dtype:
            return None
        key = (weight.data_ptr(), tuple(weight.shape))
        if key not in self._packed:
            self._packed[key] = self._pack(weight)
        entry = self._packed[key]
        if entry is None:
            return None
        packed, fewest = entry
        return with_rows_padded(x, fewest, weight.shape[0], partial(_packed_product, packed, bias))

    def _pack(self, weight: torch.Tensor) -> tuple[torch.Tensor, int] | None:
        if not _packing_applies(weight):
            return None
        expected_rows = max(self.rows, PACKED_FOR_ROWS)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), expected_rows)
        fewest = fewest_rows(weight.dtype)
        kind = (weight.dtype, tuple(weight.shape))
        if kind not in self._invariant:
            computed_rows = max(self.rows, fewest)
            self._invariant[kind] = _same_bits_at_any_row_count(packed, *kind, computed_rows)
        return (packed, fewest) if self._invariant[kind] else None


def packed_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor | None:
    """The product with the packed copy of ``weight`` inside :meth:`PackedWeights.active`;
    None outside, or where ``weight`` is not packed."""
    packed = _active.get()
    return None if packed is None else packed.linear(x, weight, bias)


def with_rows_padded(
    x: torch.Tensor,
    fewest: int,
    out_features: int,
    product: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``product(x)`` of a linear map to ``out_features``, computed on at least ``fewest``
    rows: ``x``'s, then zero rows."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows == 0 or rows >= fewest:
        return product(x)
    flat = x.reshape(rows, -1)
    padded = torch.cat([flat, flat.new_zeros(fewest - rows, flat.shape[1])])
    return product(padded)[:rows].view(*x.shape[:-1], out_features)


def _packed_product(
    packed: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor
) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _same_bits_at_any_row_count(
    packed: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], rows: int
) -> bool:
    """Whether each row of a product by ``packed`` gets the same bits at 1 to ``rows`` rows."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, shape[1], generator=generator).to(dtype)
    full = _packed_product(packed, None, x)
    return all(
        torch.equal(_packed_product(packed, None, x[:count]), full[:count])
        for count in range(1, rows)
    )

"""Attention of one new query per row over that row's own past, on a CPU.

A decoding step attends each row's new query to its whole past, in every layer: at 8 requests
(16 rows with their CFG twins) and 600 steps of past that reads 0.9 GB of bfloat16 keys and
values a step, more than the weights. PyTorch's CPU attention reads it badly for this shape:
its flash kernel works a query block at a time (one query here), a bfloat16 past without AMX
tiles goes through a slower path than a float32 one, and a batched matmul copies a past that is
a view of a longer buffer. This kernel streams each row's keys and values once, straight from
the cache's buffers, widening bfloat16 to float32 in registers and summing in float32.

Each (row, head) is computed by itself, in a fixed order, so a row's result depends on its own
query, past and length only, never on the other rows or their lengths: a request's tokens are
the same alone and in any mixture.
"""

from __future__ import annotations

import functools
import itertools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from numba import njit, types
from numba.extending import overload

#: The past's dtypes the kernel reads, and how it sees them (bfloat16 as its 16 bits).
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)


def attend(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: np.ndarray
) -> torch.Tensor:
    """Scaled dot-product attention of ``queries`` (``[rows, heads, 1, dim]``) over the first
    ``lengths[row]`` steps of each row's ``keys`` and ``values`` (``[rows, heads, time, dim]``,
    float32 or bfloat16, views of longer buffers welcome).

    Returns:
        ``[rows, heads, 1, dim]`` in float32.
    """
    rows, heads, _, dim = queries.shape
    out = torch.empty(rows, heads, dim, dtype=torch.float32)
    arrays = (
        queries[:, :, 0].float().contiguous().numpy(),
        _as_numpy(keys),
        _as_numpy(values),
        lengths,
        out.numpy(),
    )
    scale = np.float32(dim**-0.5)
    parts = _parts(lengths, torch.get_num_threads())
    if len(parts) == 1:
        _attend(*arrays, scale)
    else:  # the kernel lets go of the GIL: the parts run at once, as PyTorch's threads would
        done = [_pool().submit(_attend, *(a[part] for a in arrays), scale) for part in parts]
        for future in done:
            future.result()
    return out[:, :, None]


def warm_up(dtype: torch.dtype) -> None:
    """Compile the kernel for a past in ``dtype`` now (about 1.5 s), with the argument types
    of a step's call, so that the first step that reads such a past does not wait for it."""
    past = torch.zeros(1, 1, 1, 1, dtype=dtype)
    attend(torch.zeros(1, 1, 1, 1), past, past, np.ones(1, dtype=np.int64))


def _parts(lengths: np.ndarray, threads: int) -> list[slice]:
    """Consecutive rows in up to ``threads`` parts of about equal work (steps of past)."""
    if threads == 1 or len(lengths) == 1:
        return [slice(None)]
    work = np.cumsum(lengths)
    cuts = np.searchsorted(work, work[-1] * np.arange(1, threads) / threads, side="right")
    bounds = np.unique(np.concatenate(([0], cuts, [len(lengths)])))
    return [slice(start, end) for start, end in itertools.pairwise(bounds.tolist())]


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(thread_name_prefix="past-attention")


def _as_numpy(past: torch.Tensor) -> np.ndarray:
    if past.dtype == torch.bfloat16:
        return past.view(torch.int16).numpy().view(np.uint16)
    if past.dtype == torch.float32:
        return past.numpy()
    raise TypeError(f"A past in {past.dtype} cannot be attended: keep it in float32 or bfloat16.")


def _widen(value):
    """``value`` as float32 (a bfloat16 is its 16 bits: the high half of a float32's); only
    compiled code calls it, through :func:`_widen_for`."""


@overload(_widen, inline="always")
def _widen_for(value):
    if value == types.uint16:
        return lambda value: np.uint32(np.uint32(value) << np.uint32(16)).view(np.float32)
    return lambda value: np.float32(value)


@njit(inline="always", fastmath=True)
def _exp(x):
    """``exp(x)`` in float32 for ``x <= 0``, within 2 ulp (Cephes' ``expf``); below -87, where
    float32 leaves the normal numbers, ``exp(-87)``: beside the row's largest weight (1) it
    counts for nothing. Written out so that the compiler vectorises the softmax's loop
    (libm's ``expf`` is a call per element: a fifth of the kernel's time)."""
    x = max(x, np.float32(-87.0))
    n = np.floor(x * np.float32(1.44269504) + np.float32(0.5))
    r = x - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    scale = np.uint32(np.uint32(np.int32(n) + np.int32(127)) << np.uint32(23)).view(np.float32)
    return p * scale


@njit(nogil=True, fastmath=True)
def _attend(queries, keys, values, lengths, out, scale):
    rows, heads, _, dim = keys.shape
    longest = 0
    for row in range(rows):
        longest = max(longest, lengths[row])
    weights = np.empty(longest, np.float32)
    query = np.empty(dim, np.float32)
    total = np.empty(dim, np.float32)
    for row in range(rows):
        length = lengths[row]
        for head in range(heads):
            for d in range(dim):
                query[d] = queries[row, head, d] * scale
            top = np.float32(-np.inf)
            for t in range(length):
                score = np.float32(0.0)
                for d in range(dim):
                    score += query[d] * _widen(keys[row, head, t, d])
                weights[t] = score
                top = max(top, score)
            norm = np.float32(0.0)
            for t in range(length):
                weight = _exp(weights[t] - top)
                weights[t] = weight
                norm += weight
            total[:] = 0.0
            for t in range(length):
                weight = weights[t]
                for d in range(dim):
                    total[d] += weight * _widen(values[row, head, t, d])
            for d in range(dim):
                out[row, head, d] = total[d] / norm

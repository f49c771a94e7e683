"""The CPU attention over each row's own past: PyTorch's result, whatever shares the call."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from numba import njit
from torch.nn import functional as F

from generation.engine import past_attention

ROWS, HEADS, DIM, TIME = 5, 4, 64, 300


def pasts(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, and keys and values in buffers longer than any row's past (as the cache's)."""
    generator = torch.Generator().manual_seed(seed)
    queries = torch.randn(ROWS, HEADS, 1, DIM, generator=generator)
    keys = (2 * torch.randn(ROWS, HEADS, TIME, DIM, generator=generator)).to(dtype)
    values = torch.randn(ROWS, HEADS, TIME, DIM, generator=generator).to(dtype)
    return queries, keys, values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_row_attends_to_its_own_past_as_pytorch_does(dtype: torch.dtype):
    queries, keys, values = pasts(dtype)
    lengths = np.array([1, 37, 300, 64, 65])
    got = past_attention.attend(queries, keys, values, lengths)
    assert got.dtype == torch.float32 and got.shape == (ROWS, HEADS, 1, DIM)
    for row, length in enumerate(lengths):
        expected = F.scaled_dot_product_attention(
            queries[row].double(),
            keys[row, :, :length].double(),
            values[row, :, :length].double(),
        )
        torch.testing.assert_close(got[row].double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_bits_do_not_depend_on_the_other_rows_or_the_threads(dtype: torch.dtype):
    queries, keys, values = pasts(dtype)
    lengths = np.array([200, 3, 120, 299, 17])
    together = past_attention.attend(queries, keys, values, lengths)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)  # three parts of about equal work
        assert len(past_attention._parts(lengths, 3)) == 3
        split = past_attention.attend(queries, keys, values, lengths)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(split, together)
    for row, length in enumerate(lengths):
        one = slice(row, row + 1)
        alone = past_attention.attend(queries[one], keys[one], values[one], lengths[one])
        assert torch.equal(alone[0], together[row]), length


def test_a_past_in_another_dtype_is_refused_naming_the_ones_read():
    queries, keys, values = pasts(torch.float16)
    with pytest.raises(TypeError, match="keep it in float32 or bfloat16"):
        past_attention.attend(queries, keys, values, np.array([1] * ROWS))


def test_the_softmaxs_exponential_is_within_two_ulp_down_to_its_floor():
    @njit(fastmath=True)
    def exponentials(x: np.ndarray) -> np.ndarray:
        out = np.empty_like(x)
        for index in range(x.shape[0]):
            out[index] = past_attention._exp(x[index])
        return out

    x = -np.linspace(0.0, 87.0, 200_001).astype(np.float32)
    expected = np.exp(x.astype(np.float64))
    ulps = np.abs(exponentials(x) - expected) / np.spacing(expected.astype(np.float32))
    assert ulps.max() <= 2.0
    # Below the floor, a weight beside the largest one (1) that float32 cannot tell from 0.
    assert 0.0 < exponentials(np.array([-1000.0], np.float32))[0] < 1e-37


COMPILED_ON_LOAD_SCRIPT = """
import json
from generation.engine import past_attention
from generation.engine.musicgen import MusicGenEngine
from generation.request import GenerationRequest

kernel = past_attention._attend
compiled = {}
for precision in ("fp32", "bf16", "fp16"):
    engine = MusicGenEngine(device="cpu", precision=precision)
    engine.load("debug")
    loaded = len(kernel.signatures)
    engine.generate(GenerationRequest(prompt="lo-fi", model="debug", duration=1.0, seed=1))
    compiled[precision] = [loaded, len(kernel.signatures)]
    engine.close()
print(json.dumps(compiled))
"""


def test_the_engine_compiles_the_kernel_when_it_loads_a_model_not_in_a_request():
    # A fresh process, where nothing has compiled the kernel yet.
    run = subprocess.run(
        [sys.executable, "-c", COMPILED_ON_LOAD_SCRIPT],
        capture_output=True,
        text=True,
        check=True,
        env={"OMP_NUM_THREADS": "1", "PATH": ""},
        cwd=Path(__file__).parents[1],
    )
    # [kernels compiled after loading, after generating]: one per past dtype (bfloat16, and
    # float32 for float32 and float16 weights), each by the load that first needs it.
    assert json.loads(run.stdout) == {"fp32": [1, 1], "bf16": [2, 2], "fp16": [2, 2]}

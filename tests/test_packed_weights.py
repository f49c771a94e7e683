"""Packed weights: the shared step's bfloat16 and float32 products by weights in oneDNN's
layout, the same bits for a row whatever the number of rows, held only while a loop has rows."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from generation.engine import packed_weights
from generation.engine.continuous import DecodingLoop
from generation.engine.debug_models import build_debug_model
from generation.engine.decoding import linear, optimise_for_decoding
from generation.engine.packed_weights import PackedWeights
from generation.engine.precision import apply_precision, onednn_computes_bf16
from generation.engine.request_decoding import RequestDecoding
from generation.request import GenerationRequest

# MusicGen-small's shapes: a layer's self-attention in and out, feed-forward in and out.
SHAPES = [(3072, 1024), (1024, 1024), (4096, 1024), (1024, 4096)]


#: The dtypes this CPU packs: bfloat16 only where oneDNN computes in it (not on AVX2).
DTYPES = [torch.bfloat16, torch.float32] if onednn_computes_bf16() else [torch.float32]
#: How close a packed product is to ``F.linear``'s: the dtype's rounding, summed another way.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-5}


def weight_of(shape: tuple[int, int], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(shape[0] + shape[1])
    weight = torch.randn(shape, generator=generator) * shape[1] ** -0.5
    return weight.to(dtype), torch.randn(shape[0], generator=generator).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_packed_product_is_f_linear_to_rounding_and_used_only_inside_active(dtype):
    packs = PackedWeights(rows=16)
    for shape in SHAPES:
        weight, bias = weight_of(shape, dtype)
        x = torch.randn(5, 1, shape[1]).to(dtype)
        expected = F.linear(x, weight, bias)
        assert torch.equal(linear(x, weight, bias), expected)  # outside: F.linear itself
        with packs.active():
            result = linear(x, weight, bias)
        assert result.shape == expected.shape
        tolerance = TOLERANCE[dtype]
        torch.testing.assert_close(result.float(), expected.float(), rtol=tolerance, atol=tolerance)
    assert len(packs) == len(SHAPES)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_row_gets_the_same_bits_at_any_number_of_rows(dtype):
    packs = PackedWeights(rows=16)
    for shape in SHAPES:
        weight, bias = weight_of(shape, dtype)
        x = torch.randn(16, shape[1]).to(dtype)
        with packs.active():
            full = linear(x, weight, bias)
            for rows in range(1, 16):
                assert torch.equal(linear(x[:rows], weight, bias), full[:rows]), (shape, rows)


@pytest.mark.parametrize("amx", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_only_bfloat16_products_without_amx_are_padded_and_rows_keep_their_bits(
    dtype, amx, monkeypatch
):
    monkeypatch.setattr(packed_weights, "cpu_has_amx_tiles", lambda: amx)
    computed: list[int] = []
    product = packed_weights._packed_product

    def spy(packed, bias, x):
        computed.append(x.shape[0])
        return product(packed, bias, x)

    few, many = PackedWeights(rows=2), PackedWeights(rows=8)  # one request's loop, and four's
    for shape in SHAPES:
        weight, bias = weight_of(shape, dtype)
        x = torch.randn(8, 1, shape[1]).to(dtype)
        with many.active():
            full = linear(x, weight, bias)
        with few.active():
            linear(x[:1], weight, bias)  # packs, and checks the bits at every computed count
            monkeypatch.setattr(packed_weights, "_packed_product", spy)
            for rows in (1, 2):
                assert torch.equal(linear(x[:rows], weight, bias), full[:rows]), (shape, rows)
            monkeypatch.setattr(packed_weights, "_packed_product", product)
    padded = dtype == torch.bfloat16 and not amx
    assert computed == ([4, 4] if padded else [1, 2]) * len(SHAPES)


def test_float16_weights_and_inputs_of_another_dtype_are_not_packed():
    packs = PackedWeights(rows=4)
    weight, x = torch.randn(64, 32), torch.randn(3, 32)
    with packs.active():
        assert packs.linear(x.half(), weight.half(), None) is None
        assert packs.linear(x.bfloat16(), weight, None) is None
        assert torch.equal(linear(x.half(), weight.half(), None), F.linear(x.half(), weight.half()))
    assert len(packs) == 0


def test_where_onednn_has_no_bfloat16_bfloat16_weights_keep_f_linear(monkeypatch):
    monkeypatch.setattr(packed_weights, "onednn_computes_bf16", lambda: False)
    packs = PackedWeights(rows=4)
    weight, bias = weight_of(SHAPES[0], torch.bfloat16)
    x = torch.randn(3, SHAPES[0][1]).bfloat16()
    with packs.active():
        assert torch.equal(linear(x, weight, bias), F.linear(x, weight, bias))
    assert len(packs) == 0


def test_a_loop_holds_packed_weights_only_while_it_has_rows():
    model = build_debug_model("debug")
    apply_precision(model, "bf16")
    optimise_for_decoding(model)
    loop = DecodingLoop(model, max_requests=2)
    request = GenerationRequest(prompt="lo-fi", model="debug", duration=0.2, seed=3)
    with torch.no_grad():
        loop.join(RequestDecoding(model, request))
        assert len(loop.packed) == 0  # a request's first step is audiocraft's own
        loop.step()
        layers = len(model.lm.transformer.layers)
        # In, out, cross query, cross out and 2 feed-forward a layer (bfloat16, where oneDNN
        # computes in it), and the output heads (float32).
        bfloat16_packs = 6 * layers if onednn_computes_bf16() else 0
        assert len(loop.packed) == bfloat16_packs + len(model.lm.linears)
        while loop.active:
            loop.step()
    assert len(loop.packed) == 0

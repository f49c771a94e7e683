"""Packed weights: the shared step's bfloat16 products by weights in oneDNN's layout, the same
bits for a row whatever the number of rows, held only while a loop has rows."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from generation.engine.continuous import DecodingLoop
from generation.engine.debug_models import build_debug_model
from generation.engine.decoding import linear, optimise_for_decoding
from generation.engine.packed_weights import PackedWeights
from generation.engine.precision import apply_precision
from generation.engine.request_decoding import RequestDecoding
from generation.request import GenerationRequest

# MusicGen-small's shapes: a layer's self-attention in and out, feed-forward in and out.
SHAPES = [(3072, 1024), (1024, 1024), (4096, 1024), (1024, 4096)]


def bf16_weight(shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(shape[0] + shape[1])
    weight = torch.randn(shape, generator=generator) * shape[1] ** -0.5
    return weight.to(torch.bfloat16), torch.randn(shape[0], generator=generator).bfloat16()


def test_a_packed_product_is_f_linear_to_bfloat16_rounding_and_used_only_inside_active():
    packs = PackedWeights(rows=16)
    for shape in SHAPES:
        weight, bias = bf16_weight(shape)
        x = torch.randn(5, 1, shape[1]).bfloat16()
        expected = F.linear(x, weight, bias)
        assert torch.equal(linear(x, weight, bias), expected)  # outside: F.linear itself
        with packs.active():
            result = linear(x, weight, bias)
        assert result.shape == expected.shape
        torch.testing.assert_close(result.float(), expected.float(), rtol=2e-2, atol=2e-2)
    assert len(packs) == len(SHAPES)


def test_a_row_gets_the_same_bits_at_any_number_of_rows():
    packs = PackedWeights(rows=16)
    for shape in SHAPES:
        weight, bias = bf16_weight(shape)
        x = torch.randn(16, shape[1]).bfloat16()
        with packs.active():
            full = linear(x, weight, bias)
            for rows in range(1, 16):
                assert torch.equal(linear(x[:rows], weight, bias), full[:rows]), (shape, rows)


def test_float32_weights_are_not_packed():
    packs = PackedWeights(rows=4)
    weight, x = torch.randn(64, 32), torch.randn(3, 32)
    with packs.active():
        assert packs.linear(x, weight, None) is None
        assert torch.equal(linear(x, weight, None), F.linear(x, weight))
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
        assert len(loop.packed) == 6 * layers  # in, out, cross query, cross out, 2 feed-forward
        while loop.active:
            loop.step()
    assert len(loop.packed) == 0

"""optimise_for_decoding: the same tokens as unmodified audiocraft, with fewer projections."""

from __future__ import annotations

import pytest
import torch
from audiocraft.models import MusicGen
from audiocraft.modules.transformer import StreamingMultiheadAttention

from generation.debug_models import build_debug_model
from generation.decoding import optimise_for_decoding


def greedy_tokens(model: MusicGen, **params) -> torch.Tensor:
    model.set_generation_params(use_sampling=False, duration=params.pop("duration", 1.0), **params)
    torch.manual_seed(0)
    _, tokens = model.generate(["lo-fi hip hop beat", "fast drum and bass"], return_tokens=True)
    return tokens


def cross_attentions(model: MusicGen) -> list[StreamingMultiheadAttention]:
    return [
        m
        for m in model.lm.modules()
        if isinstance(m, StreamingMultiheadAttention) and m.cross_attention
    ]


@pytest.mark.parametrize("name", ["debug", "debug-stereo"])
@pytest.mark.parametrize("two_step_cfg", [False, True])
def test_greedy_tokens_are_those_of_unmodified_audiocraft(name: str, two_step_cfg: bool):
    plain, fast = build_debug_model(name), build_debug_model(name)
    optimise_for_decoding(fast)
    expected = greedy_tokens(plain, two_step_cfg=two_step_cfg)
    assert torch.equal(greedy_tokens(fast, two_step_cfg=two_step_cfg), expected)


def test_extended_generation_matches_too():
    plain, fast = build_debug_model("debug"), build_debug_model("debug")
    optimise_for_decoding(fast)
    expected = greedy_tokens(plain, duration=33.0, extend_stride=29.0)
    assert torch.equal(greedy_tokens(fast, duration=33.0, extend_stride=29.0), expected)


def test_keys_and_values_are_projected_once_per_generation():
    model = build_debug_model("debug")
    optimise_for_decoding(model)
    optimise_for_decoding(model)  # idempotent: one wrapper, not two
    sources: set[int] = set()
    for attention in cross_attentions(model):
        attention.register_forward_pre_hook(lambda module, args: sources.add(id(args[1])))
    projected: list[int] = []
    original = torch.nn.functional.linear

    def counting_linear(x, weight, bias=None):
        if id(x) in sources:
            projected.append(1)
        return original(x, weight, bias)

    steps: list[int] = []
    model.lm.transformer.register_forward_hook(lambda *_: steps.append(1))
    torch.nn.functional.linear = counting_linear
    try:
        greedy_tokens(model, duration=0.5)
    finally:
        torch.nn.functional.linear = original
    # Keys and values of the text: once per layer, not once per step.
    assert len(sources) == 1
    assert len(steps) > 20
    assert len(projected) == 2 * len(cross_attentions(model))

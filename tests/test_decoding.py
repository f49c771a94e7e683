"""optimise_for_decoding: the same tokens as unmodified audiocraft, with fewer projections."""

from __future__ import annotations

import pytest
import torch
from audiocraft.models import MusicGen
from audiocraft.modules.transformer import StreamingMultiheadAttention

from generation.engine.debug_models import build_debug_model
from generation.engine.decoding import linear, optimise_for_decoding

PROMPTS = ["lo-fi hip hop beat", "fast drum and bass"]


def greedy_tokens(model: MusicGen, prompts: int = 1, **params) -> torch.Tensor:
    model.set_generation_params(use_sampling=False, duration=params.pop("duration", 1.0), **params)
    _, tokens = model.generate(PROMPTS[:prompts], return_tokens=True)
    return tokens


def cross_attentions(model: MusicGen) -> list[StreamingMultiheadAttention]:
    return [
        m
        for m in model.lm.modules()
        if isinstance(m, StreamingMultiheadAttention) and m.cross_attention
    ]


# Rows per forward pass: 2 (one prompt and its CFG twin: the 2-row path), 4, 1 and 2.
@pytest.mark.parametrize(
    ("name", "prompts", "two_step_cfg"),
    [
        ("debug", 1, False),
        ("debug", 2, False),
        ("debug", 1, True),
        ("debug", 2, True),
        ("debug-stereo", 1, False),
    ],
)
def test_greedy_tokens_are_those_of_unmodified_audiocraft(
    name: str, prompts: int, two_step_cfg: bool
):
    plain, fast = build_debug_model(name), build_debug_model(name)
    optimise_for_decoding(fast)
    expected = greedy_tokens(plain, prompts, two_step_cfg=two_step_cfg)
    assert torch.equal(greedy_tokens(fast, prompts, two_step_cfg=two_step_cfg), expected)


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_linear_matches_torch_to_float32_rounding(rows: int):
    torch.manual_seed(0)
    x, weight, bias = torch.randn(rows, 1, 1024), torch.randn(3072, 1024), torch.randn(3072)
    expected = torch.nn.functional.linear(x, weight, bias)
    result = linear(x, weight, bias)
    assert result.shape == expected.shape
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-4)


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


def test_past_keys_and_values_grow_in_place():
    model = build_debug_model("debug")
    optimise_for_decoding(model)
    attention = model.lm.transformer.layers[0].self_attn
    seen: list[tuple[int, int]] = []

    def record(module, args, output):
        state = module._streaming_state
        if "key_buffer" in state:
            keys = state["past_keys"]
            assert keys.data_ptr() == state["key_buffer"].data_ptr()
            seen.append((keys.shape[2], state["key_buffer"].shape[2]))

    attention.register_forward_hook(record)
    greedy_tokens(model, duration=6.0)  # 300 frames: the buffer grows once
    lengths = [length for length, _ in seen]
    assert lengths == list(range(lengths[0], lengths[0] + len(lengths)))
    assert len({capacity for _, capacity in seen}) == 2


def test_the_engine_decodes_every_model_it_loads_with_the_speed_ups():
    from generation.engine.musicgen import MusicGenEngine

    model = MusicGenEngine(device="cpu").load("debug-melody")
    assert cross_attentions(model) == []  # melody models prepend: self-attention only
    reference = build_debug_model("debug-melody")
    for ours, theirs in zip(model.lm.modules(), reference.lm.modules(), strict=True):
        if isinstance(ours, torch.nn.Linear | StreamingMultiheadAttention):
            assert ours.forward.__func__ is not type(theirs).forward  # replaced

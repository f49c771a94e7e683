"""Generation through audiocraft's real MusicGen code, on the tiny random-weight models.

Each option must observably reach audiocraft: these tests compare outputs, or watch the
model's own modules with forward hooks, never a stand-in.
"""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

from generation.errors import GenerationCancelled, GenerationError, InvalidOption
from generation.request import AudioClip, GenerationRequest

from .helpers import sine

SR = 32_000
BASE = GenerationRequest(prompt="lo-fi hip hop beat", model="debug", duration=1.0, seed=1)


def run(engine, **changes) -> np.ndarray:
    return engine.generate(replace(BASE, **changes)).audio


def count_lm_calls(engine, request: GenerationRequest) -> list[int]:
    """Rows of each pass of the LM (its first output head) while ``request`` runs."""
    lm = engine.load(request.model).lm
    batch_sizes: list[int] = []
    hook = lm.linears[0].register_forward_hook(
        lambda module, args, output: batch_sizes.append(output.shape[0])
    )
    try:
        engine.generate(request)
    finally:
        hook.remove()
    return batch_sizes


def test_duration_sets_the_length_of_the_output(engine):
    result = engine.generate(replace(BASE, duration=2.5))
    assert result.audio.shape == (1, int(2.5 * SR))
    assert result.sample_rate == SR
    assert result.seconds == pytest.approx(2.5)


def test_the_same_seed_gives_the_same_music(engine):
    assert np.array_equal(run(engine, seed=5), run(engine, seed=5))
    assert not np.array_equal(run(engine, seed=5), run(engine, seed=6))


def test_a_missing_seed_is_picked_and_reported(engine):
    result = engine.generate(replace(BASE, seed=None))
    assert result.request.seed is not None
    assert np.array_equal(result.audio, run(engine, seed=result.request.seed))


def test_the_prompt_conditions_the_music(engine):
    assert not np.array_equal(run(engine, prompt="calm piano"), run(engine, prompt="loud metal"))


def test_greedy_decoding_ignores_the_seed(engine):
    assert np.array_equal(
        run(engine, use_sampling=False, seed=1), run(engine, use_sampling=False, seed=2)
    )


def test_top_k_of_one_is_greedy(engine):
    greedy = run(engine, use_sampling=False)
    assert np.array_equal(run(engine, top_k=1, seed=3), greedy)
    assert np.array_equal(run(engine, top_k=1, seed=4), greedy)


def test_a_tiny_top_p_is_greedy_and_takes_precedence_over_top_k(engine):
    greedy = run(engine, use_sampling=False)
    assert np.array_equal(run(engine, top_p=1e-9, top_k=2048, seed=3), greedy)


def test_temperature_reaches_the_sampler(engine):
    assert np.array_equal(run(engine, temperature=0.0, seed=3), run(engine, use_sampling=False))
    assert not np.array_equal(run(engine, temperature=0.5), run(engine, temperature=1.5))


def test_cfg_coef_reaches_the_guidance(engine):
    assert not np.array_equal(
        run(engine, use_sampling=False, cfg_coef=0.0),
        run(engine, use_sampling=False, cfg_coef=6.0),
    )


def test_two_step_cfg_conditions_the_unconditioned_twin_on_its_own(engine):
    one_step = count_lm_calls(engine, BASE)
    two_step = count_lm_calls(engine, replace(BASE, two_step_cfg=True))
    assert set(one_step) == {2}  # the prompt and its unconditioned twin, batched
    # Two passes of one row for the first step, each with its own (unpadded) conditioning;
    # then both rows share each step, each attending to its own conditioning only.
    assert two_step == [1, 1, *one_step[1:]]


def test_two_step_cfg_honours_cfg_coef(engine):
    request = replace(BASE, use_sampling=False, two_step_cfg=True)
    assert not np.array_equal(
        engine.generate(replace(request, cfg_coef=0.0)).audio,
        engine.generate(replace(request, cfg_coef=6.0)).audio,
    )


def test_stereo_models_generate_two_channels(engine):
    result = engine.generate(replace(BASE, model="debug-stereo"))
    assert result.audio.shape == (2, SR)
    assert not np.array_equal(result.audio[0], result.audio[1])


def test_extended_generation_goes_past_the_window(engine):
    result = engine.generate(replace(BASE, duration=32.0, extend_stride=25.0))
    assert result.audio.shape == (1, 32 * SR)


def test_extend_stride_sets_how_much_context_each_window_keeps(engine):
    lm = engine.load("debug").lm
    prefills: dict[float, list[int]] = {}
    for stride in (20.0, 28.0):
        lengths = prefills[stride] = []
        hook = lm.transformer.register_forward_hook(
            lambda module, args, output, lengths=lengths: lengths.append(args[0].shape[1])
        )
        try:
            engine.generate(replace(BASE, duration=31.0, extend_stride=stride))
        finally:
            hook.remove()
    # The second window starts from the last (30 - stride) s of the first, at 50 frames/s.
    assert max(prefills[20.0]) == 10 * 50 + 1
    assert max(prefills[28.0]) == 2 * 50 + 1


def test_progress_counts_every_step_up_to_the_total(engine):
    seen: list[tuple[int, int]] = []
    engine.generate(replace(BASE, duration=2.0), progress=lambda d, t: seen.append((d, t)))
    done = [d for d, _ in seen]
    totals = {t for _, t in seen}
    assert len(totals) == 1
    assert done == list(range(1, len(done) + 1))
    assert done[-1] == totals.pop() > 100  # 2 s at 50 steps a second


def test_melody_chroma_reaches_the_conditioner(engine):
    conditioner = engine.load("debug-melody").lm.condition_provider.conditioners["self_wav"]
    chromas: list[torch.Tensor] = []
    hook = conditioner.register_forward_hook(lambda m, a, out: chromas.append(out[0].clone()))
    try:
        # 44.1 kHz stereo in: converted as the model needs.
        low = AudioClip(sine(3.0, 220.0, 44_100, channels=2), 44_100)
        high = AudioClip(sine(3.0, 880.0, 44_100, channels=2), 44_100)
        request = replace(BASE, model="debug-melody", use_sampling=False)
        with_low = engine.generate(replace(request, melody=low)).audio
        with_high = engine.generate(replace(request, melody=high)).audio
        without = engine.generate(request).audio
    finally:
        hook.remove()
    assert len(chromas) == 3
    assert not torch.equal(chromas[0], chromas[1])
    assert not np.array_equal(with_low, with_high)
    assert not np.array_equal(with_low, without)


def test_continuation_output_begins_with_the_intro(engine):
    intro = AudioClip(sine(1.0, 330.0), SR)
    result = engine.generate(replace(BASE, duration=2.0, continuation=intro))
    assert result.audio.shape == (1, 2 * SR)
    # audiocraft re-decodes the intro's tokens: compare with the codec's own round trip.
    codec = engine.load("debug").compression_model
    with torch.no_grad():
        codes, _ = codec.encode(torch.from_numpy(intro.samples)[None])
        round_trip = codec.decode(codes)[0].numpy()
    settled = int(0.8 * SR)  # the decoder's context reaches across the boundary
    np.testing.assert_allclose(result.audio[:, :settled], round_trip[:, :settled], atol=1e-5)


def test_continuation_at_another_rate_and_layout_is_converted(engine):
    intro = AudioClip(sine(1.0, 330.0, 48_000, channels=2), 48_000)
    for model, channels in (("debug", 1), ("debug-stereo", 2)):
        result = engine.generate(replace(BASE, model=model, duration=2.0, continuation=intro))
        assert result.audio.shape == (channels, 2 * SR)


def test_cancelling_stops_the_generation_and_the_engine_goes_on(engine):
    cancel = threading.Event()
    steps: list[int] = []

    def cancel_after_ten(done: int, total: int) -> None:
        steps.append(done)
        if done == 10:
            cancel.set()

    with pytest.raises(GenerationCancelled):
        engine.generate(replace(BASE, duration=5.0), progress=cancel_after_ten, cancel=cancel)
    assert steps[-1] == 10
    assert engine.generate(BASE).audio.shape == (1, SR)


def test_the_engine_validates_before_running(engine):
    with pytest.raises(InvalidOption) as caught:
        engine.generate(replace(BASE, melody=AudioClip(sine(1.0, 220.0), SR)))
    assert caught.value.option == "melody"


def test_debug_models_are_the_same_every_time_they_are_built():
    from generation.engine.debug_models import build_debug_model

    first, second = build_debug_model("debug"), build_debug_model("debug")
    for a, b in zip(first.lm.parameters(), second.lm.parameters(), strict=True):
        assert torch.equal(a, b)
    assert first.max_duration == 30


def out_of_memory(monkeypatch, *, times: int) -> list[int]:
    """Make the next ``times`` decoding steps run out of GPU memory (this machine has no
    GPU to fill); returns the row counts of the steps that did."""
    import generation.engine.continuous as continuous

    real_step, failed = continuous.shared_step, []

    def step(model, cache, tokens):
        if len(failed) < times:
            failed.append(cache.rows)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real_step(model, cache, tokens)

    monkeypatch.setattr(continuous, "shared_step", step)
    return failed


def test_out_of_gpu_memory_is_retried_once(engine, monkeypatch):
    expected = run(engine)
    failed = out_of_memory(monkeypatch, times=1)
    result = engine.generate(BASE)
    assert failed == [2]
    np.testing.assert_array_equal(result.audio, expected)  # same seed, same music


def test_out_of_gpu_memory_twice_fails_with_advice(engine, monkeypatch):
    failed = out_of_memory(monkeypatch, times=2)
    with pytest.raises(GenerationError, match="smaller model or a shorter duration"):
        engine.generate(BASE)
    assert failed == [2, 2]
    assert engine.generate(BASE).audio.shape == (1, SR)

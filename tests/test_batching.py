"""Several requests decoding together through the engine, on the tiny random-weight models
(the tokens themselves: tests/test_continuous.py)."""

from __future__ import annotations

import gc
import weakref
from dataclasses import replace

import numpy as np
import pytest

from generation.engine.musicgen import MusicGenEngine, model_bytes
from generation.request import AudioClip, GenerationRequest, batch_key

from .helpers import sine
from .test_engine import count_lm_calls

SR = 32_000
BASE = GenerationRequest(prompt="lo-fi hip hop beat", model="debug", duration=1.0, seed=1)


def assert_same_music(batched: np.ndarray, alone: np.ndarray) -> None:
    # The same tokens decode to the same audio, up to float rounding of the batched codec.
    np.testing.assert_allclose(batched, alone, atol=1e-5)


def test_each_request_in_a_batch_gets_the_music_its_seed_gives_alone(engine):
    requests = [BASE, replace(BASE, seed=2), replace(BASE, prompt="calm piano", seed=3)]
    results = engine.generate_batch(requests)
    assert [result.request for result in results] == requests
    for result in results:
        assert_same_music(result.audio, engine.generate(result.request).audio)
    assert not np.allclose(results[0].audio, results[1].audio, atol=1e-3)


def test_the_order_of_a_batch_does_not_change_anyones_music(engine):
    first, second = BASE, replace(BASE, prompt="calm piano", seed=9)
    forward = engine.generate_batch([first, second])
    backward = engine.generate_batch([second, first])
    assert_same_music(forward[0].audio, backward[1].audio)
    assert_same_music(forward[1].audio, backward[0].audio)


def test_requests_sent_together_decode_every_step_in_one_pass(engine):
    lm = engine.load("debug").lm
    rows: list[int] = []
    hook = lm.linears[0].register_forward_hook(lambda m, args, out: rows.append(out.shape[0]))
    try:
        engine.generate_batch([replace(BASE, seed=seed) for seed in range(3)])
    finally:
        hook.remove()
    alone = count_lm_calls(engine, BASE)
    # Each request's first step on its way in, then one pass of all six rows (each request
    # and its classifier-free-guidance twin) a step.
    assert rows == [2, 2, 2] + [6] * (len(alone) - 1)


def test_melody_and_continuation_requests_decode_together_with_plain_ones(engine):
    melody = AudioClip(sine(1.0, 220.0), SR)
    melodic = replace(BASE, model="debug-melody", melody=melody)
    plain = replace(BASE, model="debug-melody", prompt="jazz", seed=4, duration=2.0)
    results = engine.generate_batch([melodic, plain])
    for result in results:
        assert_same_music(result.audio, engine.generate(result.request).audio)

    intro = AudioClip(sine(0.5, 330.0), SR)
    extending = replace(BASE, duration=1.5, continuation=intro)
    results = engine.generate_batch([extending, replace(BASE, seed=7, top_p=0.5)])
    assert [result.audio.shape for result in results] == [(1, int(1.5 * SR)), (1, SR)]
    for result in results:
        assert_same_music(result.audio, engine.generate(result.request).audio)


def test_extended_generation_decodes_beside_short_requests(engine):
    long = replace(BASE, duration=32.0, extend_stride=28.0, temperature=0.0)
    results = engine.generate_batch([long, replace(BASE, prompt="calm piano")])
    assert [result.audio.shape for result in results] == [(1, 32 * SR), (1, SR)]


@pytest.mark.parametrize(
    "change",
    [
        {"duration": 2.0},
        {"temperature": 0.5},
        {"top_k": 10},
        {"top_p": 0.5},
        {"cfg_coef": 1.0},
        {"use_sampling": False},
        {"two_step_cfg": True},
        {"extend_stride": 10.0},
        {"continuation": AudioClip(sine(0.5, 330.0), SR)},
    ],
)
def test_requests_with_any_options_share_steps_and_keep_their_own_music(engine, change):
    other = replace(BASE, seed=5, **change)
    together = engine.generate_batch([BASE, other])
    assert together[0].shared_with > 1
    for result in together:
        assert_same_music(result.audio, engine.generate(result.request).audio)


def test_what_the_queue_may_claim_together_shares_a_batch_key():
    assert batch_key(replace(BASE, prompt="jazz", seed=None)) == batch_key(BASE)
    # A temperature of 0 is greedy whatever the sampling flag says.
    greedy = replace(BASE, temperature=0.0)
    assert batch_key(greedy) == batch_key(replace(greedy, use_sampling=False))
    assert batch_key(replace(BASE, top_k=10)) != batch_key(BASE)


def test_models_stay_loaded_within_the_memory_budget():
    probe = MusicGenEngine(device="cpu")
    sizes = {name: model_bytes(probe.load(name)) for name in ("debug", "debug-stereo")}
    roomy = MusicGenEngine(device="cpu", memory_budget_gb=1.1 * sum(sizes.values()) / 1e9)
    for model in ("debug", "debug-stereo", "debug"):
        roomy.generate(replace(BASE, model=model, duration=0.1))
    assert roomy.loaded_models == ("debug-stereo", "debug")  # the most recently used last

    tight = MusicGenEngine(device="cpu", memory_budget_gb=1.1 * max(sizes.values()) / 1e9)
    tight.load("debug")
    tight.load("debug-stereo")
    assert tight.loaded_models == ("debug-stereo",)  # the least recently used went


def test_switching_models_frees_the_old_weights_without_a_full_collection():
    engine = MusicGenEngine(device="cpu")  # no memory budget: one model at a time
    old = engine.load("debug")
    engine.generate(replace(BASE, duration=0.1))
    weights = [weakref.ref(tensor) for tensor in (*old.lm.parameters(), *old.lm.buffers())]
    weights += [weakref.ref(tensor) for tensor in old.compression_model.parameters()]
    del old  # the model sits in reference cycles: only its weights can be freed at once
    started: list[int] = []

    def record(phase: str, info: dict) -> None:
        if phase == "start":
            started.append(info["generation"])

    gc.disable()  # only collections the switch asks for are seen, not the interpreter's own
    gc.callbacks.append(record)
    try:
        engine.load("debug-stereo")
    finally:
        gc.callbacks.remove(record)
        gc.enable()
    assert engine.loaded_models == ("debug-stereo",)
    assert 2 not in started  # a full collection holds the GIL and stalls the event loop
    assert all(weight() is None for weight in weights)

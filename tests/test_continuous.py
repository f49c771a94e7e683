"""Continuous batching on the tiny random-weight models: a request's tokens are audiocraft's own
for its seed, alone or among any rows joining and leaving, whatever their options."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from audiocraft.models import MusicGen

from generation.engine import shared_step
from generation.engine.continuous import DecodingLoop
from generation.engine.debug_models import build_debug_model
from generation.engine.decoding import optimise_for_decoding
from generation.engine.musicgen import MusicGenEngine
from generation.engine.precision import apply_precision
from generation.engine.request_decoding import RequestDecoding, audiocraft_tokens, planned_steps
from generation.engine.row_cache import RowCache, RowPast
from generation.engine.sampling import PythonRandom, seeded_rows
from generation.errors import GenerationCancelled
from generation.request import AudioClip, GenerationRequest

from .helpers import sine

SR = 32_000
BASE = GenerationRequest(prompt="funky bass", model="debug", duration=2.0, seed=1)
INTRO = AudioClip(sine(1.0, 330.0, 44_100, channels=2), 44_100)
TUNE = AudioClip(sine(2.5, 220.0), SR)

#: Requests with every option that changes decoding, for each debug model.
REQUESTS = {
    "debug": [
        BASE,
        replace(
            BASE, prompt="a much longer prompt of calm piano and strings", seed=2, duration=1.5
        ),
        replace(BASE, seed=3, top_k=0, top_p=0.9, cfg_coef=5.0, temperature=0.7),
        replace(BASE, seed=4, use_sampling=False, duration=1.0),
        replace(BASE, seed=5, two_step_cfg=True),
        replace(BASE, seed=6, continuation=INTRO, duration=2.5),
        replace(BASE, seed=7, duration=31.0, extend_stride=29.0, top_k=20),
    ],
    "debug-melody": [
        replace(BASE, model="debug-melody"),
        replace(BASE, model="debug-melody", seed=2, melody=TUNE),
        replace(BASE, model="debug-melody", seed=3, melody=TUNE, two_step_cfg=True),
    ],
    "debug-stereo": [
        replace(BASE, model="debug-stereo"),
        replace(BASE, model="debug-stereo", seed=2, continuation=INTRO, duration=2.5),
    ],
}

#: Slow ones (a window's chroma passes through demucs), compared with audiocraft only.
ALSO_ALONE = {
    "debug-melody": [
        replace(BASE, model="debug-melody", seed=4, melody=TUNE, duration=31.0, extend_stride=29.0)
    ]
}


def prepared(name: str, precision: str) -> MusicGen:
    model = build_debug_model(name)
    apply_precision(model, precision)
    optimise_for_decoding(model)
    return model


def audiocraft_codes(model: MusicGen, request: GenerationRequest) -> torch.Tensor:
    """The codes audiocraft's own ``generate`` makes for ``request``, one request a call."""
    seeded = seeded_rows([request.seed], model.device)
    with torch.no_grad(), seeded, PythonRandom(request.seed).active():
        return audiocraft_tokens(model, request)


def loop_codes(
    model: MusicGen, requests: list[GenerationRequest], joins: list[int]
) -> list[torch.Tensor]:
    """Each request's codes from one shared loop, request ``i`` joining at step ``joins[i]``."""
    loop = DecodingLoop(model, max_requests=len(requests))
    decodings = [RequestDecoding(model, request) for request in requests]
    pending = sorted(zip(joins, range(len(requests)), decodings, strict=True))
    step = 0
    with torch.no_grad():
        while pending or loop.active:
            while pending and pending[0][0] <= step:
                loop.join(pending.pop(0)[2])
            if loop.active:
                _, next_window = loop.step()
                for decoding in next_window:
                    loop.join(decoding)
            step += 1
    return [decoding.codes() for decoding in decodings]


@pytest.mark.parametrize("name", REQUESTS)
def test_alone_in_the_loop_a_request_gets_audiocrafts_own_tokens(name: str):
    model = prepared(name, "fp32")
    for request in REQUESTS[name] + ALSO_ALONE.get(name, []):
        expected = audiocraft_codes(model, request)
        assert torch.equal(loop_codes(model, [request], [0])[0], expected), request


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", REQUESTS)
def test_a_requests_tokens_are_the_same_in_any_mixture(name: str, precision: str):
    model = prepared(name, precision)
    requests = REQUESTS[name]
    alone = [loop_codes(model, [request], [0])[0] for request in requests]
    draw = random.Random(f"{name}-{precision}")
    for _ in range(3):
        chosen = draw.sample(range(len(requests)), k=draw.randint(2, len(requests)))
        joins = [draw.randint(0, 60) for _ in chosen]
        mixed = loop_codes(model, [requests[i] for i in chosen], joins)
        for index, codes in zip(chosen, mixed, strict=True):
            assert torch.equal(codes, alone[index]), (requests[index], chosen, joins)


def test_the_gpus_padded_attention_gives_the_same_tokens_as_the_exact_one(monkeypatch):
    # Run on the CPU here: a GPU attends every row at once over whole blocks of time, each row
    # masked to its own past, so that the shapes repeat from step to step.
    model = prepared("debug", "fp32")
    requests = REQUESTS["debug"][:4]
    joins = [0, 7, 7, 30]
    exact = loop_codes(model, requests, joins)
    monkeypatch.setattr(shared_step, "padded_attention", lambda device: True)
    padded = loop_codes(model, requests, joins)
    for request, expected, codes in zip(requests, exact, padded, strict=True):
        assert torch.equal(codes, expected), request


def test_each_step_runs_the_model_once_for_every_row():
    model = prepared("debug", "fp32")
    first, second = BASE, replace(BASE, seed=2, duration=1.0, top_p=0.5)
    rows: list[int] = []
    hook = model.lm.linears[0].register_forward_hook(lambda m, args, out: rows.append(len(out)))
    try:
        loop_codes(model, [first, second], [0, 10])
    finally:
        hook.remove()
    # Each request's first step (with its CFG twin) runs on its way in, then every step
    # runs once for all rows.
    first_steps, second_steps = planned_steps(model, first), planned_steps(model, second)
    together = second_steps - 1
    after = first_steps - 1 - 10 - together
    assert rows == [2] + [2] * 10 + [2] + [4] * together + [2] * after


def test_a_request_between_windows_leaves_and_joins_while_the_others_go_on():
    model = prepared("debug", "fp32")
    long = replace(BASE, duration=31.0, extend_stride=29.0)
    loop = DecodingLoop(model, max_requests=2)
    extending, other = RequestDecoding(model, long), RequestDecoding(model, replace(BASE, seed=2))
    with torch.no_grad():
        loop.join(extending)
        while True:
            _, next_window = loop.step()
            if next_window:
                break
        loop.join(other)
        assert next_window == [extending] and loop.active == [other]
        loop.join(extending)  # its second window, with the last 1 s as its prompt
        while loop.active:
            loop.step()
    assert extending.codes().shape[-1] == 31 * 50
    assert torch.equal(extending.codes(), audiocraft_codes(model, long))


def test_a_short_request_finishes_before_a_long_one_that_started_first():
    engine = MusicGenEngine(device="cpu", max_requests=2)
    finished: list[str] = []
    long = engine.submit(replace(BASE, duration=20.0))
    long.add_done_callback(lambda _: finished.append("long"))
    time.sleep(0.2)
    short = engine.submit(replace(BASE, duration=1.0, seed=2))
    short.add_done_callback(lambda _: finished.append("short"))
    short.result(timeout=60)
    long.result(timeout=120)
    assert finished == ["short", "long"]
    assert long.result().shared_with > 1  # the short one shared some of its steps
    engine.close()


def test_cancelling_a_request_frees_its_place_at_the_next_step():
    engine = MusicGenEngine(device="cpu", max_requests=1)
    cancel = threading.Event()
    started = threading.Event()
    running = engine.submit(
        replace(BASE, duration=30.0), progress=lambda *_: started.set(), cancel=cancel
    )
    waiting = engine.submit(replace(BASE, seed=2))
    started.wait(timeout=30)
    assert engine.free_places == 0
    cancel.set()
    assert waiting.result(timeout=60).audio.shape == (1, 2 * SR)
    with pytest.raises(GenerationCancelled):
        running.result()
    engine.close()


def test_out_of_gpu_memory_sends_the_newest_request_back_and_everyone_gets_their_music(
    monkeypatch,
):
    engine = MusicGenEngine(device="cpu", max_requests=3)
    requests = [replace(BASE, seed=seed, duration=1.0 + seed / 2) for seed in range(3)]
    alone = [engine.generate(request).audio for request in requests]
    failures = []
    import generation.engine.continuous as continuous

    real_step = continuous.shared_step

    def out_of_memory_with_three(model, cache, tokens):
        if cache.rows == 6 and not failures:
            failures.append(cache.rows)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real_step(model, cache, tokens)

    monkeypatch.setattr(continuous, "shared_step", out_of_memory_with_three)
    results = engine.generate_batch(requests)
    assert failures == [6]
    for result, expected in zip(results, alone, strict=True):
        np.testing.assert_array_equal(result.audio, expected)
    engine.close()


def test_a_row_that_leaves_is_replaced_by_the_last_and_the_others_keep_their_past():
    cache = RowCache(capacity=4, time_room=4)

    def past(value: float, length: int) -> RowPast:
        tensor = torch.full((1, length, 2), float(value))
        return RowPast([tensor], [tensor], [tensor[:, :1]], [tensor[:, :1]])

    cache.add([past(1, 3), past(2, 1), past(3, 5)])  # the third row grows the buffers
    assert cache.lengths.tolist() == [3, 1, 5]
    cache.remove([0])  # the last row takes its place
    assert [lengths.tolist() for lengths in cache.attended_lengths()] == [[6, 2], [1, 1]]
    keys, _ = cache.write(0, torch.full((2, 1, 1, 2), 9.0), torch.zeros(2, 1, 1, 2))
    assert keys[0, 0, :6, 0].tolist() == [3, 3, 3, 3, 3, 9]
    assert keys[1, 0, :2, 0].tolist() == [2, 9]
    # Padded (a GPU's step): whole time_room steps, each row masked to its own past.
    padded = cache.padded_time()
    assert padded == 8  # 6 rounded up to 4s (the buffers hold 10: 6 and time_room)
    past_mask, cross_mask = cache.masks(padded)
    assert past_mask.shape == (2, 1, 1, 8)
    assert past_mask[:, 0, 0].tolist() == [[True] * 6 + [False] * 2, [True] * 2 + [False] * 6]
    assert cross_mask is not None and cross_mask[:, 0, 0].tolist() == [[True], [True]]
    cache.advance()
    assert cache.lengths.tolist() == [6, 2]
    assert [lengths.tolist() for lengths in cache.attended_lengths()] == [[7, 3], [1, 1]]


def buffer_rows(cache: RowCache) -> int:
    """How many rows the cache's buffers hold room for (its views share their storage)."""
    keys, _ = cache.cross(0)
    return keys.untyped_storage().nbytes() // (keys.stride(0) * keys.element_size())


def test_the_caches_buffers_grow_with_its_rows_up_to_its_capacity():
    cache = RowCache(capacity=6, time_room=4)

    def past(value: float) -> RowPast:
        tensor = torch.full((1, 2, 2), value)
        return RowPast([tensor], [tensor], [tensor[:, :1]], [tensor[:, :1]])

    grown = []
    for value in range(1, 6):
        cache.add([past(value)])
        grown.append(buffer_rows(cache))
    assert grown == [1, 2, 4, 4, 6]  # doubling, never past the capacity
    keys, _ = cache.cross(0)
    assert keys[:, 0, 0, 0].tolist() == [1, 2, 3, 4, 5]  # every row kept its own past
    cache.remove(range(5))
    cache.add([past(7), past(8)])  # emptied, the cache starts small again
    assert buffer_rows(cache) == 2


def test_a_request_alone_takes_the_caches_memory_of_its_own_rows_not_of_the_loops_room():
    model = prepared("debug", "fp32")
    loop = DecodingLoop(model, max_requests=8)
    with torch.no_grad():
        loop.join(RequestDecoding(model, BASE))
        assert buffer_rows(loop.cache) == RequestDecoding.rows
        loop.join(RequestDecoding(model, replace(BASE, seed=2)))
    assert buffer_rows(loop.cache) == 2 * RequestDecoding.rows


def test_a_waiting_request_that_is_cancelled_ends_at_once():
    engine = MusicGenEngine(device="cpu", max_requests=1)
    started = threading.Event()
    running = engine.submit(replace(BASE, duration=30.0), progress=lambda *_: started.set())
    started.wait(timeout=30)
    cancel = threading.Event()
    waiting = engine.submit(replace(BASE, seed=2), cancel=cancel)
    cancel.set()
    with pytest.raises(GenerationCancelled):
        waiting.result(timeout=5)
    assert not running.done()  # it did not wait for the running one to finish
    engine.close()


def test_closing_the_engine_ends_every_request_it_had():
    engine = MusicGenEngine(device="cpu", max_requests=1)
    started = threading.Event()
    running = engine.submit(replace(BASE, duration=30.0), progress=lambda *_: started.set())
    waiting = engine.submit(replace(BASE, seed=2))
    started.wait(timeout=30)
    engine.close()
    for future in (running, waiting):
        with pytest.raises(GenerationCancelled):
            future.result(timeout=10)
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit(BASE)


@pytest.mark.parametrize(
    ("precision", "kept_in"),
    [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float32)],
)
def test_the_loop_keeps_its_past_in_the_weights_dtype_where_its_attention_reads_it(
    precision: str, kept_in: torch.dtype
):
    model = prepared("debug", precision)
    loop = DecodingLoop(model, max_requests=1)
    with torch.no_grad():
        loop.join(RequestDecoding(model, BASE))
        loop.step()  # attends to the past it keeps
    keys, values = loop.cache.cross(0)  # every buffer of the cache is in one dtype
    assert keys.dtype == values.dtype == kept_in

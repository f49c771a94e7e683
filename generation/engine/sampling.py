"""One random stream per request in a batch, so a request's music depends on its own seed only.

audiocraft samples every row of a batch from torch's one global generator: the tokens a
request gets would depend on which other requests shared its batch, and its seed alone could
not reproduce it. All of audiocraft's samplers (plain, top-k, top-p) draw through
``audiocraft.utils.utils.multinomial``; inside :func:`seeded_rows` that function draws row
``i`` of the batch from a generator seeded with ``seeds[i]``. Outside it, nothing changes.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from audiocraft.utils import utils as audiocraft_utils

_row_generators: ContextVar[list[torch.Generator] | None] = ContextVar(
    "row_generators", default=None
)
_audiocraft_multinomial = audiocraft_utils.multinomial


@contextmanager
def seeded_rows(seeds: Sequence[int], device: str | torch.device) -> Iterator[None]:
    """Sample row ``i`` of every batch drawn in this block from its own ``seeds[i]`` stream."""
    generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
    with drawing_from(generators):
        yield


@contextmanager
def drawing_from(generators: Sequence[torch.Generator]) -> Iterator[None]:
    """Sample row ``i`` of every batch drawn in this block from ``generators[i]``, which go
    on from where earlier draws left them."""
    token = _row_generators.set(list(generators))
    try:
        yield
    finally:
        _row_generators.reset(token)


def _multinomial(
    input: torch.Tensor,
    num_samples: int,
    replacement: bool = False,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """audiocraft's ``multinomial``, per row of the batch (dimension 0) when seeded."""
    generators = _row_generators.get()
    if generators is None or generator is not None or len(generators) != input.shape[0]:
        return _audiocraft_multinomial(input, num_samples, replacement, generator=generator)
    rows = [
        _audiocraft_multinomial(row, num_samples, replacement, generator=row_generator)
        for row, row_generator in zip(input, generators, strict=True)
    ]
    return torch.stack(rows)


audiocraft_utils.multinomial = _multinomial


class PythonRandom:
    """A request's own stream of Python's ``random``, which demucs draws from.

    The chroma of a melody passes through demucs, whose ``apply_model`` shifts the audio by a
    random amount from the process-wide ``random`` module: the conditioning (and so the music)
    would depend on whatever drew before. Inside :meth:`active` the module draws from this
    request's stream, seeded with its seed; outside, it goes on from where it was.
    """

    def __init__(self, seed: int) -> None:
        self._state = random.Random(seed).getstate()

    @contextmanager
    def active(self) -> Iterator[None]:
        outer = random.getstate()
        random.setstate(self._state)
        try:
            yield
        finally:
            self._state = random.getstate()
            random.setstate(outer)

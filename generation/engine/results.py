"""What the engine hands back and is handed: results, progress and cancel hooks. Free of
torch, so the gateway can deliver results without loading the engine."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from generation.request import GenerationRequest

#: Called with (steps done, steps in all) as the model decodes.
ProgressCallback = Callable[[int, int], None]


class CancelFlag(Protocol):
    """Asked after every decoding step whether to stop (a ``threading.Event`` will do)."""

    def is_set(self) -> bool: ...


@dataclass(frozen=True, eq=False)
class GenerationResult:
    """Generated audio (``[channels, samples]`` float32) and the request that made it.

    ``request.seed`` is always set, so the result can be reproduced. ``shared_with`` is how
    many requests decoded together in its steps, on average (itself included).
    """

    request: GenerationRequest
    audio: np.ndarray
    sample_rate: int
    generation_seconds: float
    shared_with: float = 1.0

    @property
    def seconds(self) -> float:
        return self.audio.shape[-1] / self.sample_rate

    @property
    def channels(self) -> int:
        return int(self.audio.shape[0])

"""A model's shared decoding loop: every request on the model decodes in every step.

Requests join at a step boundary (their first step, with their conditioning and prompt, run
on the way in: :func:`generation.engine.shared_step.prefill`) and leave when their last frame
is decoded, or when cancelled, without waiting for the others; a request moving to its next
window of extended generation leaves and joins again with its new prompt while the others go
on. Each step runs the LM once for all rows (:func:`generation.engine.shared_step.shared_step`);
each request samples from its own random stream, so its music depends on its request and seed
alone, not on what shared the steps with it.
"""

from __future__ import annotations

import torch
from audiocraft.models import MusicGen

from generation.engine.packed_weights import PackedWeights
from generation.engine.request_decoding import RequestDecoding
from generation.engine.row_cache import RowCache
from generation.engine.shared_step import attention_dtype, prefill, shared_step


class StepFailed(RuntimeError):
    """A step failed after its model pass, with some requests past it and others not."""


class DecodingLoop:
    """The requests decoding together on ``model``, at most ``max_requests`` at once.

    Request ``i`` of :attr:`active` holds rows ``2i`` (conditioned) and ``2i + 1`` (its
    CFG twin) of the cache. Not thread-safe: one thread runs a loop. A step whose model
    pass raises (out of GPU memory) leaves the loop as it was before the step: each row's
    past counts only completed passes, and what a failed pass wrote is overwritten by the
    next. One that fails after (:class:`StepFailed`) leaves it unusable: clear it.
    """

    def __init__(self, model: MusicGen, max_requests: int) -> None:
        self.model = model
        self.max_requests = max_requests
        self.cache = RowCache(
            capacity=max_requests * RequestDecoding.rows, dtype=attention_dtype(model)
        )
        #: The weights in oneDNN's layout, on a CPU in bfloat16, kept while there are rows.
        self.packed = PackedWeights(rows=self.cache.capacity)
        self.active: list[RequestDecoding] = []

    @property
    def room(self) -> int:
        """How many more requests may join now."""
        return self.max_requests - len(self.active)

    def join(self, request: RequestDecoding) -> bool:
        """Run ``request``'s first step and add its rows to the loop (a failure, out of
        memory included, leaves the loop as it was).

        Returns:
            True when the request is already complete (a window of one step), in which case
            it did not join.
        """
        if self.room < 1:
            raise ValueError("The loop is full.")
        while True:
            logits, pasts = [], []
            with self.model.autocast:  # the conditioners too, as audiocraft runs them
                for sequence, conditions in request.open_window():
                    step_logits, step_pasts = prefill(self.model, sequence, conditions)
                    logits.append(step_logits)
                    pasts += step_pasts
            if not request.accept(torch.cat(logits)):
                break
            if not request.close_window():
                return True
        rows = self.cache.rows
        try:
            self.cache.add(pasts)
        except BaseException:
            self.cache.remove(range(rows, self.cache.rows))  # what was added of its rows
            raise
        self.active.append(request)
        return False

    def leave(self, request: RequestDecoding) -> None:
        """Take ``request``'s rows out of the loop (cancelled, or sent back out of memory)."""
        self._remove(request)
        if not self.active:
            self.packed.clear()

    def _remove(self, request: RequestDecoding) -> None:
        index = self.active.index(request)
        self.cache.remove([2 * index, 2 * index + 1])
        last = self.active.pop()
        if last is not request:
            self.active[index] = last

    def step(self) -> tuple[list[RequestDecoding], list[RequestDecoding]]:
        """Decode one step of every active request.

        Returns:
            The requests that left: those complete (their codes are ready), and those whose
            window is full with another to follow (to :meth:`join` again).
        """
        tokens = torch.cat([request.last_tokens() for request in self.active])
        with self.model.autocast, self.packed.active():
            logits = shared_step(self.model, self.cache, tokens)
        self.cache.advance()
        complete, next_window = [], []
        try:
            for index, request in enumerate(self.active):
                request.requests_seen += len(self.active)
                if request.accept(logits[2 * index : 2 * index + 2]):
                    (next_window if request.close_window() else complete).append(request)
        except Exception as error:  # some requests took the step, others not: no way back
            raise StepFailed("Sampling a step failed.") from error
        for request in complete + next_window:
            self._remove(request)
        if not self.active and not next_window:
            self.packed.clear()
        return complete, next_window

    def clear(self) -> None:
        """Drop every request (after a failed step) and free the cache."""
        self.active.clear()
        self.cache.clear()
        self.packed.clear()

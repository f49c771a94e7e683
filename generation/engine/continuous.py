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

from generation.engine.request_decoding import RequestDecoding
from generation.engine.row_cache import RowCache
from generation.engine.shared_step import attention_dtype, prefill, shared_step


class DecodingLoop:
    """The requests decoding together on ``model``, at most ``max_requests`` at once.

    Request ``i`` of :attr:`active` holds rows ``2i`` (conditioned) and ``2i + 1`` (its
    CFG twin) of the cache. Not thread-safe: one thread runs a loop. A step that raises
    (out of GPU memory) leaves the loop as it was before the step: each row's past counts
    only completed steps, and what a failed step wrote is overwritten by the next.
    """

    def __init__(self, model: MusicGen, max_requests: int) -> None:
        self.model = model
        self.max_requests = max_requests
        self.cache = RowCache(
            capacity=max_requests * RequestDecoding.rows, dtype=attention_dtype(model)
        )
        self.active: list[RequestDecoding] = []

    @property
    def room(self) -> int:
        """How many more requests may join now."""
        return self.max_requests - len(self.active)

    def join(self, request: RequestDecoding) -> bool:
        """Run ``request``'s first step and add its rows to the loop.

        Returns:
            True when the request is already complete (a window of one step), in which case
            it did not join.
        """
        if self.room < 1:
            raise ValueError("The loop is full.")
        while True:
            first = request.open_window()
            logits, pasts = [], []
            with self.model.autocast:
                for sequence, conditions in first:
                    step_logits, step_pasts = prefill(self.model, sequence, conditions)
                    logits.append(step_logits)
                    pasts += step_pasts
            if not request.accept(torch.cat(logits)):
                break
            if not request.close_window():
                return True
        self.cache.add(pasts)
        self.active.append(request)
        return False

    def leave(self, request: RequestDecoding) -> None:
        """Take ``request``'s rows out of the loop (cancelled, or between windows)."""
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
        with self.model.autocast:
            logits = shared_step(self.model, self.cache, tokens)
        complete, next_window = [], []
        for index, request in enumerate(self.active):
            request.requests_seen += len(self.active)
            if request.accept(logits[2 * index : 2 * index + 2]):
                (next_window if request.close_window() else complete).append(request)
        for request in complete + next_window:
            self.leave(request)
        return complete, next_window

    def clear(self) -> None:
        """Drop every request (after a failed step) and free the cache."""
        self.active.clear()
        self.cache.clear()

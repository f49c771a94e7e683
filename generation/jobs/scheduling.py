"""How workers take jobs: how many requests decode at once, how long a job for a model not
loaded may be passed over (the claim that applies it is the store's:
:meth:`generation.jobs.store.JobStore.claim`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchPolicy:
    """How the worker takes jobs.

    Args:
        max_rows: Requests decoding at once (a job with several takes counts each); the
            batch-at-a-time worker's largest batch.
        max_model_wait: Seconds a job for a model not in memory may be passed over by jobs
            for a loaded model, so the model is not swapped back and forth.
        window: Seconds an idle worker waits after the first job arrives, so that requests
            sent together start together.
    """

    max_rows: int = 4
    max_model_wait: float = 120.0
    window: float = 0.25

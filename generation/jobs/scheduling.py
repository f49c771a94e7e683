"""How workers form batches: how many rows, how long a job for a model not loaded may be passed
over (the claim that applies it is the store's: :meth:`generation.jobs.store.JobStore.claim`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchPolicy:
    """How the worker forms batches.

    Args:
        max_rows: Requests decoded together in one pass (a job with several takes counts
            each); a batch costs little more per step than one request.
        max_model_wait: Seconds a job for a model not in memory may be passed over by jobs
            for a loaded model, so the model is not swapped back and forth.
        window: Seconds an idle worker waits after the first job arrives, so that requests
            sent together share the first batch (later ones gather while a batch runs).
    """

    max_rows: int = 4
    max_model_wait: float = 120.0
    window: float = 0.25

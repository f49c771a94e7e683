"""Which queued jobs run together next: servers in turn, one batch, the loaded model first."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from generation.jobs.job import Job
from generation.request import batch_key


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


def plan_batch(
    runnable: Sequence[Job],
    *,
    policy: BatchPolicy,
    loaded_models: Collection[str],
    now: float,
) -> list[Job]:
    """The jobs to run next, from ``runnable`` (queued jobs with servers in turn).

    The first job is the next in turn, unless its model is not loaded and it has waited less
    than ``policy.max_model_wait``: then the first job in turn for a loaded model goes
    instead. Jobs that can share its pass (same :func:`generation.request.batch_key`) join it
    in turn order, so every server with such jobs gets a row before any gets two. A job whose
    clips are still in the store (read back after a restart) runs alone: its key is only
    known once they are loaded.
    """
    if not runnable:
        return []
    first = _first(runnable, policy, loaded_models, now)
    key = batch_key(first.request)
    batch, rows = [first], first.takes
    if first.uploads_in_store:
        return batch
    for job in runnable:
        if job is first or job.uploads_in_store or rows + job.takes > policy.max_rows:
            continue
        if batch_key(job.request) == key:
            batch.append(job)
            rows += job.takes
    return batch


def _first(
    runnable: Sequence[Job], policy: BatchPolicy, loaded_models: Collection[str], now: float
) -> Job:
    head = runnable[0]
    if (
        not loaded_models
        or head.request.model in loaded_models
        or now - head.submitted_at >= policy.max_model_wait
    ):
        return head
    return next((job for job in runnable if job.request.model in loaded_models), head)

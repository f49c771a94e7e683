"""A generation worker on the engine: what ``musicgen-bot worker`` runs, and what ``musicgen-bot
run`` runs beside its gateway. It imports torch and audiocraft; the gateway never imports it."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from functools import partial

from generation.audio.loop import prepare_beat_tracking
from generation.engine.musicgen import MusicGenEngine
from generation.jobs.scheduling import BatchPolicy
from generation.jobs.store import JobStore
from generation.jobs.worker import Leases, Worker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSettings:
    """How a worker generates (from the bot's configuration and the command line).

    Args:
        device: "auto" (the first GPU when there is one), "cpu", "cuda:1"...
        models: The models it serves; the first is loaded at start.
        serves_any: Whether it also takes jobs for models not in ``models`` (one worker
            serving the whole bot); False when ``--models`` narrowed it.
        precision: The number format its models decode in ("auto", "fp32", "bf16", "fp16").
    """

    device: str
    models: tuple[str, ...]
    max_duration: float
    memory_budget_gb: float
    batch_policy: BatchPolicy
    max_attempts: int
    progress_interval: float
    job_timeout: float | None
    serves_any: bool = True
    precision: str = "auto"
    leases: Leases = field(default_factory=Leases)

    @staticmethod
    def leases_of(lease_seconds: float) -> Leases:
        """Leases of ``lease_seconds``: a heartbeat every quarter, a sweep every half."""
        return Leases(
            seconds=lease_seconds,
            heartbeat=lease_seconds / 4,
            sweep=lease_seconds / 2,
            poll=min(5.0, lease_seconds / 4),
        )


async def start_worker(store: JobStore, settings: WorkerSettings) -> Worker:
    """Start a worker on its own engine; it loads its first model and the beat tracker in
    the background, so the first job does not wait for them."""
    engine = MusicGenEngine(
        device=None if settings.device == "auto" else settings.device,
        max_duration=settings.max_duration,
        memory_budget_gb=settings.memory_budget_gb,
        precision=settings.precision,
        max_requests=settings.batch_policy.max_rows,
    )
    worker = Worker(
        engine,
        store,
        models=None if settings.serves_any else settings.models,
        batch_policy=settings.batch_policy,
        leases=settings.leases,
        max_attempts=settings.max_attempts,
        progress_interval=settings.progress_interval,
        job_timeout=settings.job_timeout,
        owns_generator=True,
    )
    await worker.start()
    preload = worker.run_blocking(lambda: engine.load(settings.models[0]))
    preload.add_done_callback(partial(_log_preload_failure, "the default model"))
    prepare = worker.run_blocking(prepare_beat_tracking)
    prepare.add_done_callback(partial(_log_preload_failure, "the beat tracker for loops"))
    return worker


def _log_preload_failure(what: str, future: asyncio.Future[object]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("could not preload %s: %s", what, future.exception())

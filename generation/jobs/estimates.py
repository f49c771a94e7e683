"""How long jobs take: generation rates learnt per model and batch size, and every queued
job's position and ETA in one pass over the queue."""

from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

from generation.engine.models import CATALOGUE
from generation.jobs.job import Job
from generation.jobs.scheduling import BatchPolicy
from generation.request import GenerationRequest, batch_key

#: Seconds of work per second of audio for one request before any job has been timed, by
#: model size: (CPU, GPU). The CPU figure for small is this project's benchmark (README,
#: Performance: 6 s per second at one thread); the others scale with the language model's
#: size (300M, 1.5B, 3.3B parameters). A checkpoint folder counts as medium.
SEED_RATES: Mapping[str, tuple[float, float]] = {
    "tiny": (0.1, 0.05),
    "small": (6.0, 0.5),
    "medium": (30.0, 1.2),
    "large": (65.0, 2.5),
}
#: What each further request in a batch adds to its time, as a share of one request's time:
#: (CPU, GPU). On the CPU, 4 requests took 2.1 times as long as one (README, Performance).
ROW_COST = (0.37, 0.1)


class GenerationRates:
    """Seconds of work per second of audio on one device, per model and batch size.

    A model and batch size never timed are guessed from the nearest batch size timed for the
    model, else from the model's size and the device. Each finished batch moves its rate
    towards what it measured (an exponential moving average).

    Args:
        device: Where the models run ("cpu", "cuda", "cuda:1", "mps").
        smoothing: How far each measurement moves the rate (1: to the last measurement).
    """

    def __init__(self, device: str, smoothing: float = 0.3) -> None:
        self.device = device
        self.smoothing = smoothing
        self._gpu = device != "cpu"
        #: Learnt rates: model, then batch size (requests), to seconds per second.
        self._learnt: dict[str, dict[int, float]] = {}

    def load(self, learnt: Mapping[tuple[str, int], float]) -> None:
        """Take rates learnt earlier (from the store), by (model, batch size)."""
        for (model, rows), rate in learnt.items():
            self._learnt.setdefault(model, {})[rows] = rate

    def rate(self, model: str, rows: int = 1) -> float:
        """Seconds of work per second of audio for a batch of ``rows`` requests."""
        by_rows = self._learnt.get(model)
        if not by_rows:
            return self._seed(model) * self._row_factor(rows)
        if rows in by_rows:
            return by_rows[rows]
        nearest = min(by_rows, key=lambda known: (abs(known - rows), known))
        return by_rows[nearest] * self._row_factor(rows) / self._row_factor(nearest)

    def seconds(self, request: GenerationRequest, rows: int = 1) -> float:
        """How long a batch of ``rows`` requests like ``request`` is likely to take."""
        return self.rate(request.model, rows) * request.duration

    def observe(self, model: str, rows: int, audio_seconds: float, work_seconds: float) -> float:
        """Learn from a batch of ``rows`` requests that made ``audio_seconds`` of audio each
        in ``work_seconds``; returns the model's new rate for that batch size."""
        measured = work_seconds / max(audio_seconds, 1e-6)
        by_rows = self._learnt.setdefault(model, {})
        previous = by_rows.get(rows)
        rate = measured if previous is None else previous + self.smoothing * (measured - previous)
        by_rows[rows] = rate
        return rate

    def _seed(self, model: str) -> float:
        spec = CATALOGUE.get(model) or CATALOGUE.get(f"facebook/musicgen-{model}")
        cpu, gpu = SEED_RATES.get(spec.size if spec else "medium", SEED_RATES["medium"])
        return gpu if self._gpu else cpu

    def _row_factor(self, rows: int) -> float:
        return 1.0 + ROW_COST[self._gpu] * (max(rows, 1) - 1)


@dataclass(frozen=True)
class Estimate:
    """Where a queued job stands.

    Args:
        job: The job.
        position: 1 for the job that runs next, and so on.
        seconds: Until it is likely done; None while its server is paused (it waits for an
            admin).
    """

    job: Job
    position: int
    seconds: float | None


def forecast(
    order: Sequence[Job],
    running: Sequence[Job],
    rates: GenerationRates,
    policy: BatchPolicy,
    paused: Callable[[int], bool],
) -> list[Estimate]:
    """The position and ETA of every job in ``order`` (the queue's service order), batching
    them as :func:`generation.jobs.scheduling.plan_batch` would, after the ``running`` batch.

    One pass: each job joins the earliest planned batch of its kind with room for it (what
    planning the batches one after another gives), so the cost grows with the number of jobs
    times ``policy.max_rows``, not with its square.
    """
    ahead = 0.0
    if running:
        first = running[0]
        rows = sum(job.takes for job in running)
        ahead = rates.seconds(first.request, rows) * (1 - first.fraction_done)
    batches: list[tuple[GenerationRequest, int]] = []  # first request, rows
    #: Planned batches with room left, by (batch key, room): a heap of their indices.
    open_batches: dict[tuple[Hashable, int], list[int]] = {}
    batch_of: dict[int, int] = {}
    for job in order:
        if paused(job.guild_id):
            continue
        key = batch_key(job.request)
        best: tuple[int, int] | None = None  # batch index, its room
        for room in range(job.takes, policy.max_rows):
            heap = open_batches.get((key, room))
            if heap and (best is None or heap[0] < best[0]):
                best = (heap[0], room)
        if best is None:
            index, room = len(batches), policy.max_rows
            batches.append((job.request, 0))
        else:
            index, room = best
            heapq.heappop(open_batches[(key, room)])
        request, rows = batches[index]
        batches[index] = (request, rows + job.takes)
        if room - job.takes > 0:
            heapq.heappush(open_batches.setdefault((key, room - job.takes), []), index)
        batch_of[job.id] = index
    done_after = []
    for request, rows in batches:
        ahead += rates.seconds(request, rows)
        done_after.append(ahead)
    return [
        Estimate(job, position, done_after[batch_of[job.id]] if job.id in batch_of else None)
        for position, job in enumerate(order, start=1)
    ]

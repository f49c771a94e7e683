"""How long jobs take: generation rates learnt per model and batch size, and every queued
job's position and ETA in one pass over the queue."""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from generation.engine.models import CATALOGUE
from generation.jobs.job import Job, QueueEntry
from generation.jobs.scheduling import BatchPolicy
from generation.request import GenerationRequest

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
#: What MultiBand Diffusion decoding adds, in seconds of work per second of audio per request,
#: before an MBD job has been timed: (CPU, GPU). A guess: 20 denoising passes of 4 diffusion
#: U-Nets over every sample (bench/studio.py: the tiny one alone costs 150-180 times EnCodec).
MBD_SEED_RATES = (8.0, 0.3)
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
        return self.rate(rate_key(request), rows) * request.duration

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
        if model.endswith(MBD_SUFFIX):  # the model's own rate, plus the diffusion decoder's
            return self._seed(model.removesuffix(MBD_SUFFIX)) + MBD_SEED_RATES[self._gpu]
        spec = CATALOGUE.get(model) or CATALOGUE.get(f"facebook/musicgen-{model}")
        cpu, gpu = SEED_RATES.get(spec.size if spec else "medium", SEED_RATES["medium"])
        return gpu if self._gpu else cpu

    def _row_factor(self, rows: int) -> float:
        return 1.0 + ROW_COST[self._gpu] * (max(rows, 1) - 1)


#: Rates of jobs decoded with MultiBand Diffusion are learnt apart, as ``model + MBD_SUFFIX``.
MBD_SUFFIX = " +mbd"


def rate_key(request: GenerationRequest) -> str:
    """Under what name the rate of jobs like ``request`` is learnt: its model, apart for MBD
    decoding (several times slower than EnCodec's)."""
    return request.model + (MBD_SUFFIX if request.decoder == "mbd" else "")


def entry_rate_key(entry: QueueEntry) -> str:
    """:func:`rate_key` for a queued job read without its request: its batch key holds the
    decoder (see :func:`generation.request.batch_key`)."""
    return entry.model + (MBD_SUFFIX if '"mbd"' in entry.batch_key else "")


@dataclass(frozen=True)
class Estimate:
    """Where a queued job stands.

    Args:
        job_id: The job.
        position: 1 for the job that runs next, and so on.
        seconds: Until it is likely done.
    """

    job_id: int
    position: int
    seconds: float


def forecast(
    order: Sequence[QueueEntry],
    running: Sequence[Job],
    rates: GenerationRates,
    policy: BatchPolicy,
    workers: int = 1,
) -> list[Estimate]:
    """The position and ETA of every job in ``order`` (the store's queue order), batching
    them as the store's claim would, after the ``running`` jobs, shared by ``workers``.

    One pass: each job joins the earliest planned batch of its kind with room for it (what
    planning the batches one after another gives), so the cost grows with the number of jobs
    times ``policy.max_rows``, not with its square.
    """
    ahead = _running_left(running, rates)
    batches: list[tuple[QueueEntry, int]] = []  # first job, rows
    #: Planned batches with room left, by (batch key, room): a heap of their indices.
    open_batches: dict[tuple[str, int], list[int]] = {}
    batch_of: dict[int, int] = {}
    for entry in order:
        best: tuple[int, int] | None = None  # batch index, its room
        for room in range(entry.takes, policy.max_rows):
            heap = open_batches.get((entry.batch_key, room))
            if heap and (best is None or heap[0] < best[0]):
                best = (heap[0], room)
        if best is None:
            index, room = len(batches), policy.max_rows
            batches.append((entry, 0))
        else:
            index, room = best
            heapq.heappop(open_batches[(entry.batch_key, room)])
        first, rows = batches[index]
        batches[index] = (first, rows + entry.takes)
        if room - entry.takes > 0:
            heapq.heappush(
                open_batches.setdefault((entry.batch_key, room - entry.takes), []), index
            )
        batch_of[entry.job_id] = index
    done_after = []
    workers = max(workers, 1)
    for first, rows in batches:
        ahead += rates.rate(entry_rate_key(first), rows) * first.duration / workers
        done_after.append(ahead)
    return [
        Estimate(entry.job_id, position, done_after[batch_of[entry.job_id]])
        for position, entry in enumerate(order, start=1)
    ]


@dataclass(frozen=True, slots=True)
class WorkAhead:
    """Claimable jobs ahead of one, of one batch key: how many takes (rows) in all."""

    model: str
    duration: float
    takes: int


def eta(
    ahead: Sequence[WorkAhead],
    job: Job,
    running: Sequence[Job],
    rates: GenerationRates,
    policy: BatchPolicy,
    workers: int = 1,
) -> float:
    """Seconds until ``job`` is likely done: the running jobs, then the work ahead of it in
    full batches of its kind, then its own batch, shared by ``workers``. Costs the number of
    batch keys ahead, not the number of jobs (:meth:`JobStore.work_ahead` sums them)."""
    seconds = 0.0
    rows_per_batch = max(policy.max_rows, 1)
    for work in ahead:
        full, rest = divmod(work.takes, rows_per_batch)
        seconds += full * rates.rate(work.model, rows_per_batch) * work.duration
        if rest:
            seconds += rates.rate(work.model, rest) * work.duration
    seconds += rates.seconds(job.request, job.takes)
    return _running_left(running, rates) + seconds / max(workers, 1)


def _running_left(running: Sequence[Job], rates: GenerationRates) -> float:
    """Seconds until the running jobs are likely done (as one batch per model; workers run
    side by side, so the longest counts)."""
    left = 0.0
    for job in running:
        rows = sum(other.takes for other in running if other.worker_id == job.worker_id)
        seconds = rates.seconds(job.request, rows) * (1 - job.fraction_done)
        left = max(left, seconds)
    return left

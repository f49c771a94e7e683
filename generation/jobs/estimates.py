"""How long jobs take: generation rates learnt per model and number of requests sharing the
decoding steps, and every queued job's position and ETA in one pass over the queue."""

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
#: Requests ahead of a job whose start :func:`eta` plans one by one (a long queue's ETA is
#: bounded in time; :func:`forecast` plans every job once, for the whole queue).
PLANNED_TAKES = 256


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
    """The position and ETA of every job in ``order`` (the store's queue order), as the
    workers decode them: a worker takes the next job whenever fewer than
    ``policy.max_rows`` of its requests decode, and each job then decodes alongside the others
    (continuous decoding), at the rate learnt for as many requests sharing its steps.

    The ``workers`` are planned as one with their places pooled, sharing steps as one worker
    does (:attr:`_Places.sharing`). One pass with a heap of the jobs decoding: the cost grows with
    the number of jobs times the log of the places.
    """
    places = _Places(running, rates, policy, workers, sum(entry.takes for entry in order))
    return [
        Estimate(
            entry.job_id,
            position,
            places.take(
                entry.takes, rates.rate(entry_rate_key(entry), places.sharing) * entry.duration
            ),
        )
        for position, entry in enumerate(order, start=1)
    ]


class _Places:
    """The places of the workers' decoding loops in time: when each job decoding ends.

    A job starts once fewer than ``capacity`` requests decode (as a worker claims: a job with
    several takes may overfill the loop, and the next job then waits for more to end).
    ``sharing`` is how many requests a worker's steps are likely to carry while the queue
    (``queued_takes``) drains: its places, or the requests there are to fill them.
    """

    def __init__(
        self,
        running: Sequence[Job],
        rates: GenerationRates,
        policy: BatchPolicy,
        workers: int,
        queued_takes: int,
    ) -> None:
        workers = max(workers, 1)
        self._decoding = sum(job.takes for job in running)
        self.capacity = policy.max_rows * workers
        self.sharing = max(1, min(policy.max_rows, -(-(queued_takes + self._decoding) // workers)))
        self.now = 0.0
        self._ends = [
            (rates.seconds(job.request, self.sharing) * (1 - job.fraction_done), job.takes)
            for job in running
        ]
        heapq.heapify(self._ends)

    def take(self, takes: int, seconds: float) -> float:
        """Start a job of ``takes`` requests lasting ``seconds`` at the first moment it may;
        returns when it ends."""
        while self._decoding >= self.capacity:
            end, ended = heapq.heappop(self._ends)
            self.now = max(self.now, end)
            self._decoding -= ended
        heapq.heappush(self._ends, (self.now + seconds, takes))
        self._decoding += takes
        return self.now + seconds

    def start_after(self, work: float) -> float:
        """When a job may start behind ``work`` seconds of requests spread evenly over the
        places after what decodes now: the level to which that work fills them."""
        frees = sorted(end for end, takes in self._ends for _ in range(takes))
        frees = ([self.now] * (self.capacity - len(frees)) + frees)[-self.capacity :]
        level, filled = frees[0], 1
        for free in frees[1:]:
            room = (free - level) * filled
            if work <= room:
                break
            work -= room
            level, filled = free, filled + 1
        return level + work / filled


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
    queued: int = 0,
) -> float:
    """Seconds until ``job`` is likely done: the work ahead of it starts as places free, one
    request at a time (the first :data:`PLANNED_TAKES`; beyond them, spread evenly over the
    places), then ``job`` starts and decodes alongside the others. Costs the number of batch
    keys ahead and :data:`PLANNED_TAKES`, not the number of jobs (:meth:`JobStore.work_ahead`
    sums them). ``queued``: jobs queued in all, those behind ``job`` too (they share its
    steps)."""
    queued = max(queued, sum(work.takes for work in ahead) + job.takes)
    places = _Places(running, rates, policy, workers, queued)
    planned, rest = 0, 0.0
    for work in ahead:
        seconds = rates.rate(work.model, places.sharing) * work.duration
        now = min(work.takes, PLANNED_TAKES - planned)
        for _ in range(now):
            places.take(1, seconds)
        planned += now
        rest += seconds * (work.takes - now)
    return places.start_after(rest) + rates.seconds(job.request, places.sharing)

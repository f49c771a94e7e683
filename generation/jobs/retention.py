"""How long the store keeps what finished jobs leave behind (see :meth:`JobStore.prune`)."""

from __future__ import annotations

from dataclasses import dataclass

#: Seconds in a day.
DAY = 86_400.0


@dataclass(frozen=True)
class Retention:
    """Days after a job finished that its results, its uploads and the job itself are kept;
    0 keeps them forever.

    Live jobs and outcomes not yet delivered are never touched, and a clip is kept while any
    job within ``uploads_days`` uses it.
    """

    results_days: float = 30.0
    uploads_days: float = 30.0
    jobs_days: float = 365.0

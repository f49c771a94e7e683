"""Forming batches: servers in turn, compatible jobs together, the loaded model first."""

from __future__ import annotations

import itertools
from dataclasses import replace

from generation.jobs.job import FairQueue, Job
from generation.jobs.scheduling import BatchPolicy, plan_batch
from generation.request import GenerationRequest

REQUEST = GenerationRequest(prompt="lo-fi", model="debug", duration=1.0, seed=1)
_ids = itertools.count(1)


def queued(queue: FairQueue, guild: int, request: GenerationRequest = REQUEST, **job) -> Job:
    added = Job(next(_ids), request, guild, guild * 10, 1, **job)
    queue.add(added)
    return added


def plan(queue: FairQueue, max_rows: int = 4, loaded=("debug",), now=0.0, wait=120.0):
    policy = BatchPolicy(max_rows=max_rows, max_model_wait=wait)
    return plan_batch(queue.runnable(), policy=policy, loaded_models=loaded, now=now)


def test_compatible_jobs_from_every_server_share_a_batch_in_turn():
    queue = FairQueue()
    a1, a2, a3 = (queued(queue, 1, replace(REQUEST, prompt=f"a{n}")) for n in range(3))
    b1 = queued(queue, 2)
    c1 = queued(queue, 3, replace(REQUEST, prompt="c", seed=None))
    # Each server gets a row before any gets a second one.
    assert plan(queue, max_rows=3) == [a1, b1, c1]
    assert plan(queue, max_rows=5) == [a1, b1, c1, a2, a3]


def test_jobs_with_other_options_wait_for_a_batch_of_their_own():
    queue = FairQueue()
    a1 = queued(queue, 1)
    longer = queued(queue, 2, replace(REQUEST, duration=2.0))
    a2 = queued(queue, 1)
    assert plan(queue) == [a1, a2]
    queue.take([a1, a2])
    assert plan(queue) == [longer]


def test_takes_count_as_rows():
    queue = FairQueue()
    variations = queued(queue, 1, takes=3)
    b1 = queued(queue, 2)
    queued(queue, 3)  # no room left for it
    assert plan(queue, max_rows=4) == [variations, b1]
    big = FairQueue()
    alone = queued(big, 1, takes=4)
    assert plan(big, max_rows=2) == [alone]  # a job's takes always run together


def test_jobs_for_the_loaded_model_go_first_for_a_while():
    queue = FairQueue()
    stereo = queued(queue, 1, replace(REQUEST, model="debug-stereo"), submitted_at=100.0)
    mono = queued(queue, 2, submitted_at=100.0)
    assert plan(queue, loaded=("debug",), now=150.0, wait=120.0) == [mono]
    # Once the other model's job has waited long enough, the model is switched.
    assert plan(queue, loaded=("debug",), now=220.0, wait=120.0) == [stereo]
    assert plan(queue, loaded=("debug-stereo",), now=150.0) == [stereo]
    assert plan(queue, loaded=(), now=150.0) == [stereo]  # nothing loaded: plain turns


def test_taking_a_batch_gives_each_of_its_servers_its_turn():
    queue = FairQueue()
    a1, b1 = queued(queue, 1), queued(queue, 2)
    a2, b2 = queued(queue, 1), queued(queue, 2)
    c1 = queued(queue, 3, replace(REQUEST, duration=2.0))
    queue.take(plan(queue, max_rows=2))
    # c waited while a and b were served: it goes before their second jobs.
    assert queue.runnable() == [c1, a2, b2]
    assert {a1.id, b1.id}.isdisjoint(job.id for job in queue.runnable())


def test_a_job_whose_clips_are_still_in_the_store_runs_alone():
    """Read back after a restart, its melody's shape (part of the batch key) is unknown."""
    queue = FairQueue()
    recovered = queued(queue, 1, uploads_in_store=True)
    a2 = queued(queue, 1)
    b1 = queued(queue, 2)
    assert plan(queue) == [recovered]
    queue.take([recovered])
    queued(queue, 2, uploads_in_store=True)  # behind b1: never joins another's batch
    assert plan(queue) == [b1, a2]

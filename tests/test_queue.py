"""The fair queue: one FIFO per server, served in turn, with limits."""

from __future__ import annotations

import itertools

import pytest

from generation.errors import JobNotFound, QueueFull
from generation.jobs.job import FairQueue, Job, JobStatus, QueueLimits
from generation.request import GenerationRequest

REQUEST = GenerationRequest(prompt="p", model="debug")
_ids = itertools.count(1)


def submit(queue: FairQueue, guild: int, user: int = 1) -> Job:
    """Check the limits and queue a job, as the job service does."""
    queue.check_room(guild, user)
    job = Job(next(_ids), REQUEST, guild, guild * 10, user)
    queue.add(job)
    return job


def next_job(queue: FairQueue) -> Job | None:
    """Take the job whose turn it is, as the worker does with a batch of one."""
    runnable = queue.runnable()[:1]
    queue.take(runnable)
    return runnable[0] if runnable else None


def drain(queue: FairQueue) -> list[int]:
    order = []
    while (job := next_job(queue)) is not None:
        order.append(job.id)
    return order


def test_servers_are_served_in_turn():
    queue = FairQueue(QueueLimits(per_user=10, per_guild=10))
    busy = [submit(queue, guild=1) for _ in range(10)]
    single = submit(queue, guild=2)
    # The single job is delayed by at most one job of the busy server.
    assert [job.id for job in queue.service_order()][:2] == [busy[0].id, single.id]
    assert queue.position(single) == 2
    assert drain(queue) == [busy[0].id, single.id] + [job.id for job in busy[1:]]


def test_each_server_is_first_in_first_out():
    queue = FairQueue()
    jobs = [submit(queue, guild=1, user=user) for user in (1, 2, 3)]
    assert drain(queue) == [job.id for job in jobs]


def test_three_servers_take_turns_as_jobs_arrive():
    queue = FairQueue(QueueLimits(per_user=5, per_guild=5))
    a1, a2 = submit(queue, 1), submit(queue, 1)
    b1 = submit(queue, 2)
    assert next_job(queue) is a1
    c1 = submit(queue, 3)  # not served yet, so ahead of the server just served
    assert drain(queue) == [b1.id, c1.id, a2.id]


def test_a_server_arriving_while_another_runs_goes_next():
    queue = FairQueue(QueueLimits(per_user=5, per_guild=5))
    a1, a2, a3 = submit(queue, 1), submit(queue, 1), submit(queue, 1)
    queue.running = [next_job(queue)]
    assert queue.running == [a1]
    b1 = submit(queue, 2)
    assert queue.service_order() == [b1, a2, a3]
    assert drain(queue) == [b1.id, a2.id, a3.id]


def test_a_returning_server_is_not_put_ahead_of_one_that_waited():
    queue = FairQueue(QueueLimits(per_user=5, per_guild=5))
    a1 = submit(queue, 1)
    b1, b2 = submit(queue, 2), submit(queue, 2)
    assert next_job(queue) is a1
    assert next_job(queue) is b1
    a2 = submit(queue, 1)  # served before b1, so it goes before b2
    assert drain(queue) == [a2.id, b2.id]


def test_held_jobs_count_towards_limits_and_positions_but_do_not_run():
    queue = FairQueue(QueueLimits(per_user=1, per_guild=5))
    held = Job(next(_ids), REQUEST, 1, 10, 1)
    queue.hold(held)
    with pytest.raises(QueueFull):
        queue.check_room(1, 1)
    assert queue.position(held) == 1
    assert next_job(queue) is None
    queue.add(held)
    assert next_job(queue) is held


def test_paused_servers_are_skipped_and_keep_their_jobs():
    queue = FairQueue()
    paused = submit(queue, guild=1)
    other = submit(queue, guild=2)
    queue.pause(1)
    assert queue.is_paused(1)
    assert next_job(queue) is other
    assert next_job(queue) is None
    assert queue.queued(1) == [paused]
    queue.resume(1)
    assert next_job(queue) is paused


def test_limits_count_queued_and_running_jobs():
    queue = FairQueue(QueueLimits(per_user=2, per_guild=3))
    submit(queue, guild=1, user=1)
    queue.running = [next_job(queue)]
    submit(queue, guild=1, user=1)
    with pytest.raises(QueueFull, match="already have 2 jobs"):
        queue.check_room(1, 1)
    queue.check_room(1, 1, per_user=3)  # a server's own, higher limit
    with pytest.raises(QueueFull, match="already have 2 jobs"):
        submit(queue, guild=1, user=1)
    submit(queue, guild=2, user=1)  # the limit is per server
    submit(queue, guild=1, user=2)
    with pytest.raises(QueueFull, match="queue is full"):
        submit(queue, guild=1, user=3)


def test_remove_and_get():
    queue = FairQueue()
    job = submit(queue, guild=1)
    assert queue.get(job.id) is job
    queue.remove(job)
    assert job.status is JobStatus.QUEUED  # the worker decides the status
    with pytest.raises(JobNotFound, match=f"#{job.id}"):
        queue.get(job.id)
    assert next_job(queue) is None

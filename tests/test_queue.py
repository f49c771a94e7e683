"""The fair queue: one FIFO per server, served in turn, with limits."""

from __future__ import annotations

import pytest

from generation.errors import JobNotFound, QueueFull
from generation.queue import FairQueue, JobStatus, QueueLimits
from generation.request import GenerationRequest

REQUEST = GenerationRequest(prompt="p", model="debug")


def submit(queue: FairQueue, guild: int, user: int = 1):
    return queue.submit(REQUEST, guild_id=guild, channel_id=guild * 10, user_id=user)


def drain(queue: FairQueue) -> list[int]:
    order = []
    while (job := queue.next_job()) is not None:
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
    assert queue.next_job() is a1
    c1 = submit(queue, 3)
    assert drain(queue) == [b1.id, a2.id, c1.id]


def test_paused_servers_are_skipped_and_keep_their_jobs():
    queue = FairQueue()
    paused = submit(queue, guild=1)
    other = submit(queue, guild=2)
    queue.pause(1)
    assert queue.is_paused(1)
    assert queue.next_job() is other
    assert queue.next_job() is None
    assert queue.queued(1) == [paused]
    queue.resume(1)
    assert queue.next_job() is paused


def test_limits_count_queued_and_running_jobs():
    queue = FairQueue(QueueLimits(per_user=2, per_guild=3))
    submit(queue, guild=1, user=1)
    queue.running = queue.next_job()
    submit(queue, guild=1, user=1)
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
    assert queue.next_job() is None

"""One gateway (under SimCord) and two ``musicgen-bot worker`` processes sharing one
PostgreSQL database: the many-GPUs set-up, end to end."""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import discord
import pytest

from generation.jobs.job import Job, JobStatus
from generation.jobs.postgres import PostgresStore
from generation.request import GenerationRequest

from .bot_helpers import make_bot
from .postgres import fresh_schema

pytestmark = pytest.mark.simcord(settle_timeout=60)

#: Short leases, so that a killed worker's job is taken back within seconds.
LEASE = 3.0


@pytest.fixture
async def database():
    async with fresh_schema("workers") as url:
        yield url


@pytest.fixture
async def gateway_store(database):
    """The gateway's store, opened before SimCord watches the bot: its connection pool waits
    on the network for the process's life, which SimCord would take for work that never
    settles.

    The gateway hears of the workers' progress through its timer loop, not through
    notifications: SimCord runs the bot on a virtual clock (interaction tokens expire by it),
    and a notification would wake the gateway outside the bot's work, on the wall clock,
    where every token looks long expired. (Workers do listen: cancel reaches them so.)"""
    store = await PostgresStore.open(database)
    store.subscribe = lambda channel, listener: None
    yield store
    await store.close()


@pytest.fixture
def simcord_bot(database, gateway_store):
    return make_bot(database, generates=False, store=gateway_store, queue={"lease_seconds": LEASE})


@pytest.fixture
async def store(database):
    """The test's own view of the database."""
    store = await PostgresStore.open(database)
    yield store
    await store.close()


class Workers:
    """``musicgen-bot worker`` processes on the test's database (CPU, debug models)."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.processes: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def start(self, log: Path) -> subprocess.Popen:
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        process = subprocess.Popen(
            [sys.executable, "-m", "bot.cli", "worker", "--config", str(self.config)],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            env=environment,
        )
        self.processes.append(process)
        self.logs.append(log)
        return process

    def alive(self) -> bool:
        """True while every worker started runs (a worker that died fails the test, with
        what it said)."""
        for process, log in zip(self.processes, self.logs, strict=True):
            if process.poll() is not None and process.returncode != -signal.SIGKILL:
                raise AssertionError(f"a worker exited: {log.read_text()[-2000:]}")
        return True

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture
def workers(database, tmp_path):
    config = tmp_path / "worker.toml"
    config.write_text(
        f"""[generation]
models = ["debug", "debug-melody", "debug-stereo", "facebook/musicgen-small"]
device = "cpu"
max_duration = 60

[storage]
database = "{database}"

[queue]
lease_seconds = {LEASE}
progress_interval = 1
"""
    )
    running = Workers(config)
    yield running
    running.stop()


async def until(check, what: str, seconds: float = 120.0, env=None):
    """Wait until ``check()`` is truthy (moving the gateway's clock on, if ``env``); returns
    it."""
    deadline = time.monotonic() + seconds
    while True:
        if env is not None:  # the gateway's timer loop looks at the store
            await env.advance_time(0.5)
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


def tracks(*channels) -> list[discord.Message]:
    return [m for channel in channels for m in channel.history() if m.attachments]


async def test_two_workers_serve_several_servers_and_a_killed_one_loses_nothing(
    simcord_env, store, workers, tmp_path
):
    servers = [simcord_env.create_guild(f"Server {n}") for n in range(3)]
    channels = [server.create_text_channel("music") for server in servers]
    members = [
        server.add_member(simcord_env.create_user(f"member{n}")) for n, server in enumerate(servers)
    ]
    # A long job for a worker to be killed in the middle of.
    await members[0].slash(channels[0], "music generate", prompt="long", duration=60.0)
    first = workers.start(tmp_path / "worker-1.log")
    second = workers.start(tmp_path / "worker-2.log")
    await until(lambda: workers.alive() and _count_workers(store, 2), "both workers to register")
    running = await until(lambda: _running(store), "the long job to start")
    (job,) = running
    victim = first if str(first.pid) in job.worker_id else second
    survivor = second if victim is first else first
    await until(lambda: _progressed(store, job.id), "the long job to progress")
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)

    # Meanwhile, jobs from every server.
    for member, channel in zip(members, channels, strict=True):
        for prompt in ("a", "b"):
            await member.slash(channel, "music generate", prompt=prompt, duration=1.0)

    done = await until(
        lambda: len(tracks(*channels)) >= 7 and tracks(*channels),
        "every track to be delivered",
        seconds=240,
        env=simcord_env,
    )
    assert sorted(m.embeds[0].title for m in done) == ["a", "a", "a", "b", "b", "b", "long"]
    long_job = await store.get(job.id)
    # Killed once: the survivor took it back after the lease ran out, and delivered it once.
    assert (long_job.status, long_job.attempts, long_job.delivered) == (JobStatus.DONE, 2, True)
    assert survivor.poll() is None


async def test_jobs_are_spread_over_both_workers(simcord_env, store, workers, tmp_path):
    servers = [simcord_env.create_guild(f"Server {n}") for n in range(4)]
    channels = [server.create_text_channel("music") for server in servers]
    members = [
        server.add_member(simcord_env.create_user(f"member{n}")) for n, server in enumerate(servers)
    ]
    workers.start(tmp_path / "worker-1.log")
    workers.start(tmp_path / "worker-2.log")
    await until(lambda: workers.alive() and _count_workers(store, 2), "both workers to register")
    for number, (member, channel) in enumerate(zip(members, channels, strict=True)):
        # Different durations: jobs that cannot share a batch.
        await member.slash(channel, "music generate", prompt="x", duration=4.0 + number)
    await until(lambda: len(tracks(*channels)) >= 4, "every track", seconds=240, env=simcord_env)
    for log in ("worker-1.log", "worker-2.log"):  # each finished some of them
        assert "event=finished" in (tmp_path / log).read_text()


async def test_cancel_reaches_a_job_running_in_another_process(
    simcord_env, store, workers, tmp_path
):
    guild = simcord_env.create_guild("Jam")
    channel = guild.create_text_channel("music")
    alice = guild.add_member(simcord_env.create_user("alice"))
    workers.start(tmp_path / "worker.log")
    await until(lambda: workers.alive() and _count_workers(store, 1), "the worker to register")
    queued = await alice.slash(channel, "music generate", prompt="long", duration=60.0)
    (job,) = await until(lambda: _running(store), "the job to start", env=simcord_env)
    await until(lambda: _progressed(store, job.id), "the job to progress")
    cancelled = await alice.slash(channel, "music cancel", job=job.id)
    assert "Stopping job" in cancelled.response.content
    ended = await until(lambda: _ended(store, job.id), "the job to stop", seconds=60)
    assert ended.status is JobStatus.CANCELLED
    await until(
        lambda: "was cancelled" in queued.response.content or _edited(channel, job.id),
        "the member to be told",
        env=simcord_env,
    )


async def _count_workers(store, count: int) -> bool:
    return len(await store.workers(time.time() - 60)) >= count


async def _running(store):
    return await store.running()


async def _progressed(store, job_id: int) -> bool:
    job = await store.get(job_id)
    return job is not None and job.progress[0] > 0


async def _ended(store, job_id: int):
    job = await store.get(job_id)
    live = (JobStatus.QUEUED, JobStatus.RUNNING)
    return job if job is not None and job.status not in live else None


def _edited(channel, job_id: int) -> bool:
    return any(f"Job #{job_id} was cancelled" in m.content for m in channel.history())


#: Runs ``musicgen-bot worker`` and reports, as it exits, whether discord.py was loaded.
WORKER_PROBE = """
import runpy, sys
sys.argv = ["musicgen-bot", *sys.argv[1:]]
try:
    runpy.run_module("bot.cli", run_name="__main__")
finally:
    print("discord loaded:", "discord" in sys.modules, file=sys.stderr)
"""


async def test_a_worker_generates_without_importing_discord(store, workers, tmp_path):
    log = tmp_path / "probe.log"
    process = subprocess.Popen(
        [sys.executable, "-c", WORKER_PROBE, "worker", "--config", str(workers.config)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    try:
        await until(lambda: _count_workers(store, 1), "the worker to register", seconds=60)
        job = await store.add(Job(0, GenerationRequest("hum", "debug", duration=0.5), 1, 1, 1))
        await store.release(job, None)
        await until(lambda: _ended(store, job.id), "the job to be generated", seconds=60)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    assert (await store.get(job.id)).status is JobStatus.DONE
    assert "discord loaded: False" in log.read_text()


async def test_a_gateway_restart_loses_nothing(simcord_env, store, workers, database, tmp_path):
    guild = simcord_env.create_guild("Jam")
    channel = guild.create_text_channel("music")
    alice = guild.add_member(simcord_env.create_user("alice"))
    for prompt in ("one", "two"):
        await alice.slash(channel, "music generate", prompt=prompt, duration=2.0)
    # The gateway goes down with both jobs queued; a worker makes them meanwhile.
    gateway = await PostgresStore.open(database)
    gateway.subscribe = lambda channel, listener: None  # as the gateway_store fixture says
    await simcord_env.restart_bot(
        make_bot(database, generates=False, store=gateway, queue={"lease_seconds": LEASE})
    )
    workers.start(tmp_path / "worker.log")
    done = await until(
        lambda: len(tracks(channel)) >= 2 and tracks(channel), "both tracks", env=simcord_env
    )
    assert sorted(message.embeds[0].title for message in done) == ["one", "two"]
    await until(lambda: _all_delivered(store), "both to be marked delivered")
    await simcord_env.advance_time(5)  # and no second delivery after that
    assert len(tracks(channel)) == 2


async def _all_delivered(store) -> bool:
    jobs = [await store.get(number) for number in (1, 2)]
    return all(job is not None and job.delivered for job in jobs)

"""Both job stores (through the ``store`` fixture): jobs, uploads, results, settings, jams,
retention, stats; and the SQLite store's own: its file, its lock, its migrations."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from generation.audio.stored import content_hash
from generation.errors import ResultMissing
from generation.jobs import sqlite as store_module
from generation.jobs.job import ClipRecord, Job, JobStatus, ReplyAddress
from generation.jobs.postgres import store as postgres_module
from generation.jobs.retention import DAY, Retention
from generation.jobs.sqlite import (
    MIGRATIONS,
    STATS_COUNTS,
    STATS_RECENT,
    Expired,
    GuildSettings,
    Jam,
    Pruned,
    Segment,
    SqliteStore,
    StoreError,
)
from generation.jobs.store import WorkerInfo
from generation.origin import Origin, OriginKind
from generation.request import AudioClip, GenerationRequest

from .helpers import sine
from .stores import has_result, lose_result, sql, start, upload_rows

REQUEST = GenerationRequest(prompt="lo-fi", model="debug", seed=3, top_p=0.5)


@pytest.fixture
async def sqlite_store(tmp_path):
    store = await SqliteStore.open(tmp_path / "bot.sqlite3")
    yield store
    await store.close()


async def test_the_schema_is_versioned_and_the_journal_is_wal(sqlite_store, tmp_path):
    connection = sqlite3.connect(tmp_path / "bot.sqlite3")
    assert connection.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    connection.close()


async def test_a_job_keeps_every_request_field_its_audio_and_its_reply_address(store):
    melody = AudioClip(sine(1.5, 440.0, 44_100, channels=2), 44_100)
    job = await store.add(
        Job(0, GenerationRequest(**{**REQUEST.__dict__, "melody": melody}), 1, 2, 3)
    )
    reply = ReplyAddress(
        application_id=9, token="secret", expires_at=1e9, message_id=77, max_upload_bytes=1024
    )
    await store.release(job, reply)
    (loaded,) = await store.history(1, 3)
    await store.load_uploads(loaded)
    assert loaded.id == job.id and loaded.status is JobStatus.QUEUED
    assert (loaded.guild_id, loaded.channel_id, loaded.user_id) == (1, 2, 3)
    assert loaded.reply == reply
    assert loaded.request.top_p == 0.5 and loaded.request.seed == 3
    # The job runs the clip as the store keeps it (24-bit), and that is what comes back.
    np.testing.assert_array_equal(loaded.request.melody.samples, job.request.melody.samples)
    np.testing.assert_allclose(loaded.request.melody.samples, melody.samples, atol=2**-23)
    assert loaded.request.melody.sample_rate == 44_100
    assert "secret" not in repr(loaded)


async def test_jobs_read_back_come_without_their_clips_until_loaded(store):
    melody = AudioClip(sine(1.0, 440.0), 32_000)
    with_melody = await store.add(Job(0, replace(REQUEST, melody=melody), 1, 2, 3))
    plain = await store.add(Job(0, REQUEST, 1, 2, 3))
    other, loaded = await store.history(1, 3)
    assert (loaded.request.melody, loaded.uploads_in_store) == (None, True)
    assert not other.uploads_in_store
    await store.load_uploads(loaded)
    assert not loaded.uploads_in_store
    np.testing.assert_array_equal(loaded.request.melody.samples, with_melody.request.melody.samples)
    await store.load_uploads(other)
    assert other.request == plain.request


async def test_every_read_of_a_job_carries_its_clips_lengths_and_hashes(store):
    melody = AudioClip(sine(1.5, 440.0), 32_000)
    intro = AudioClip(sine(2.0, 220.0), 32_000)
    job = await store.add(Job(0, replace(REQUEST, melody=melody, continuation=intro), 1, 2, 3))
    plain = await store.add(Job(0, REQUEST, 1, 2, 3))
    clips = {
        "melody": ClipRecord(1.5, content_hash(job.request.melody)),
        "continuation": ClipRecord(2.0, content_hash(job.request.continuation)),
    }
    assert job.clips == clips and plain.clips == {}
    assert (await store.get(job.id)).clips == clips  # with its audio
    (_, read) = await store.history(1, 3)  # without
    assert (read.clips, read.uploads_in_store) == (clips, True)
    await store.release(job, None)
    (claimed,) = await claim_one(store)
    assert claimed.clips == clips
    await store.finish(claimed, JobStatus.DONE)
    await store.mark_delivered(claimed)
    await sql(
        store, "UPDATE jobs SET finished_at = ? WHERE id = ?", (time.time() - 9 * DAY, job.id)
    )
    assert (await store.prune(Retention(uploads_days=7))).uploads == 2
    expired = await store.get(job.id)  # the clips are gone, what they were is kept
    assert (expired.clips, expired.request.melody) == (clips, None)


async def claim_one(store):
    return await store.claim(
        "worker", models=None, loaded=(), max_rows=1, max_model_wait=0.0, lease_seconds=60.0
    )


async def test_claiming_is_atomic_and_counts_attempts(store):
    job = await start(store, await store.add(Job(0, REQUEST, 1, 1, 1)))
    assert await claim_one(store) == []  # already running
    assert job.attempts == 1
    assert await store.requeue(job) is True
    assert [claimed.id for claimed in await claim_one(store)] == [job.id]
    assert (await store.get(job.id)).attempts == 2


async def test_a_shutdown_requeue_does_not_count_the_attempt(store):
    job = await start(store, await store.add(Job(0, REQUEST, 1, 1, 1)))
    await store.requeue(job, count_attempt=False)
    stored = await store.get(job.id)
    assert (stored.status, stored.attempts) == (JobStatus.QUEUED, 0)


async def test_outcomes_wait_for_delivery(store):
    job = await start(store, await store.add(Job(0, REQUEST, 1, 1, 1)))
    await store.save_result(job, sine(1.0, 440.0), 32_000)
    await store.finish(job, JobStatus.DONE)
    assert [j.id for j in await store.undelivered()] == [job.id]
    audio, rate = await store.load_result(job)
    assert rate == 32_000
    np.testing.assert_allclose(audio, sine(1.0, 440.0), atol=1e-6)
    await store.mark_delivered(job, "https://discord.com/channels/1/2/3")
    assert await store.undelivered() == []
    (latest,) = await store.history(1, 1)
    assert latest.result_url == "https://discord.com/channels/1/2/3"


async def test_a_result_gone_is_named_not_returned_as_nothing(store):
    job = await start(store, await store.add(Job(0, REQUEST, 1, 1, 1)))
    await store.save_result(job, sine(1.0, 440.0), 32_000)
    await store.finish(job, JobStatus.DONE)
    await lose_result(store, job)
    with pytest.raises(ResultMissing, match=f"track of job #{job.id} is no longer kept"):
        await store.load_result(job)


async def test_settings_round_trip(store):
    assert await store.guild_settings(5) == GuildSettings(5)
    settings = GuildSettings(
        5,
        default_model="debug",
        allowed_models=("debug",),
        max_duration=20.0,
        max_jobs_per_user=1,
        allowed_channels=(7,),
        paused=True,
    )
    await store.save_guild_settings(settings)
    assert await store.guild_settings(5) == settings
    assert await store.paused_guilds() == [5]


async def test_stats_count_outcomes_and_take_medians(store):
    for status, seconds in (
        (JobStatus.DONE, 2.0),
        (JobStatus.DONE, 4.0),
        (JobStatus.FAILED, None),
        (JobStatus.CANCELLED, None),
    ):
        job = await start(store, await store.add(Job(0, REQUEST, 1, 1, 1)))
        job.generation_seconds = seconds
        await store.finish(job, status)
    stats = await store.stats(1)
    assert (stats.served, stats.failed, stats.cancelled) == (2, 1, 1)
    assert stats.median_generation_seconds == 3.0
    assert stats.median_wait_seconds is not None


async def test_data_survives_reopening(tmp_path):
    store = await SqliteStore.open(tmp_path / "bot.sqlite3")
    job = await store.add(Job(0, REQUEST, 1, 1, 1))
    await store.close()
    store = await SqliteStore.open(tmp_path / "bot.sqlite3")
    assert [j.id for j in await store.history(1, 1)] == [job.id]
    await store.close()


@pytest.mark.parametrize(
    "content",
    [b"this is not a database" * 100, b"SQLite format 3\x00" + bytes(200)],
    ids=["text", "truncated"],
)
async def test_a_damaged_database_is_refused_and_left_untouched(tmp_path, content):
    path = tmp_path / "bot.sqlite3"
    path.write_bytes(content)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(StoreError, match=r"cannot be read.*left as it is"):
        await SqliteStore.open(path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bot.sqlite3", "bot.sqlite3.lock"]


async def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "bot.sqlite3"
    connection = sqlite3.connect(path)
    connection.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    connection.close()
    with pytest.raises(StoreError, match="newer"):
        await SqliteStore.open(path)


async def test_a_jam_keeps_its_turns_in_order(store):
    jam = Jam(50, guild_id=1, channel_id=2, user_id=3, title="Late", timeline_message_id=9)
    await store.add_jam(jam)
    first = await store.add(Job(0, REQUEST, 1, 50, 3))
    second = await store.add(Job(0, REQUEST, 1, 50, 4))
    assert await store.add_segment(jam, first) == Segment(1, first.id, 3)
    assert await store.add_segment(jam, second) == Segment(2, second.id, 4)
    assert await store.jam(50) == jam
    assert await store.segments(50) == [Segment(1, first.id, 3), Segment(2, second.id, 4)]
    assert await store.jam_of_job(second.id) == jam
    assert await store.jam(51) is None and await store.jam_of_job(999) is None


def sqlite_upload_rows(path) -> tuple[int, int]:
    """(stored clips, job references to them) in the SQLite database at ``path``."""
    connection = sqlite3.connect(path)
    counts = tuple(
        connection.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
        for table in ("uploads", "job_uploads")
    )
    connection.close()
    return counts


async def test_re_rolls_of_a_job_with_a_melody_store_the_melody_once(store):
    """Each Re-roll records the source job's request again: the melody must not be."""
    melody = AudioClip(sine(20.0, 440.0, 32_000, channels=2), 32_000)
    first = await store.add(Job(0, replace(REQUEST, melody=melody), 1, 2, 3))
    for _ in range(5):
        source = await store.get(first.id)
        await store.add(Job(0, replace(source.request, seed=None), 1, 2, 3))
    assert await upload_rows(store) == (1, 6)
    for job in await store.history(1, 3):
        await store.load_uploads(job)
        np.testing.assert_array_equal(job.request.melody.samples, first.request.melody.samples)


async def test_a_clip_is_kept_without_loss_and_loud_ones_without_clipping(store):
    loud = sine(1.0, 220.0, 32_000, channels=2) * 6.0  # peaks at 1.8: a decoder can do that
    noisy = np.random.default_rng(1).normal(0, 0.3, (1, 32_000)).astype(np.float32)
    for samples in (loud, noisy):
        job = await store.add(
            Job(0, replace(REQUEST, continuation=AudioClip(samples, 32_000)), 1, 1, 1)
        )
        kept = job.request.continuation.samples
        np.testing.assert_allclose(kept, samples, atol=2.0 * 2**-23)
        loaded = (await store.get(job.id)).request.continuation
        np.testing.assert_array_equal(loaded.samples, kept)
        assert content_hash(loaded) == content_hash(AudioClip(samples, 32_000))


async def test_version_3_uploads_move_to_the_shared_store(tmp_path):
    """A database written by the previous version, with one melody used by two jobs."""
    path = tmp_path / "bot.sqlite3"
    connection = sqlite3.connect(path)
    for version, script in enumerate(MIGRATIONS[:3], start=1):
        connection.executescript(f"{script}; PRAGMA user_version = {version};")
    melody = sine(3.0, 330.0, 32_000, channels=2)
    intro = sine(2.0, 550.0, 32_000)
    rows = [(1, "melody", melody), (2, "melody", melody), (3, "continuation", intro)]
    for job_id, option, samples in rows:
        connection.execute(
            """INSERT INTO jobs (id, guild_id, channel_id, user_id, request, status, submitted_at)
               VALUES (?, 1, 2, 3, ?, 'queued', 0)""",
            (job_id, json.dumps({"prompt": f"job {job_id}", "model": "debug", "seed": 1})),
        )
        connection.execute(
            "INSERT INTO uploads VALUES (?, ?, 32000, ?, ?)",
            (job_id, option, samples.shape[0], samples.astype("<f4").tobytes()),
        )
    connection.commit()
    connection.close()

    store = await SqliteStore.open(path)
    jobs = {job.id: job for job in await store.history(1, 3)}
    for job in jobs.values():
        await store.load_uploads(job)
    await store.close()
    assert sqlite_upload_rows(path) == (2, 3)
    np.testing.assert_allclose(jobs[1].request.melody.samples, melody, atol=2**-23)
    np.testing.assert_array_equal(jobs[2].request.melody.samples, jobs[1].request.melody.samples)
    np.testing.assert_allclose(jobs[3].request.continuation.samples, intro, atol=2**-23)
    assert jobs[3].request.melody is None and jobs[1].request.prompt == "job 1"
    connection = sqlite3.connect(path)
    assert connection.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    assert "uploads_v3" not in tables
    # Each job's clip knows its length, read from the FLAC's header (for jams' intros).
    lengths = dict(connection.execute("SELECT job_id, seconds FROM job_uploads"))
    connection.close()
    assert lengths == {1: 3.0, 2: 3.0, 3: 2.0}


async def test_tokens_are_forgotten_once_delivered_or_expired(store):
    now = time.time()
    jobs = []
    for expires_at in (now + 900, now + 900, now - 1):
        job = await store.add(Job(0, REQUEST, 1, 1, 1))
        await store.release(job, ReplyAddress(9, f"token-{job.id}", expires_at, 5, 1024))
        jobs.append(job)
    delivered, waiting, expired = jobs
    await store.finish(delivered, JobStatus.DONE)
    await store.mark_delivered(delivered)
    assert delivered.reply.token is None
    assert await store.clear_expired_tokens(now) == 1
    assert dict(await sql(store, "SELECT id, reply_token FROM jobs")) == {
        delivered.id: None,
        waiting.id: f"token-{waiting.id}",
        expired.id: None,
    }
    assert (await store.get(waiting.id)).reply.token == f"token-{waiting.id}"
    # The message each job answered with stays, to link to.
    for job in (delivered, expired):
        assert (await store.get(job.id)).reply == ReplyAddress(
            9, None, job.reply.expires_at, 5, 1024
        )


async def finished(store, request=REQUEST, *, delivered=True, days_ago=0.0, takes=1) -> Job:
    """A job that finished ``days_ago``, with a result file per take."""
    job = await start(store, await store.add(Job(0, request, 1, 2, 3, takes=takes)))
    for take in range(takes):
        await store.save_result(job, sine(0.5, 440.0), 32_000, take)
    await store.finish(job, JobStatus.DONE)
    if delivered:
        await store.mark_delivered(job, "https://discord.com/channels/1/2/3")
    await sql(
        store,
        "UPDATE jobs SET finished_at = ? WHERE id = ?",
        (time.time() - days_ago * DAY, job.id),
    )
    return job


async def test_pruning_deletes_what_the_policy_no_longer_keeps(store):
    retention = Retention(results_days=30, uploads_days=30, jobs_days=365)
    melody = replace(REQUEST, melody=AudioClip(sine(2.0, 440.0, 32_000), 32_000))
    old = await finished(store, melody, days_ago=40, takes=2)
    undelivered = await finished(store, melody, delivered=False, days_ago=40)
    recent = await finished(store, days_ago=10)
    ancient = await finished(store, days_ago=400)
    queued = await store.add(Job(0, replace(REQUEST, melody=melody.melody), 1, 2, 3))

    pruned = await store.prune(retention)

    assert (pruned.results, pruned.jobs) == (1, 1)
    assert await store.get(ancient.id) is None
    assert not await has_result(store, ancient)
    old = await store.get(old.id)
    assert old.result_expired_at is not None and old.uploads_expired_at is not None
    assert not await has_result(store, old, 0) and not await has_result(store, old, 1)
    with pytest.raises(Expired, match=rf"job #{old.id} expired on \d{{4}}-\d\d-\d\d"):
        await store.load_result(old)
    assert await store.load_result(recent) is not None
    assert await store.load_result(undelivered) is not None  # never pruned before delivery
    # The melody is still used by a live job and an undelivered one: kept.
    assert pruned.uploads == 0 and (await upload_rows(store))[0] == 1
    assert (await store.get(queued.id)).request.melody is not None
    assert [job.id for job in await store.history(1, 3, limit=10)] == [
        queued.id,
        recent.id,
        undelivered.id,
        old.id,
    ]


async def test_a_clip_goes_when_no_job_within_the_period_uses_it(store):
    melody = replace(REQUEST, melody=AudioClip(sine(2.0, 440.0, 32_000), 32_000))
    job = await finished(store, melody, days_ago=8)
    assert (await store.prune(Retention(uploads_days=10))).uploads == 0
    pruned = await store.prune(Retention(uploads_days=7))
    assert pruned.uploads == 1 and await upload_rows(store) == (0, 1)  # the hash stays known
    expired = await store.get(job.id)
    assert expired.request.melody is None and expired.uploads_expired_at is not None
    assert (await store.load_result(expired)) is not None  # results have their own period


async def test_zero_keeps_everything_forever(store):
    job = await finished(store, days_ago=10_000)
    assert await store.prune(Retention(0, 0, 0)) == Pruned(0, 0, 0, 0)
    assert await store.load_result(await store.get(job.id)) is not None


async def test_a_jam_goes_only_when_all_its_turns_have(store):
    jam = Jam(50, guild_id=1, channel_id=2, user_id=3, title="Old")
    await store.add_jam(jam)
    first = await finished(store, days_ago=400)
    second = await finished(store, days_ago=10)
    await store.add_segment(jam, first)
    await store.add_segment(jam, second)
    await sql(store, "UPDATE jams SET created_at = ?", (time.time() - 500 * DAY,))
    assert (await store.prune(Retention(jobs_days=365))).jobs == 0
    assert len(await store.segments(50)) == 2
    assert (await store.prune(Retention(jobs_days=5))).jobs == 2
    assert await store.jam(50) is None and await store.get(first.id) is None


async def test_a_job_keeps_its_origin(store):
    origin = Origin(OriginKind.CONTINUATION, job_id=4, take=2, jam=99, turn=3)
    job = await store.add(Job(0, REQUEST, 1, 2, 3, origin=origin))
    assert (await store.get(job.id)).origin == origin
    upload = Origin(OriginKind.UPLOAD_MELODY, filename="tune.wav")
    assert (
        await store.get((await store.add(Job(0, REQUEST, 1, 2, 3, origin=upload))).id)
    ).origin == upload
    assert (await store.get((await store.add(Job(0, REQUEST, 1, 2, 3))).id)).origin is None


async def test_finished_jobs_are_read_newest_first(store):
    jobs = [await store.add(Job(0, REQUEST, 1, 1, user)) for user in (5, 6, 5, 5)]
    for job in jobs[:3]:
        await store.finish(job, JobStatus.DONE)
    assert [job.id for job in await store.finished_jobs(1, 5)] == [jobs[2].id, jobs[0].id]
    assert [job.id for job in await store.finished_jobs(1)] == [j.id for j in jobs[2::-1]]
    assert [job.id for job in await store.finished_jobs(1, limit=1)] == [jobs[2].id]
    assert await store.finished_jobs(2, 5) == []


async def test_sqlite_reads_finished_jobs_through_an_index(sqlite_store, tmp_path):
    connection = sqlite3.connect(tmp_path / "bot.sqlite3")
    for member in ("AND user_id = 5", ""):
        plan = " ".join(
            row[-1]
            for row in connection.execute(
                f"EXPLAIN QUERY PLAN SELECT * FROM jobs WHERE guild_id = 1 {member} "
                "AND status = 'done' ORDER BY id DESC LIMIT 25"
            )
        )
        assert "USING INDEX" in plan and "TEMP B-TREE" not in plan, plan
    connection.close()


IN_USE = r"bot\.sqlite3 is in use by another musicgen-bot process: stop it first"

HOLD_STORE = """
import asyncio, sys
from generation.jobs.sqlite import SqliteStore

async def hold():
    await SqliteStore.open(sys.argv[1])
    print("open", flush=True)
    await asyncio.sleep(600)

asyncio.run(hold())
"""


async def test_a_second_owner_is_refused_until_the_first_closes(sqlite_store, tmp_path):
    with pytest.raises(StoreError, match=IN_USE):
        await SqliteStore.open(tmp_path / "bot.sqlite3")
    await sqlite_store.close()
    again = await SqliteStore.open(tmp_path / "bot.sqlite3")
    await again.close()


async def test_a_killed_owner_leaves_no_lock_behind(tmp_path):
    path = tmp_path / "bot.sqlite3"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_STORE, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    try:
        assert await asyncio.to_thread(holder.stdout.readline) == "open\n"
        with pytest.raises(StoreError, match=IN_USE):  # another process owns it
            await SqliteStore.open(path)
    finally:
        holder.send_signal(signal.SIGKILL)
        await asyncio.to_thread(holder.wait)
        holder.stdout.close()
    store = await SqliteStore.open(path)
    await store.close()


async def test_a_store_that_does_not_own_opens_beside_the_owner_and_prunes(sqlite_store, tmp_path):
    store = sqlite_store
    job = await start(store, await store.add(Job(0, REQUEST, 1, 1, 1)))
    await store.finish(job, JobStatus.DONE)
    await store.mark_delivered(job)
    pruner = await SqliteStore.open(tmp_path / "bot.sqlite3", owner=False)
    try:
        pruned = await pruner.prune(Retention(jobs_days=1), now=time.time() + 2 * DAY)
    finally:
        await pruner.close()
    assert pruned.jobs == 1
    assert await store.get(job.id) is None
    with pytest.raises(StoreError, match=IN_USE):  # and the owner still holds it
        await SqliteStore.open(tmp_path / "bot.sqlite3")


async def ended(store, guild_id, status, *, started=True, seconds=None, finished_at=None):
    """A job of ``guild_id`` that ended with ``status`` (cancelled before it ran unless
    ``started``), settled: its requester was told."""
    job = await store.add(Job(0, REQUEST, guild_id, 1, 1))
    if started:
        await start(store, job)
    job.generation_seconds = seconds
    await store.finish(job, status)
    await store.mark_delivered(job)
    if finished_at is not None:
        await sql(store, "UPDATE jobs SET finished_at = ? WHERE id = ?", (finished_at, job.id))
    return job


async def test_stats_follow_finishes_cancellations_and_pruning(store, monkeypatch):
    for module in (store_module, postgres_module):
        monkeypatch.setattr(module, "MEDIAN_OF", 3)
    old = time.time() - 10 * DAY
    await ended(store, 1, JobStatus.DONE, seconds=100.0, finished_at=old)
    await ended(store, 1, JobStatus.FAILED, finished_at=old)
    await ended(store, 1, JobStatus.DONE, seconds=1.0)
    await ended(store, 1, JobStatus.DONE, seconds=3.0)
    await ended(store, 1, JobStatus.CANCELLED, started=False)  # never ran: no wait
    await ended(store, 2, JobStatus.DONE, seconds=50.0)  # another server
    running = await start(store, await store.add(Job(0, REQUEST, 1, 1, 1)))
    await store.add(Job(0, REQUEST, 1, 1, 1))  # queued
    stats = await store.stats(1)
    assert (stats.served, stats.failed, stats.cancelled) == (3, 1, 1)
    # The last 3 finished: 1.0 s, 3.0 s and the cancelled job (which has neither).
    assert (stats.median_generation_seconds, stats.median_of) == (2.0, 3)
    assert 0 <= stats.median_wait_seconds < 60
    await store.finish(running, JobStatus.CANCELLED)  # cancelled while it ran
    assert (await store.stats(1)).cancelled == 2
    await store.finish(running, JobStatus.CANCELLED)  # told twice, counted once
    assert (await store.stats(1)).cancelled == 2

    pruned = await store.prune(Retention(jobs_days=5))
    assert pruned.jobs == 2
    stats = await store.stats(1)
    assert (stats.served, stats.failed, stats.cancelled) == (2, 0, 2)
    assert stats.median_generation_seconds == 3.0  # the running job's cancel is the latest
    assert (await store.stats(2)).served == 1
    assert await store.stats(3) == store_module.Stats(0, 0, 0, None, None, 3)


#: A request as older versions kept it (every field but the clips, as JSON).
OLD_REQUEST = json.dumps({"prompt": "old", "model": "debug", "duration": 1.0})


async def test_an_upgraded_database_counts_the_jobs_it_already_had(tmp_path, monkeypatch):
    counted_from = next(
        index
        for index, migration in enumerate(MIGRATIONS)
        if isinstance(migration, str) and "job_counts" in migration
    )
    monkeypatch.setattr(store_module, "MIGRATIONS", MIGRATIONS[:counted_from])
    store = await SqliteStore.open(tmp_path / "bot.sqlite3")
    await store.close()
    monkeypatch.setattr(store_module, "MIGRATIONS", MIGRATIONS)
    with sqlite3.connect(tmp_path / "bot.sqlite3") as connection:  # jobs as that version kept
        connection.executemany(
            """INSERT INTO jobs (guild_id, channel_id, user_id, request, status, submitted_at,
                   started_at, finished_at, generation_seconds, delivered)
               VALUES (1, 1, 1, ?, ?, 0, 1, 2, ?, 1)""",
            [
                (OLD_REQUEST, "done", 2.0),
                (OLD_REQUEST, "failed", None),
            ],
        )
    store = await SqliteStore.open(tmp_path / "bot.sqlite3")
    try:
        stats = await store.stats(1)
    finally:
        await store.close()
    assert (stats.served, stats.failed, stats.cancelled) == (1, 1, 0)
    assert stats.median_generation_seconds == 2.0


def test_the_stats_read_through_indexes_not_the_whole_history(sqlite_store, tmp_path):
    connection = sqlite3.connect(tmp_path / "bot.sqlite3")
    plans = [
        " ".join(row[3] for row in connection.execute(f"EXPLAIN QUERY PLAN {query}", values))
        for query, values in ((STATS_COUNTS, (1,)), (STATS_RECENT, (1, 10)))
    ]
    connection.close()
    assert plans[0] == "SEARCH job_counts USING PRIMARY KEY (guild_id=?)"
    # The newest first, straight from the index: no sort, whatever the history's size.
    assert plans[1] == (
        "SEARCH jobs USING INDEX jobs_finished_by_guild (guild_id=? AND finished_at>?)"
    )


async def test_pruning_forgets_workers_silent_for_a_day(store):
    now = time.time()
    for name, seen_at in (("gone", now - 2 * DAY), ("alive", now - 60)):
        await store.register_worker(WorkerInfo(name, "host", "cpu", (), started_at=0, seen_at=0))
        await sql(store, "UPDATE workers SET seen_at = ? WHERE id = ?", (seen_at, name))
    await store.prune(Retention(), now=now)
    assert [worker.id for worker in await store.workers(seen_since=0.0)] == ["alive"]

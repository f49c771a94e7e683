"""The SQLite store: schema, atomic claims, uploads, results, settings, a damaged file."""

from __future__ import annotations

import hashlib
import sqlite3

import numpy as np
import pytest

from generation.origin import Origin, OriginKind
from generation.queue import Job, JobStatus, ReplyAddress
from generation.request import AudioClip, GenerationRequest
from generation.store import MIGRATIONS, GuildSettings, Jam, JobStore, Segment, StoreError

from .helpers import sine

REQUEST = GenerationRequest(prompt="lo-fi", model="debug", seed=3, top_p=0.5)


@pytest.fixture
async def store(tmp_path):
    store = await JobStore.open(tmp_path / "bot.sqlite3")
    yield store
    await store.close()


async def test_the_schema_is_versioned_and_the_journal_is_wal(store, tmp_path):
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
    await store.set_reply(job, reply)
    (loaded,) = await store.pending()
    assert loaded.id == job.id and loaded.status is JobStatus.QUEUED
    assert (loaded.guild_id, loaded.channel_id, loaded.user_id) == (1, 2, 3)
    assert loaded.reply == reply
    assert loaded.request.top_p == 0.5 and loaded.request.seed == 3
    np.testing.assert_array_equal(loaded.request.melody.samples, melody.samples)
    assert loaded.request.melody.sample_rate == 44_100
    assert "secret" not in repr(loaded)


async def test_claiming_is_atomic_and_counts_attempts(store):
    job = await store.add(Job(0, REQUEST, 1, 1, 1))
    assert await store.claim(job) is True
    assert await store.claim(job) is False  # already running
    assert job.attempts == 1
    await store.requeue(job)
    assert await store.claim(job) is True
    assert (await store.get(job.id)).attempts == 2


async def test_a_shutdown_requeue_does_not_count_the_attempt(store):
    job = await store.add(Job(0, REQUEST, 1, 1, 1))
    await store.claim(job)
    await store.requeue(job, count_attempt=False)
    stored = await store.get(job.id)
    assert (stored.status, stored.attempts) == (JobStatus.QUEUED, 0)


async def test_outcomes_wait_for_delivery(store):
    job = await store.add(Job(0, REQUEST, 1, 1, 1))
    await store.claim(job)
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
        job = await store.add(Job(0, REQUEST, 1, 1, 1))
        await store.claim(job)
        job.generation_seconds = seconds
        await store.finish(job, status)
    stats = await store.stats(1)
    assert (stats.served, stats.failed, stats.cancelled) == (2, 1, 1)
    assert stats.median_generation_seconds == 3.0
    assert stats.median_wait_seconds is not None


async def test_data_survives_reopening(tmp_path):
    store = await JobStore.open(tmp_path / "bot.sqlite3")
    job = await store.add(Job(0, REQUEST, 1, 1, 1))
    await store.close()
    store = await JobStore.open(tmp_path / "bot.sqlite3")
    assert [j.id for j in await store.pending()] == [job.id]
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
        await JobStore.open(path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bot.sqlite3"]


async def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "bot.sqlite3"
    connection = sqlite3.connect(path)
    connection.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    connection.close()
    with pytest.raises(StoreError, match="newer"):
        await JobStore.open(path)


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


async def test_a_job_keeps_its_origin(store):
    origin = Origin(OriginKind.CONTINUATION, job_id=4, take=2, jam=99, turn=3)
    job = await store.add(Job(0, REQUEST, 1, 2, 3, origin=origin))
    assert (await store.get(job.id)).origin == origin
    upload = Origin(OriginKind.UPLOAD_MELODY, filename="tune.wav")
    assert (
        await store.get((await store.add(Job(0, REQUEST, 1, 2, 3, origin=upload))).id)
    ).origin == upload
    assert (await store.get((await store.add(Job(0, REQUEST, 1, 2, 3))).id)).origin is None


async def test_finished_jobs_are_read_newest_first_through_an_index(store, tmp_path):
    jobs = [await store.add(Job(0, REQUEST, 1, 1, user)) for user in (5, 6, 5, 5)]
    for job in jobs[:3]:
        await store.finish(job, JobStatus.DONE)
    assert [job.id for job in await store.finished_jobs(1, 5)] == [jobs[2].id, jobs[0].id]
    assert [job.id for job in await store.finished_jobs(1)] == [j.id for j in jobs[2::-1]]
    assert [job.id for job in await store.finished_jobs(1, limit=1)] == [jobs[2].id]
    assert await store.finished_jobs(2, 5) == []
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

"""``musicgen-bot migrate``: an SQLite bot's history moves into PostgreSQL, ids and all."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest

from bot.cli import main
from generation.jobs.job import Job, JobStatus
from generation.jobs.postgres import PostgresStore
from generation.jobs.sqlite import SqliteStore
from generation.jobs.store import GuildSettings, Jam
from generation.request import AudioClip, GenerationRequest

from .helpers import sine
from .postgres import fresh_schema
from .stores import start

REQUEST = GenerationRequest(prompt="lo-fi", model="debug", duration=1.0, seed=3)


@pytest.fixture
async def target():
    async with fresh_schema("migrate") as url:
        yield url


def config_for(tmp_path, database) -> str:
    path = tmp_path / "config.toml"
    path.write_text(f'[storage]\ndatabase = "{database}"\n[generation]\nmodels = ["debug"]\n')
    return str(path)


async def test_jobs_results_uploads_settings_and_jams_move_with_their_ids(tmp_path, target, capsys):
    database = tmp_path / "bot.sqlite3"
    source = await SqliteStore.open(database)
    melody = AudioClip(sine(2.0, 440.0), 32_000)
    done = await source.add(Job(0, replace(REQUEST, melody=melody), 7, 1, 11))
    await start(source, done)
    track = sine(1.0, 220.0)
    await source.save_result(done, track, 32_000)
    await source.finish(done, JobStatus.DONE)
    await source.mark_delivered(done, "https://discord.com/channels/7/1/2")
    died = await source.add(Job(0, REQUEST, 8, 1, 12))
    await start(source, died)  # running when the bot stopped
    waiting = await source.add(Job(0, REQUEST, 7, 1, 13))
    await source.release(waiting, None)
    await source.save_guild_settings(GuildSettings(7, max_duration=20.0, paused=True))
    jam = Jam(99, 7, 1, 11, "Friday jam")
    await source.add_jam(jam)
    await source.add_segment(jam, done)
    await source.close()

    command = ["migrate", "--config", config_for(tmp_path, database), "--to", target]
    assert await asyncio.to_thread(main, command) == 0
    assert "1 result files" in capsys.readouterr().out

    store = await PostgresStore.open(target)
    try:
        moved = await store.get(done.id)
        assert (moved.status, moved.delivered, moved.result_url) == (
            JobStatus.DONE,
            True,
            "https://discord.com/channels/7/1/2",
        )
        audio, rate = await store.load_result(moved)
        assert rate == 32_000 and np.allclose(audio, track, atol=1e-6)
        assert np.allclose(moved.request.melody.samples, melody.samples, atol=1e-6)
        # The job that was running when the SQLite bot stopped waits for a worker again.
        assert (await store.get(died.id)).status is JobStatus.QUEUED
        assert [job.id for job in await store.queued(8)] == [died.id]
        assert (await store.guild_settings(7)).max_duration == 20.0
        assert await store.paused_guilds() == [7]
        assert [segment.job_id for segment in await store.segments(99)] == [done.id]
        # New jobs take ids after the old ones: links and jams keep pointing right.
        new = await store.add(Job(0, REQUEST, 9, 1, 14))
        assert new.id > waiting.id
    finally:
        await store.close()


async def test_a_database_that_holds_jobs_is_not_mixed_with_another(tmp_path, target, capsys):
    database = tmp_path / "bot.sqlite3"
    await (await SqliteStore.open(database)).close()
    store = await PostgresStore.open(target)
    await store.add(Job(0, REQUEST, 1, 1, 1))
    await store.close()
    command = ["migrate", "--config", config_for(tmp_path, database), "--to", target]
    assert await asyncio.to_thread(main, command) == 1
    assert "already holds jobs" in capsys.readouterr().err


def test_only_sqlite_moves_into_postgresql(tmp_path, capsys):
    config = config_for(tmp_path, tmp_path / "bot.sqlite3")
    with pytest.raises(SystemExit):
        main(["migrate", "--config", config, "--to", str(tmp_path / "other.sqlite3")])
    assert "--to must be a postgresql:// address" in capsys.readouterr().err

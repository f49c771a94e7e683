"""Nothing lost across restarts: SimCord keeps Discord, the SQLite file keeps the jobs."""

from __future__ import annotations

import sqlite3

import discord
import numpy as np
import pytest

from bot.cli import main
from generation.audio.stored import StoredClip
from generation.jobs.job import JobStatus
from generation.jobs.service import JobService
from generation.jobs.sqlite import SqliteStore

from .bot_helpers import fields, make_bot, mp3_of, outcome
from .helpers import encode_tone
from .stores import sql

pytestmark = pytest.mark.simcord(settle_timeout=60)


@pytest.fixture
def world(simcord_env):
    guild = simcord_env.create_guild("Jam Session")
    channel = guild.create_text_channel("music")
    mods = guild.create_role("Mods", permissions=discord.Permissions(manage_guild=True))
    alice = guild.add_member(simcord_env.create_user("alice"))
    admin = guild.add_member(simcord_env.create_user("mod"), roles=[mods])
    return channel, alice, admin


def tracks(channel) -> list[discord.Message]:
    return [message for message in channel.history() if message.attachments]


async def test_queued_jobs_survive_a_restart_and_are_delivered_once(simcord_env, world, database):
    channel, alice, admin = world
    await admin.slash(channel, "music admin pause")
    first = await alice.slash(channel, "music generate", prompt="first", duration=1.0)
    second = await alice.slash(channel, "music generate", prompt="second", duration=1.0)
    await simcord_env.restart_bot(make_bot(database))
    assert tracks(channel) == []  # still paused after the restart
    await admin.slash(channel, "music admin resume")
    assert outcome(first).attachments and outcome(second).attachments
    # One batch: the two results are posted as each is ready, once each.
    assert sorted(m.embeds[0].title for m in tracks(channel)) == ["first", "second"]


async def test_a_job_running_when_the_bot_died_runs_again_and_is_delivered_once(
    simcord_env, world, database
):
    channel, alice, admin = world
    await admin.slash(channel, "music admin pause")
    queued = await alice.slash(channel, "music generate", prompt="interrupted", duration=1.0)
    # The old process had started it, then died (its lease had not run out).
    store = await SqliteStore.open(database, owner=False)
    await sql(store, "DELETE FROM paused_guilds")
    (job,) = await store.claim(
        "dead", models=None, loaded=(), max_rows=1, max_model_wait=0.0, lease_seconds=3600.0
    )
    await sql(store, "INSERT INTO paused_guilds SELECT guild_id FROM guild_settings")
    await store.close()
    await simcord_env.restart_bot(make_bot(database))
    await admin.slash(channel, "music admin resume")
    assert outcome(queued).attachments
    assert len(tracks(channel)) == 1
    store = await SqliteStore.open(database, owner=False)
    finished = await store.get(job.id)
    await store.close()
    assert (finished.status, finished.attempts, finished.delivered) == (JobStatus.DONE, 2, True)


@pytest.fixture
def decoded_clips(monkeypatch) -> list[bytes]:
    """Every stored clip read back (each goes through ``StoredClip.from_flac``)."""
    decoded: list[bytes] = []
    from_flac = StoredClip.from_flac.__func__

    def counted(cls, data, exponent):
        decoded.append(data)
        return from_flac(cls, data, exponent)

    monkeypatch.setattr(StoredClip, "from_flac", classmethod(counted))
    return decoded


async def test_a_recovered_job_loads_its_melody_only_when_it_runs(
    simcord_env, world, database, tmp_path, decoded_clips
):
    channel, alice, admin = world
    melody = encode_tone(tmp_path / "m.ogg", seconds=2.0, frequency=523.0).read_bytes()
    request = dict(prompt="jazz", model="debug-melody", duration=1.0, seed=5)
    await admin.slash(channel, "music admin pause")
    queued = await alice.slash(channel, "music generate", **request, melody=("m.ogg", melody))
    await simcord_env.restart_bot(make_bot(database))
    assert decoded_clips == []  # recovered without its audio
    await admin.slash(channel, "music admin resume")
    assert len(decoded_clips) == 1  # loaded to run
    recovered = outcome(queued)
    assert fields(recovered)["Melody"] == "2.0 s clip"
    # The same request run without a restart makes the same track: it followed the melody.
    again = await alice.slash(channel, "music generate", **request, melody=("m.ogg", melody))
    np.testing.assert_array_equal(await mp3_of(recovered), await mp3_of(outcome(again)))


@pytest.mark.parametrize(
    ("damage", "told"),
    [
        ("UPDATE uploads SET flac = x'00'", "is damaged in the bot's database"),
        ("DELETE FROM uploads", "is no longer kept"),
    ],
)
async def test_a_recovered_job_whose_clip_is_lost_fails_and_says_so(
    simcord_env, world, database, tmp_path, damage, told
):
    channel, alice, admin = world
    melody = encode_tone(tmp_path / "m.ogg", seconds=1.0).read_bytes()
    await admin.slash(channel, "music admin pause")
    queued = await alice.slash(
        channel, "music generate", prompt="x", model="debug-melody", melody=("m.ogg", melody)
    )
    with sqlite3.connect(database) as db:
        db.execute(damage)
    await simcord_env.restart_bot(make_bot(database))
    await admin.slash(channel, "music admin resume")
    told_member = outcome(queued)
    assert told in told_member.content + "".join(e.description or "" for e in told_member.embeds)
    store = await SqliteStore.open(database, owner=False)
    (job,) = await store.history(channel.guild.id, alice.id)
    await store.close()
    assert (job.status, job.delivered) == (JobStatus.FAILED, True)
    assert told in job.error


async def test_the_bot_recovers_its_jobs_once_connected(simcord_env, world, database, monkeypatch):
    bot = make_bot(database)
    start = JobService.start
    ready_when_started: list[bool] = []

    async def recording(service, *now):
        ready_when_started.append(bot.is_ready())
        await start(service, *now)

    monkeypatch.setattr(JobService, "start", recording)
    await simcord_env.restart_bot(bot)
    assert ready_when_started == [True]
    assert bot.service.started


async def test_a_bot_that_cannot_recover_its_jobs_stops(simcord_env, world, database, monkeypatch):
    async def failing(service, *now):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(JobService, "start", failing)
    bot = make_bot(database)
    await simcord_env.restart_bot(bot)
    assert bot.is_closed()


async def test_after_the_token_expired_a_restarted_bot_posts_in_the_channel(
    simcord_env, world, database
):
    channel, alice, admin = world
    await admin.slash(channel, "music admin pause")
    queued = await alice.slash(channel, "music generate", prompt="late", duration=1.0)
    await simcord_env.advance_time(16 * 60)
    await simcord_env.restart_bot(make_bot(database))
    await admin.slash(channel, "music admin resume")
    assert not queued.response.attachments
    (delivered,) = tracks(channel)
    assert [user.id for user in delivered.mentions] == [alice.id]
    assert delivered.embeds[0].title == "late"


async def test_settings_survive_a_restart_and_take_effect(simcord_env, world, database):
    channel, alice, admin = world
    shown = await admin.slash(
        channel,
        "music admin settings",
        default_model="debug-stereo",
        allowed_models="debug, debug-stereo",
        max_duration=5.0,
        max_jobs_per_user=1,
    )
    assert shown.ephemeral
    await simcord_env.restart_bot(make_bot(database))

    current = await admin.slash(channel, "music admin settings")
    values = {f.name: f.value for f in current.response.embeds[0].fields}
    assert values["Default model"] == "debug-stereo"
    assert values["Allowed models"] == "debug, debug-stereo"
    assert values["Longest track"] == "5 s"

    made = await alice.slash(channel, "music generate", prompt="wide", duration=1.0)
    assert {f.name: f.value for f in outcome(made).embeds[0].fields}["Model"] == "debug-stereo"
    too_long = await alice.slash(channel, "music generate", prompt="x", duration=10.0)
    assert "up to 5 s" in too_long.response.content and too_long.ephemeral
    not_allowed = await alice.slash(channel, "music generate", prompt="x", model="debug-melody")
    assert "allows these models" in not_allowed.response.content


async def test_settings_limit_channels_and_need_manage_server(simcord_env, world):
    channel, alice, admin = world
    refused = await alice.slash(channel, "music admin settings", max_duration=5.0)
    assert "Manage Server" in refused.response.content
    jams = simcord_env.guild.create_text_channel("jams")
    await admin.slash(channel, "music admin settings", allow_channel=jams)
    elsewhere = await alice.slash(channel, "music generate", prompt="x", duration=1.0)
    assert f"music is made in <#{jams.id}>" in elsewhere.response.content
    here = await alice.slash(jams, "music generate", prompt="x", duration=1.0)
    assert outcome(here).attachments


async def test_history_lists_past_jobs_and_show_posts_one_again(world):
    channel, alice, _ = world
    made = await alice.slash(channel, "music generate", prompt="keeper", duration=1.0, seed=5)
    job_id = int(outcome(made).embeds[0].footer.text.removeprefix("Job #"))
    history = await alice.slash(channel, "music history")
    (entry,) = history.response.embeds[0].fields
    assert entry.name == f"#{job_id}: keeper"
    assert "seed 5" in entry.value and "debug, 1 s" in entry.value
    assert outcome(made).message.jump_url in entry.value

    shown = await alice.slash(channel, "music show", job=job_id)
    posted = shown.response
    assert posted.embeds[0].title == "keeper"
    values = {f.name: f.value for f in posted.embeds[0].fields}
    assert values["Seed"] == "5"
    # /music show gives every option, defaults too, and how it was made.
    assert (values["Top-k"], values["Two-step CFG"], values["Extend stride"]) == (
        "250",
        "off",
        "18 s",
    )
    assert "Generated in" in values and values["MP3"].endswith("kbit/s")
    assert posted.attachments[0].filename.endswith(".mp3")


async def test_stats_show_how_the_bot_is_doing(world):
    channel, alice, admin = world
    await alice.slash(
        channel, "music generate", prompt="no", duration=1.0, model="facebook/musicgen-small"
    )
    await alice.slash(channel, "music generate", prompt="ok", duration=1.0)
    refused = await alice.slash(channel, "music stats")
    assert "Manage Server" in refused.response.content
    stats = await admin.slash(channel, "music stats")
    values = {f.name: f.value for f in stats.response.embeds[0].fields}
    assert (values["Served"], values["Failed"], values["Cancelled"]) == ("1", "1", "0")
    (worker,) = [name for name in values if name.startswith("Worker ")]
    assert values[worker].startswith("Loaded: debug; running: idle")
    assert values["Median generation"].endswith(" s")
    assert values["Queued"] == "0 here, 0 in all"
    assert "Memory (process)" in values
    footer = stats.response.embeds[0].footer.text
    assert footer == "Counts: the finished jobs kept here. Medians: the last 1,000."


def test_a_damaged_database_stops_the_bot_with_a_clear_error(tmp_path, capsys):
    database = tmp_path / "bot.sqlite3"
    database.write_bytes(b"not a database" * 100)
    config = tmp_path / "config.toml"
    config.write_text(f'[discord]\ntoken = "x"\n[storage]\ndatabase = "{database}"\n')
    assert main(["run", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "cannot be read" in err and "left as it is" in err
    assert database.read_bytes() == b"not a database" * 100

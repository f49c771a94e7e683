"""Shared fixtures: tiny real audiocraft models, audio files made with ffmpeg, and a SimCord
server with members."""

from __future__ import annotations

import os

# No test may reach a model hub: the released checkpoints cannot be downloaded here.
os.environ["HF_HUB_OFFLINE"] = "1"

from collections.abc import Callable
from pathlib import Path

import discord
import pytest

from generation.audio.loop import prepare_beat_tracking
from generation.engine.musicgen import MusicGenEngine
from generation.jobs.postgres import PostgresStore
from generation.jobs.sqlite import SqliteStore

from .bot_helpers import close_databases, end_process, make_bot
from .helpers import encode_tone
from .postgres import fresh_schema
from .stores import forget_url, remember_url


@pytest.fixture(autouse=True)
async def _close_bot_databases():
    yield
    await close_databases()


@pytest.fixture
def simcord_env(simcord_env):
    """SimCord's world, where ``restart_bot`` is a crash and a new process: the old bot's
    process ends (its database closes, so its lock goes, as the kernel drops a dead
    process's), with no graceful shutdown, before the new bot starts."""
    restart_bot = simcord_env.restart_bot

    async def restart_after_a_crash(bot=None):
        await simcord_env.settle()
        await end_process(simcord_env.bot)  # closing twice is harmless: teardown does too
        await restart_bot(bot)

    simcord_env.restart_bot = restart_after_a_crash
    return simcord_env


@pytest.fixture(scope="session")
def engine() -> MusicGenEngine:
    """One engine for the whole run, as the bot has: models stay loaded between tests."""
    return MusicGenEngine(device="cpu")


@pytest.fixture(scope="session", autouse=True)
def beat_tracker_ready() -> None:
    """The beat tracker imported before the first test, as a started worker has it soon after
    it starts: importing it holds the GIL for seconds, which would stall that test's event
    loop (a bot not settling, a lease running out)."""
    prepare_beat_tracking()


@pytest.fixture
def tone(tmp_path: Path) -> Callable[..., Path]:
    """Make a tone file: ``tone("intro.wav", seconds=3)``."""
    return lambda name, **kwargs: encode_tone(tmp_path / name, **kwargs)


@pytest.fixture
def database(tmp_path: Path) -> Path:
    return tmp_path / "bot.sqlite3"


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request, tmp_path: Path):
    """A fresh job store of each kind: an SQLite file, and a PostgreSQL schema of its own."""
    if request.param == "sqlite":
        store = await SqliteStore.open(tmp_path / "bot.sqlite3")
        yield store
        await store.close()
        return
    async with fresh_schema() as url:
        store = await PostgresStore.open(url)
        remember_url(store, url)
        try:
            yield store
        finally:
            forget_url(store)
            await store.close()


@pytest.fixture
def simcord_bot(database: Path):
    """A fresh, unstarted bot for SimCord's ``simcord_env``."""
    return make_bot(database)


@pytest.fixture
def guild(simcord_env):
    return simcord_env.create_guild("Jam Session")


@pytest.fixture
def channel(guild):
    return guild.create_text_channel("music")


@pytest.fixture
def alice(simcord_env, guild):
    return guild.add_member(simcord_env.create_user("alice"))


@pytest.fixture
def bob(simcord_env, guild):
    return guild.add_member(simcord_env.create_user("bob"))


@pytest.fixture
def admin(simcord_env, guild):
    mods = guild.create_role("Mods", permissions=discord.Permissions(manage_guild=True))
    return guild.add_member(simcord_env.create_user("mod"), roles=[mods])

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

from generation.engine import MusicGenEngine

from .bot_helpers import close_databases, make_bot
from .helpers import encode_tone


@pytest.fixture(autouse=True)
async def _close_bot_databases():
    yield
    await close_databases()


@pytest.fixture(scope="session")
def engine() -> MusicGenEngine:
    """One engine for the whole run, as the bot has: models stay loaded between tests."""
    return MusicGenEngine(device="cpu")


@pytest.fixture
def tone(tmp_path: Path) -> Callable[..., Path]:
    """Make a tone file: ``tone("intro.wav", seconds=3)``."""
    return lambda name, **kwargs: encode_tone(tmp_path / name, **kwargs)


@pytest.fixture
def database(tmp_path: Path) -> Path:
    return tmp_path / "bot.sqlite3"


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

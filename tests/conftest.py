"""Shared fixtures: tiny real audiocraft models, and audio files made with ffmpeg."""

from __future__ import annotations

import os

# No test may reach a model hub: the released checkpoints cannot be downloaded here.
os.environ["HF_HUB_OFFLINE"] = "1"

from collections.abc import Callable
from pathlib import Path

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

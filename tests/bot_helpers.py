"""Building the bot for SimCord tests."""

from __future__ import annotations

from bot import create_bot
from bot.config import parse_config

CONFIG = {
    "discord": {"token": "not-a-real-token"},
    "generation": {
        # The released model cannot be downloaded here: its jobs fail, as when a hub is down.
        "models": ["debug", "debug-melody", "debug-stereo", "facebook/musicgen-small"],
        "device": "cpu",
        "max_duration": 60,
        "max_upload_mib": 1,
    },
    "queue": {"max_jobs_per_user": 3, "max_jobs_per_guild": 5},
}


#: Every bot made in a test, so its database connection (a non-daemon thread) gets closed.
MADE: list = []


async def close_databases() -> None:
    """Close the stores of the bots made so far (SimCord does not close detached bots)."""
    while MADE:
        bot = MADE.pop()
        service = getattr(bot, "service", None)
        if service is not None:
            service.worker.close()
            await service.store.close()


def make_bot(database, **sections):
    """A fresh, unstarted bot on the SQLite file ``database``."""
    raw = {name: dict(values) for name, values in CONFIG.items()}
    raw["storage"] = {"database": str(database)}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    bot = create_bot(parse_config(raw, source="test", environ={}))
    MADE.append(bot)
    return bot

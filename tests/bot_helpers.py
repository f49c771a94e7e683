"""Building the bot for SimCord tests."""

from __future__ import annotations

import re

import numpy as np

from bot import create_bot
from bot.config import parse_config
from generation.audio.input import AudioLimits, decode_audio

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
        await end_process(MADE.pop())


async def end_process(bot) -> None:
    """What the end of ``bot``'s process does, without any graceful shutdown: its worker
    thread stops and its database closes (and with it the lock that made it the owner)."""
    worker = getattr(bot, "worker", None)
    if worker is not None:
        worker.accepting = False
        worker.close()
    service = getattr(bot, "service", None)
    if service is not None:
        service.watcher.accepting = False
        await service.store.close()


def make_bot(database, *, generates: bool = True, store=None, **sections):
    """A fresh, unstarted bot on ``database`` (an SQLite file, or a PostgreSQL address;
    ``store``: already open on it); ``generates=False`` makes a gateway."""
    raw = {name: dict(values) for name, values in CONFIG.items()}
    raw["storage"] = {"database": str(database)}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    config = parse_config(raw, source="test", environ={})
    bot = create_bot(config, generates=generates, store=store)
    MADE.append(bot)
    return bot


async def mp3_of(message) -> np.ndarray:
    """The samples of a message's MP3 attachment."""
    (attachment,) = [a for a in message.attachments if a.filename.endswith(".mp3")]
    return decode_audio(await attachment.read(), AudioLimits()).samples


#: A link to a message, as a job's status message has to its outcome.
LINK = re.compile(r"https://discord\.com/channels/\d+/\d+/(\d+)")


def outcome(result):
    """The message a job's status message links to: its track, or why it failed (a new
    message, so that Discord notifies the requester)."""
    link = LINK.search(result.response.content)
    assert link, f"the status message links to nothing: {result.response.content!r}"
    (message,) = [m for m in result.followups if m.id == int(link[1])]
    return message


def fields(message) -> dict[str, str]:
    (embed,) = message.embeds
    return {field.name: field.value for field in embed.fields}


def job_id(message) -> int:
    """The job number in a result's embed footer."""
    return int(message.embeds[0].footer.text.removeprefix("Job #"))


def private_reply(result) -> str:
    """The ephemeral answer to a rejected command."""
    replies = [m for m in [result.response, *result.followups] if m is not None and m.ephemeral]
    assert replies, "expected an ephemeral reply"
    return replies[-1].content


def seconds(audio: np.ndarray, sample_rate: int = 32_000) -> float:
    return audio.shape[-1] / sample_rate


def buttons(message) -> dict[str, str]:
    """A message's buttons: label to custom_id (a SimCord response holds raw payloads)."""
    found = {}
    for row in message.components:
        for child in row["components"] if isinstance(row, dict) else row.children:
            if isinstance(child, dict):
                found[child["label"]] = child["custom_id"]
            else:
                found[child.label] = child.custom_id
    return found

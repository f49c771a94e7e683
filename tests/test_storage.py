"""Storage that does not pile up: uploads stored once, retention, tokens forgotten and never
logged."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time

import pytest

from bot.cli import main
from bot.log_redaction import redact_logs

from .bot_helpers import job_id, make_bot, outcome, private_reply

pytestmark = pytest.mark.simcord(settle_timeout=60)


def query(database, sql: str) -> list[tuple]:
    connection = sqlite3.connect(database)
    try:
        return connection.execute(sql).fetchall()
    finally:
        connection.close()


def database_bytes(database) -> int:
    """The database's size, once the write-ahead log is folded into it."""
    query(database, "PRAGMA wal_checkpoint(TRUNCATE)")
    return database.stat().st_size


async def prune(tmp_path, database, setting: str) -> None:
    """Run `musicgen-bot prune` with ``setting`` under [storage], as an operator would, while
    the bot runs (the command runs its own event loop, so on a thread here)."""
    config = tmp_path / "config.toml"
    config.write_text(
        f'[generation]\nmodels = ["debug"]\n[storage]\ndatabase = "{database}"\n{setting}\n'
    )
    await asyncio.sleep(0.1)  # 0.000001 days
    assert await asyncio.to_thread(main, ["prune", "--config", str(config)]) == 0


async def test_re_rolls_of_a_job_with_a_melody_add_the_melody_once(
    simcord_env, alice, channel, tone, database, tmp_path
):
    melody = tone("melody.wav", seconds=4.0, channels=2).read_bytes()
    first = await alice.slash(
        channel,
        "music generate",
        prompt="follow me",
        model="debug-melody",
        duration=1.0,
        melody=("melody.wav", melody),
    )
    original = outcome(first)
    assert original.attachments, original.content
    before = database_bytes(database)
    for _ in range(3):
        clicked = await alice.click(original, custom_id=f"musicgen:reroll:{job_id(original)}")
        assert outcome(clicked).attachments, clicked.response.content
    assert query(database, "SELECT COUNT(*) FROM uploads") == [(1,)]
    assert query(database, "SELECT COUNT(DISTINCT hash), COUNT(*) FROM job_uploads") == [(1, 4)]
    # 4 s of stereo float32 PCM (1 MiB) was stored again for each re-roll before.
    assert database_bytes(database) - before < 100_000

    # Once no job within keep_uploads_days uses it, the melody goes, and Re-roll says so.
    await prune(tmp_path, database, "keep_uploads_days = 0.000001")
    assert query(database, "SELECT COUNT(*) FROM uploads") == [(0,)]
    await simcord_env.restart_bot(make_bot(database))
    clicked = await alice.click(original, custom_id=f"musicgen:reroll:{job_id(original)}")
    assert private_reply(clicked).startswith(
        f"The audio job #{job_id(original)} was given (its melody or intro) expired on "
    )


async def test_tokens_leave_the_database_and_never_reach_the_logs(
    simcord_env, alice, admin, channel, database, caplog
):
    caplog.set_level(logging.DEBUG)
    redact_logs("not-a-real-token")  # what `musicgen-bot run` does once logging is set up
    await admin.slash(channel, "music admin pause")
    late = await alice.slash(channel, "music generate", prompt="after the token", duration=1.0)
    ((token,),) = query(database, "SELECT reply_token FROM jobs")
    assert token
    # The token expires after 15 min; the bot prunes every 10 min.
    await simcord_env.advance_time(21 * 60)
    assert query(database, "SELECT reply_token FROM jobs") == [(None,)]
    await admin.slash(channel, "music admin resume")
    delivered = [m for m in channel.history() if m.attachments]
    assert delivered and late.response.content.startswith("Queued")
    on_time = await alice.slash(channel, "music generate", prompt="in time", duration=1.0)
    assert outcome(on_time).attachments  # through the interaction's webhook
    assert query(database, "SELECT reply_token FROM jobs WHERE reply_token IS NOT NULL") == []
    assert token not in caplog.text
    assert "not-a-real-token" not in caplog.text
    assert "<parameters not logged>" in caplog.text  # the SQL that carried them was logged


async def test_show_says_when_a_track_expired(simcord_env, alice, channel, database, tmp_path):
    result = await alice.slash(channel, "music generate", prompt="short-lived", duration=1.0)
    track = outcome(result)
    number = job_id(track)
    await prune(tmp_path, database, "keep_results_days = 0.000001")
    assert not list((tmp_path / "bot-results").glob(f"{number}*.flac"))
    await simcord_env.restart_bot(make_bot(database))
    shown = await alice.slash(channel, "music show", job=number)
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert private_reply(shown) == (
        f"The track of job #{number} expired on {today} (UTC) and is no longer kept (old "
        "tracks are deleted to save space)."
    )
    history = await alice.slash(channel, "music history")
    assert f"#{number}: short-lived" in [field.name for field in history.response.embeds[0].fields]
    # Re-roll needs only the request: it still works.
    clicked = await alice.click(track, custom_id=f"musicgen:reroll:{number}")
    assert outcome(clicked).attachments


@pytest.mark.parametrize(
    ("logger", "message", "args"),
    [  # as discord.py logs at DEBUG: a gateway event, a request, a webhook request
        (
            "discord.gateway",
            "For Shard ID %s: WebSocket Event: %s",
            (None, {"t": "INTERACTION_CREATE", "d": {"id": "1", "token": "aW50ZXJhY3Rpb24"}}),
        ),
        (
            "discord.http",
            "%s %s with %s has returned %s",
            (
                "POST",
                "https://discord.com/api/v10/interactions/1/aW50ZXJhY3Rpb24/callback",
                "",
                204,
            ),
        ),
        (
            "discord.webhook.async_",
            "Webhook ID %s with %s %s has returned status code %s",
            (9, "PATCH", "https://discord.com/api/v10/webhooks/9/aW50ZXJhY3Rpb24/messages/5", 200),
        ),
        ("discord.client", "logging in using static token %s", ("bot-token",)),
    ],
)
def test_tokens_are_redacted_from_what_discord_py_logs(caplog, logger, message, args):
    caplog.set_level(logging.DEBUG)
    redact_logs("bot-token")
    logging.getLogger(logger).debug(message, *args)
    assert "aW50ZXJhY3Rpb24" not in caplog.text and "bot-token" not in caplog.text
    assert "<redacted>" in caplog.text

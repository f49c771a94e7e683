"""Outcomes reach the member when the channel refuses the bot, or wait in their history."""

from __future__ import annotations

import shutil

import discord
import pytest
from simcord.backend.models.channel import Overwrite
from simcord.enums import OverwriteType

from generation.jobs.sqlite import SqliteStore

from .bot_helpers import job_id, outcome
from .test_storage import prune

pytestmark = pytest.mark.simcord(settle_timeout=60)


@pytest.fixture
def quiet(guild):
    return guild.create_text_channel("quiet")


def deny_the_bot(simcord_env, channel, **denied: bool) -> None:
    """A server's admin takes permissions in ``channel`` away from the bot."""
    simcord_env.backend.set_overwrite(
        channel.id,
        Overwrite(
            simcord_env.bot.user.id,
            OverwriteType.MEMBER,
            deny=discord.Permissions(**denied).value,
        ),
    )


async def generate_after_the_token_expired(
    simcord_env, channel, member, admin, prompt, **deny: bool
):
    """A job that ends after its interaction's token died: it goes to the channel, where the
    bot loses ``deny`` permissions while the job waits."""
    await admin.slash(channel, "music admin pause")
    await member.slash(channel, "music generate", prompt=prompt, duration=1.0)
    await simcord_env.advance_time(16 * 60)
    if deny:
        deny_the_bot(simcord_env, channel, **deny)
    await admin.slash(channel, "music admin resume")


async def test_a_result_the_channel_refuses_reaches_the_member_by_direct_message(
    simcord_env, quiet, alice, admin
):
    await generate_after_the_token_expired(
        simcord_env, quiet, alice, admin, "late", send_messages=True
    )
    assert not [message for message in quiet.history() if message.attachments]
    (direct,) = [m for m in alice.user.dm_channel.history() if m.attachments]
    assert direct.embeds[0].title == "late"
    assert f"<#{quiet.id}>" in direct.content
    history = await alice.slash(quiet, "music history")
    (entry,) = history.response.embeds[0].fields
    assert direct.jump_url in entry.value


async def test_an_outcome_nobody_can_receive_is_kept_for_history(
    simcord_env, quiet, channel, alice, admin, database, tmp_path
):
    simcord_env.inject_error(
        "POST",
        f"/channels/{alice.user.dm_channel.id}/messages",
        status=403,
        code=50007,
        message="Cannot send messages to this user",
        times=None,
    )
    ended = []  # the cogs (a jam's timeline) still hear that the job ended

    async def on_job_ended(job):
        ended.append(job.id)

    simcord_env.bot.add_listener(on_job_ended)
    await generate_after_the_token_expired(
        simcord_env, quiet, alice, admin, "kept", send_messages=True
    )
    assert alice.user.dm_channel.history() == []
    history = await alice.slash(quiet, "music history")
    (entry,) = history.response.embeds[0].fields
    number = int(entry.name.split(":")[0].removeprefix("#"))
    assert f"get it with `/music show job:{number}`" in entry.value
    assert "not delivered" in entry.value and f"<#{quiet.id}>" in entry.value
    assert ended == [number]
    shown = await alice.slash(channel, "music show", job=number)
    assert shown.response.attachments and job_id(shown.response) == number
    store = await SqliteStore.open(database, owner=False)
    assert await store.undelivered() == []  # a restart does not try it again
    await store.close()
    await prune(tmp_path, database, "keep_jobs_days = 0.000001")  # and it does not pile up
    store = await SqliteStore.open(database, owner=False)
    assert await store.get(number) is None
    await store.close()


async def test_a_delivery_that_fails_is_tried_again_while_the_bot_runs(
    simcord_env, channel, alice, admin
):
    simcord_env.inject_error("POST", f"/channels/{channel.id}/messages", status=503, times=2)
    await generate_after_the_token_expired(simcord_env, channel, alice, admin, "retried")
    await simcord_env.advance_time(10 * 60)
    (delivered,) = [message for message in channel.history() if message.attachments]
    assert delivered.embeds[0].title == "retried"
    assert [user.id for user in delivered.mentions] == [alice.id]


async def test_a_deleted_results_folder_is_made_again(simcord_env, channel, alice):
    shutil.rmtree(simcord_env.bot.service.store.results)
    made = await alice.slash(channel, "music generate", prompt="still here", duration=1.0)
    assert outcome(made).attachments

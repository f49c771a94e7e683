"""Outcomes reach the member when the channel refuses the bot, or wait in their history."""

from __future__ import annotations

import shutil

import discord
import pytest

from generation.store import JobStore

from .bot_helpers import job_id

pytestmark = pytest.mark.simcord(settle_timeout=60)


@pytest.fixture
def quiet(guild):
    """A channel where the bot may not post (answering commands there still works)."""
    return guild.create_text_channel(
        "quiet", overwrites={guild.me: discord.PermissionOverwrite(send_messages=False)}
    )


async def generate_after_the_token_expired(simcord_env, channel, member, admin, prompt):
    """A job that ends after its interaction's token died: it goes to the channel."""
    await admin.slash(channel, "music admin pause")
    await member.slash(channel, "music generate", prompt=prompt, duration=1.0)
    await simcord_env.advance_time(16 * 60)
    await admin.slash(channel, "music admin resume")


async def test_a_result_the_channel_refuses_reaches_the_member_by_direct_message(
    simcord_env, quiet, alice, admin
):
    await generate_after_the_token_expired(simcord_env, quiet, alice, admin, "late")
    assert not [message for message in quiet.history() if message.attachments]
    (direct,) = [m for m in alice.user.dm_channel.history() if m.attachments]
    assert direct.embeds[0].title == "late"
    assert f"<#{quiet.id}>" in direct.content
    history = await alice.slash(quiet, "music history")
    (entry,) = history.response.embeds[0].fields
    assert direct.jump_url in entry.value


async def test_an_outcome_nobody_can_receive_is_kept_for_history(
    simcord_env, quiet, alice, admin, database
):
    simcord_env.inject_error(
        "POST",
        f"/channels/{alice.user.dm_channel.id}/messages",
        status=403,
        code=50007,
        message="Cannot send messages to this user",
        times=None,
    )
    await generate_after_the_token_expired(simcord_env, quiet, alice, admin, "kept")
    assert alice.user.dm_channel.history() == []
    history = await alice.slash(quiet, "music history")
    (entry,) = history.response.embeds[0].fields
    number = int(entry.name.split(":")[0].removeprefix("#"))
    assert f"get it with `/music show job:{number}`" in entry.value
    assert "not delivered" in entry.value and f"<#{quiet.id}>" in entry.value
    shown = await alice.slash(quiet, "music show", job=number)
    assert shown.response.attachments and job_id(shown.response) == number
    store = await JobStore.open(database)
    assert await store.undelivered() == []  # a restart does not try it again
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
    assert made.response.attachments

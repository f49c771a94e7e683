"""One access check for every entry point: allowed channels, posting rights, threads, and
server settings within what the operator enables."""

from __future__ import annotations

import discord
import pytest

from .bot_helpers import fields, job_id, make_bot, outcome, private_reply

pytestmark = pytest.mark.simcord(settle_timeout=60)


async def track(member, channel, prompt="warm synthwave", **options):
    result = await member.slash(
        channel, "music generate", prompt=prompt, **{"duration": 2.0, **options}
    )
    return outcome(result)


async def start_jam(member, channel, title="Friday jam"):
    before = set(thread.id for thread in channel.threads)
    started = await member.slash(channel, "music jam start", title=title)
    (thread,) = [thread for thread in channel.threads if thread.id not in before]
    assert thread.mention in started.response.content
    return thread


async def test_show_and_jam_export_keep_to_the_allowed_channels(guild, alice, admin, channel):
    number = job_id(await track(alice, channel, duration=1.0))
    thread = await start_jam(alice, channel)
    turn = await alice.slash(thread, "music jam add", prompt="intro", length=1.0)
    assert outcome(turn).attachments
    elsewhere = guild.create_text_channel("elsewhere")
    await admin.slash(channel, "music admin settings", allow_channel=elsewhere)

    only_there = f"In this server, music is made in <#{elsewhere.id}>."
    assert private_reply(await alice.slash(channel, "music show", job=number)) == only_there
    assert private_reply(await alice.slash(thread, "music jam export")) == only_there
    assert (await alice.slash(elsewhere, "music show", job=number)).response.attachments


async def test_a_member_who_may_not_post_here_cannot_post_through_the_bot(guild, alice, bob):
    quiet = guild.create_text_channel(
        "announcements", overwrites={bob: discord.PermissionOverwrite(send_messages=False)}
    )
    original = await track(alice, quiet)
    refusal = "You need **Send Messages** in this channel for that"
    for label in ("Edit", "Re-roll", "Continue", "Variations"):
        pressed = await bob.click(original, label=label)
        assert pressed.modal is None, label  # the Edit form is not even shown
        assert private_reply(pressed).startswith(refusal), label
    typed = await bob.slash(quiet, "music generate", prompt="shout", duration=1.0)
    assert private_reply(typed).startswith(refusal)
    # alice's status message and her track only
    assert [m.author.bot for m in quiet.history()].count(True) == 2


async def test_jam_start_needs_create_public_threads(guild, bob):
    closed = guild.create_text_channel(
        "no-threads", overwrites={bob: discord.PermissionOverwrite(create_public_threads=False)}
    )
    refused = await bob.slash(closed, "music jam start", title="mine")
    assert private_reply(refused).startswith("You need **Create Public Threads** in this channel")
    assert closed.threads == []


async def test_open_jams_per_member_are_bounded(simcord_env, database, alice, bob, channel):
    await simcord_env.restart_bot(make_bot(database, jams={"max_open_per_user": 2}))
    first = await start_jam(alice, channel, "one")
    await start_jam(alice, channel, "two")
    refused = await alice.slash(channel, "music jam start", title="three")
    assert private_reply(refused).startswith("You have 2 open jams here (")
    assert len(channel.threads) == 2
    await start_jam(bob, channel, "bob's")  # per member

    await simcord_env.bot.get_channel(first.id).edit(archived=True)
    await start_jam(alice, channel, "three")


async def test_settings_naming_a_removed_model_are_not_obeyed(
    simcord_env, database, alice, admin, channel
):
    await admin.slash(
        channel,
        "music admin settings",
        allowed_models="debug-stereo, debug-melody",
        default_model="debug-stereo",
    )
    await simcord_env.restart_bot(
        make_bot(database, generation={"models": ["debug", "debug-melody"]})
    )
    assert fields(await track(alice, channel, duration=1.0))["Model"] == "debug-melody"
    models = await alice.slash(channel, "music models")
    assert [f.name for f in models.response.embeds[0].fields] == ["debug-melody (default)"]
    shown = fields((await admin.slash(channel, "music admin settings")).response)
    assert shown["Allowed models"] == "debug-melody"
    assert shown["No longer enabled (ignored)"] == "debug-stereo"

    await admin.slash(channel, "music admin settings", allowed_models="debug-melody")
    await simcord_env.restart_bot(make_bot(database, generation={"models": ["debug"]}))
    refused = await alice.slash(channel, "music generate", prompt="x", duration=1.0)
    assert private_reply(refused).startswith(
        "**model**: None of the models this server allows is enabled any more"
    )


async def test_a_jam_goes_on_when_its_model_is_disallowed(alice, bob, admin, channel):
    thread = await start_jam(alice, channel)
    first = await alice.slash(thread, "music jam add", prompt="intro", length=1.0)
    assert fields(outcome(first))["Model"] == "debug"
    await admin.slash(channel, "music admin settings", allowed_models="debug-stereo, debug-melody")
    await admin.slash(channel, "music admin pause")
    turn = await bob.slash(thread, "music jam add", prompt="more", length=1.0)
    assert (
        "The jam's model debug is not allowed here any more, so this turn uses debug-melody."
        in turn.response.content
    )
    await admin.slash(channel, "music admin resume")
    values = fields(outcome(turn))
    assert (values["Model"], values["Continuation of"]) == ("debug-melody", "1.0 s intro")


async def test_continue_is_bounded_by_what_fits_with_the_intro(alice, channel):
    original = await track(alice, channel)
    shown = await alice.click(original, label="Continue")
    labels = [
        control["label"] for row in shown.modal["components"] for control in row["components"]
    ]
    assert "Seconds of new music to add (1-58)" in labels
    refused = await alice.submit_modal(shown, {"musicgen:prompt": "x", "musicgen:length": "59"})
    assert private_reply(refused) == (
        "**length**: 59 s after the 2.0 s intro makes 61.0 s, and tracks here are at most "
        "60 s: add at most 58 s."
    )


async def test_the_bot_says_what_it_needs_to_post_a_track_here(guild, alice):
    bot_role = guild.roles["TestBot"]
    closed = guild.create_text_channel(
        "no-files", overwrites={bot_role: discord.PermissionOverwrite(attach_files=False)}
    )
    refused = await alice.slash(closed, "music generate", prompt="x", duration=1.0)
    assert private_reply(refused).startswith("I need **Attach Files** in this channel")

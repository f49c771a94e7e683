"""Relay jams: members take turns carrying one track on in a thread, then export it."""

from __future__ import annotations

import asyncio
import io

import mutagen.id3
import numpy as np
import pytest
import simcord

from generation.audio.input import AudioLimits, decode_audio
from generation.audio.stored import StoredClip
from generation.jobs.sqlite import SqliteStore

from .bot_helpers import (
    buttons,
    fields,
    job_id,
    make_bot,
    mp3_of,
    outcome,
    private_reply,
    seconds,
)

pytestmark = pytest.mark.simcord(settle_timeout=60)


async def start_jam(member, channel, title="Friday jam"):
    started = await member.slash(channel, "music jam start", title=title)
    (thread,) = channel.threads
    assert thread.name == title
    assert thread.mention in started.response.content
    return thread


async def take_turn(member, thread, prompt, length=2.0):
    result = await member.slash(thread, "music jam add", prompt=prompt, length=length)
    return outcome(result)


def link(message) -> str:
    """A turn's job number, linked to its message, as the timeline shows it."""
    return f"[job #{job_id(message)}]({message.message.jump_url})"


def timeline(thread) -> list[str]:
    return thread.history()[0].content.splitlines()


def id3(data: bytes) -> dict[str, str]:
    tags = mutagen.id3.ID3(io.BytesIO(data))
    return {
        frame.desc if frame.FrameID == "TXXX" else frame.FrameID: str(frame)
        for frame in tags.values()
    }


async def test_a_relay_jam_of_three_turns_by_two_members(alice, bob, channel):
    thread = await start_jam(alice, channel)
    assert "No turns yet" in timeline(thread)[-1]

    first = await take_turn(alice, thread, "slow piano intro", length=2.0)
    assert "Continuation of" not in fields(first)
    second = await take_turn(bob, thread, "drums join in", length=1.5)
    assert fields(second)["Continuation of"] == "2.0 s intro"  # the whole first turn
    assert seconds(await mp3_of(second)) == pytest.approx(3.5, abs=0.1)
    third = await take_turn(alice, thread, "big finish", length=1.0)
    assert fields(third)["Continuation of"] == "3.5 s intro"  # the whole second result
    assert second.content.startswith(f"<@{bob.id}>") and third.content.startswith(f"<@{alice.id}>")

    assert timeline(thread)[1:] == [
        f"1. <@{alice.id}>: *slow piano intro* ({link(first)})",
        f"2. <@{bob.id}>: *drums join in* ({link(second)})",
        f"3. <@{alice.id}>: *big finish* ({link(third)})",
    ]
    assert first.content.startswith(f"<@{alice.id}>")  # each link leads to the turn's track
    assert second.embeds[0].description.startswith(f"Turn 2 of the jam, continues #{job_id(first)}")

    exported = await bob.slash(thread, "music jam export", segments=True)
    whole = exported.response
    assert whole.content.startswith("**Friday jam**: 3 turns by ")
    assert f"<@{alice.id}>, <@{bob.id}>" in whole.content
    (mp3,) = whole.attachments
    data = await mp3.read()
    assert seconds(await mp3_of(whole)) == pytest.approx(2.0 + 1.5 + 1.0, abs=0.1)
    jobs = ",".join(str(job_id(m)) for m in (first, second, third))
    assert id3(data)["musicgen_jobs"] == jobs

    (parts,) = exported.followups
    assert [a.filename[:3] for a in parts.attachments] == ["01-", "02-", "03-"]
    lengths = [
        seconds(decode_audio(await a.read(), AudioLimits()).samples) for a in parts.attachments
    ]
    assert lengths == pytest.approx([2.0, 1.5, 1.0], abs=0.1)
    assert id3(await parts.attachments[1].read())["musicgen_prompt"] == "drums join in"


async def test_members_take_turns(alice, bob, admin, channel):
    thread = await start_jam(alice, channel)
    await admin.slash(channel, "music admin pause")
    waiting = await alice.slash(thread, "music jam add", prompt="first", length=1.0)
    assert "Turn 1 of the jam" in waiting.response.content
    refused = await bob.slash(thread, "music jam add", prompt="too soon", length=1.0)
    assert private_reply(refused) == (
        f"Turn 1 by <@{alice.id}> is still being made: wait for it, then carry it on."
    )
    assert timeline(thread)[-1].endswith("(queued)")
    await admin.slash(channel, "music admin resume")
    assert outcome(waiting).attachments
    assert timeline(thread)[-1].endswith(f"({link(outcome(waiting))})")
    turn = await take_turn(bob, thread, "now", length=1.0)
    assert fields(turn)["Continuation of"] == "1.0 s intro"


async def test_jam_commands_outside_a_jam_are_explained(alice, channel):
    for command, options in (("music jam add", {"prompt": "x"}), ("music jam export", {})):
        refused = await alice.slash(channel, command, **options)
        assert "This is not a jam's thread" in private_reply(refused)
    thread = await start_jam(alice, channel)
    refused = await alice.slash(thread, "music jam start")
    assert private_reply(refused) == "Start a jam in a text channel, not in a thread."
    empty = await alice.slash(thread, "music jam export")
    assert "Nothing to export yet" in private_reply(empty)
    with pytest.raises(simcord.OptionError) as caught:  # a turn fits one model window
        await alice.slash(thread, "music jam add", prompt="x", length=16.0)
    assert caught.value.code == "option-range"


async def test_a_jam_goes_on_after_a_restart(simcord_env, alice, bob, channel, database):
    thread = await start_jam(alice, channel)
    first = await take_turn(alice, thread, "before")
    await simcord_env.restart_bot(make_bot(database))
    second = await take_turn(bob, thread, "after", length=1.0)
    assert fields(second)["Continuation of"] == "2.0 s intro"
    assert len(timeline(thread)) == 3
    clicked = await bob.click(first, label="Re-roll")
    assert outcome(clicked).attachments


async def test_one_turn_is_a_turn(alice, channel):
    thread = await start_jam(alice, channel)
    await take_turn(alice, thread, "solo")
    exported = await alice.slash(thread, "music jam export")
    assert exported.response.content.startswith(f"**Friday jam**: 1 turn by <@{alice.id}>, ")


async def test_a_re_rolled_turn_is_another_take_the_jam_can_adopt(
    simcord_env, guild, alice, bob, admin, channel, database
):
    thread = await start_jam(alice, channel)
    first = await take_turn(alice, thread, "piano")
    second = await take_turn(bob, thread, "drums", length=1.0)

    # Bob re-rolls his turn: a take of turn 2, outside the jam until adopted.
    rerolled = outcome(await bob.click(second, label="Re-roll"))
    assert rerolled.embeds[0].description.startswith(
        f"Re-roll of #{job_id(second)} (turn 2 of the jam): another take of that turn, not in "
        "the jam unless adopted with **Adopt as turn 2**."
    )
    assert fields(rerolled)["Continuation of"] == "2.0 s intro"  # the same intro as turn 2
    assert timeline(thread)[-1] == f"2. <@{bob.id}>: *drums* ({link(second)})"
    again = outcome(await bob.click(rerolled, label="Re-roll"))  # a take of a take
    assert "turn 2 of the jam" in again.embeds[0].description

    # Only the turn's player, the jam's starter or Manage Server choose; then it is turn 2.
    carol = guild.add_member(simcord_env.create_user("carol"))
    refused = await carol.click(rerolled, label="Adopt as turn 2")
    assert private_reply(refused).startswith(f"Turn 2 is <@{bob.id}>'s")
    adopted = await bob.click(rerolled, label="Adopt as turn 2")
    assert adopted.response.content.startswith(
        f"Turn 2 of **Friday jam** is now job #{job_id(rerolled)} (it was job #{job_id(second)})"
    )
    assert timeline(thread)[-1] == f"2. <@{bob.id}>: *drums* ({link(rerolled)})"
    refused = await bob.click(rerolled, label="Adopt as turn 2")
    assert private_reply(refused) == f"Job #{job_id(rerolled)} already is turn 2."

    # The next turn carries the adopted take on, and the export holds it.
    third = await take_turn(alice, thread, "finale", length=1.0)
    assert fields(third)["Continuation of"] == "3.0 s intro"
    store = await SqliteStore.open(database, owner=False)
    try:
        job = await store.get(job_id(third))
        take, _ = await store.load_result(await store.get(job_id(rerolled)))
    finally:
        await store.close()
    np.testing.assert_allclose(job.request.continuation.samples, take, atol=1e-6)
    exported = await alice.slash(thread, "music jam export")
    jobs = ",".join(str(job_id(m)) for m in (first, rerolled, third))
    assert id3(await exported.response.attachments[0].read())["musicgen_jobs"] == jobs

    # Once carried on, turn 2 stays: a later take cannot replace it.
    refused = await admin.click(again, label="Adopt as turn 2")
    assert "only the latest turn can change" in private_reply(refused)
    # Variations of a turn are not turns, and say so.
    varied = outcome(await bob.click(first, label="Variations"))
    assert "(turn 1 of the jam): not a turn of the jam." in varied.embeds[0].description
    assert "Adopt as turn 1" not in [b for b in buttons(varied)]


async def test_a_turn_delivered_after_its_token_expired_is_linked(
    simcord_env, alice, bob, admin, channel
):
    thread = await start_jam(alice, channel)
    first = await take_turn(alice, thread, "on time", length=1.0)
    await admin.slash(channel, "music admin pause")
    late = await bob.slash(thread, "music jam add", prompt="late", length=1.0)
    await simcord_env.advance_time(21 * 60)  # past the token's 15 minutes: the bot prunes it
    await alice.slash(thread, "music jam export")  # redraws the timeline from the store
    status = f"https://discord.com/channels/{thread.guild.id}/{thread.id}/{late.response.id}"
    assert timeline(thread)[-1].endswith(f"([job #{job_id(first) + 1}]({status})) (queued)")

    await admin.slash(channel, "music admin resume")
    (posted,) = [m for m in thread.history() if m.content.startswith(f"<@{bob.id}>")]
    assert posted.attachments  # posted in the thread: the follow-up's token was dead
    turn = f"2. <@{bob.id}>: *late* ([job #{job_id(posted)}]({posted.jump_url}))"
    assert timeline(thread)[-1] == turn
    await take_turn(alice, thread, "after", length=1.0)  # a redraw from the store
    assert timeline(thread)[2] == turn


async def test_the_timeline_and_the_export_decode_no_intro(alice, bob, admin, channel, monkeypatch):
    thread = await start_jam(alice, channel)
    await take_turn(alice, thread, "piano", length=1.0)
    await take_turn(bob, thread, "drums", length=1.0)  # its intro is kept in the store
    decoded = []  # every stored clip read back goes through StoredClip.from_flac
    from_flac = StoredClip.from_flac.__func__

    def counted(cls, data, exponent):
        decoded.append(len(data))
        return from_flac(cls, data, exponent)

    monkeypatch.setattr(StoredClip, "from_flac", classmethod(counted))
    await admin.slash(channel, "music admin pause")
    waiting = await alice.slash(thread, "music jam add", prompt="bass", length=1.0)
    assert "Turn 3 of the jam" in waiting.response.content
    assert timeline(thread)[-1].endswith("(queued)")  # redrawn
    exported = await bob.slash(thread, "music jam export")
    assert seconds(await mp3_of(exported.response)) == pytest.approx(2.0, abs=0.1)
    assert decoded == []
    await admin.slash(channel, "music admin resume")
    assert timeline(thread)[-1].endswith(f"({link(outcome(waiting))})")
    assert len(decoded) == 1  # the worker read turn 3's intro to run it; the redraw, none


async def test_two_quick_starts_open_no_more_jams_than_allowed(
    simcord_env, database, alice, channel, monkeypatch
):
    await simcord_env.restart_bot(make_bot(database, jams={"max_open_per_user": 1}))
    # SimCord runs one command at a time: take two, then run them at once, as two quick
    # presses run on a busy bot.
    cog = simcord_env.bot.get_cog("Jams")
    taken, start = [], type(cog).start

    async def take(self, interaction, title):
        taken.append((interaction, title))

    monkeypatch.setattr(type(cog), "start", take)
    await alice.slash(channel, "music jam start", title="one")
    await alice.slash(channel, "music jam start", title="two")
    results = await asyncio.gather(
        *(start(cog, interaction, title) for interaction, title in taken), return_exceptions=True
    )
    await simcord_env.settle()
    assert [thread.name for thread in channel.threads] == ["one"]
    assert results[0] is None
    assert str(results[1]).startswith("You have 1 open jams here (")

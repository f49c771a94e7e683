"""What members are told: a result that pings them, a queued message that moves with the
queue, ETAs learnt across restarts, a Cancel button, and advice about models they can pick."""

from __future__ import annotations

import asyncio

import pytest

from bot.presentation import duration_text
from generation.jobs.estimates import GenerationRates
from generation.jobs.sqlite import SqliteStore

from .bot_helpers import LINK, buttons, fields, make_bot, outcome, private_reply
from .helpers import encode_tone

pytestmark = pytest.mark.simcord(settle_timeout=60)


@pytest.fixture
def simcord_bot(database):
    """Status messages may be edited once a second (the least the configuration allows), and
    one job decodes at a time, so that queued jobs move up as the ones ahead start."""
    return make_bot(database, queue={"progress_interval": 1}, generation={"max_batch": 1})


def edits(env, message) -> list[str]:
    """What the bot changed a message's text to, in order."""
    return [
        entry.json["content"]
        for entry in env.http_requests
        if entry.method == "PATCH"
        and entry.path.endswith(f"/messages/{message.id}")
        and isinstance(entry.json, dict)
        and entry.json.get("content")
    ]


def sent(env, text: str) -> list[str]:
    """The contents the bot sent (an interaction's response too) that contain ``text``."""
    payloads = [entry.json for entry in env.http_requests if isinstance(entry.json, dict)]
    contents = [str(payload.get("data", payload).get("content")) for payload in payloads]
    return [content for content in contents if text in content]


async def test_a_result_is_a_new_message_that_pings_only_the_requester(simcord_env, alice, channel):
    result = await alice.slash(channel, "music generate", prompt="ping me", duration=1.0)
    track = outcome(result)  # a follow-up: a new message, so Discord notifies
    assert track.content == f"<@{alice.id}>, your track is ready."
    assert [user.id for user in track.message.mentions] == [alice.id]
    assert track.attachments and track.embeds[0].title == "ping me"
    status = result.response
    assert status.content.startswith("Job #") and "ping me" in status.content
    assert LINK.search(status.content)[0] == track.message.jump_url
    assert buttons(status) == {}  # its Cancel button went with the job
    # Edited only when its text changed: no edit repeats the queued text it answered with.
    assert edits(simcord_env, status) == [
        "Starting job #1: **ping me** with debug, 1 s.",
        status.content,
    ]


async def test_a_failure_pings_the_requester_too(alice, channel):
    result = await alice.slash(
        channel, "music generate", prompt="x", duration=1.0, model="facebook/musicgen-small"
    )
    failure = outcome(result)
    assert failure.content.startswith(f"<@{alice.id}>, job #") and "failed" in failure.content
    assert [user.id for user in failure.message.mentions] == [alice.id]
    assert "failed" in result.response.content


async def test_queued_messages_move_with_the_queue_and_say_when_they_start(
    simcord_env, alice, bob, admin, channel
):
    await admin.slash(channel, "music admin pause")
    # Long enough (over a second) that the messages behind it may be edited again.
    first = await alice.slash(channel, "music generate", prompt="first", duration=25.0)
    second = await bob.slash(channel, "music generate", prompt="second", duration=1.0)
    third = await alice.slash(channel, "music generate", prompt="third", duration=1.5)
    assert "waits until an admin resumes it" in third.response.content
    await asyncio.sleep(1.1)  # a message is edited at most once a second
    await admin.slash(channel, "music admin resume")

    assert all(outcome(result).attachments for result in (first, second, third))
    texts = edits(simcord_env, third.response)
    queued = [text for text in texts if text.startswith("Queued as job #3: **third**, position")]
    positions = [int(text.split("position ")[1].split(",")[0]) for text in queued]
    # Alice's second job waits for Bob's first (servers and members take turns): it moves up
    # from 3 as the jobs ahead of it start; each edit says where it is then.
    assert positions[0] == 3 and positions[1:] and positions == sorted(positions, reverse=True)
    assert all("ready in about " in text for text in queued)
    assert texts[len(queued) :] == [
        "Starting job #3: **third** with debug, 1.5 s.",
        texts[-1],
    ] and texts[-1].startswith("Job #3, **third**, is ready: https://discord.com/channels/")
    assert edits(simcord_env, second.response)[-2] == "Starting job #2: **second** with debug, 1 s."


async def test_no_eta_while_paused(alice, admin, channel):
    await admin.slash(channel, "music admin pause")
    queued = await alice.slash(channel, "music generate", prompt="patience", duration=1.0)
    assert queued.response.content == (
        "Queued as job #1: **patience**. This server's queue is paused by an admin: it waits "
        "until an admin resumes it."
    )
    queue = await alice.slash(channel, "music queue")
    assert "waits for an admin" in queue.response.embeds[0].description


async def test_a_restarted_bot_estimates_with_the_rate_it_learnt(
    simcord_env, alice, channel, database
):
    await alice.slash(channel, "music generate", prompt="warm up", duration=2.0)
    store = await SqliteStore.open(database, owner=False)
    rate = (await store.generation_rates("cpu"))[("debug", 1)]
    await store.close()
    guess = GenerationRates("cpu").rate("debug")
    learnt = duration_text(rate * 20)
    restarted = make_bot(database)
    await simcord_env.restart_bot(restarted)
    # Where the guess would read the same, the rate itself shows where it came from.
    assert restarted.service.rates.rate("debug") == rate != guess
    await alice.slash(channel, "music generate", prompt="long one", duration=20.0)
    (first_eta,) = sent(simcord_env, "Queued as job #2")
    assert first_eta.endswith(f"position 1, ready in {learnt}.")


async def test_the_requester_can_cancel_with_the_button(alice, admin, channel):
    await admin.slash(channel, "music admin pause")
    queued = await alice.slash(channel, "music generate", prompt="changed my mind", duration=1.0)
    assert buttons(queued.response) == {"Cancel": "musicgen:cancel:1"}
    pressed = await alice.click(queued.response, label="Cancel")
    assert pressed.ephemeral and pressed.response.content == "Cancelled job #1."
    assert queued.response.content == "Job #1 was cancelled."
    assert buttons(queued.response) == {}
    assert queued.followups == []  # they chose it: no ping


async def test_another_member_cannot_cancel_but_a_manager_can(alice, bob, admin, channel):
    await admin.slash(channel, "music admin pause")
    queued = await alice.slash(channel, "music generate", prompt="mine", duration=1.0)
    refused = await bob.click(queued.response, label="Cancel")
    assert private_reply(refused) == (
        "Job #1 is not yours: only members with Manage Server can cancel it."
    )
    assert "Queued as job #1" in queued.response.content
    pressed = await admin.click(queued.response, label="Cancel")
    assert pressed.response.content == "Cancelled job #1."
    assert queued.response.content == "Job #1 was cancelled."


async def test_the_cancel_button_works_after_a_restart(
    simcord_env, alice, admin, channel, database
):
    await admin.slash(channel, "music admin pause")
    queued = await alice.slash(channel, "music generate", prompt="later", duration=1.0)
    await simcord_env.restart_bot(make_bot(database))
    pressed = await alice.click(queued.response, label="Cancel")
    assert pressed.response.content == "Cancelled job #1."
    assert queued.response.content == "Job #1 was cancelled."


async def test_melody_advice_names_only_models_this_server_allows(alice, channel, tmp_path):
    tune = encode_tone(tmp_path / "tune.wav", seconds=1.0).read_bytes()
    refused = await alice.slash(
        channel, "music generate", prompt="x", model="debug-stereo", melody=("tune.wav", tune)
    )
    assert private_reply(refused) == (
        "**melody**: debug-stereo cannot follow a melody: pick a melody model (debug-melody)."
    )


async def test_a_melody_without_a_model_uses_the_servers_melody_model(
    simcord_env, alice, channel, tmp_path
):
    tune = encode_tone(tmp_path / "tune.wav", seconds=1.0).read_bytes()
    result = await alice.slash(
        channel, "music generate", prompt="hum along", duration=1.0, melody=("tune.wav", tune)
    )
    assert fields(outcome(result))["Model"] == "debug-melody"
    (queued,) = sent(simcord_env, "Queued as job #1")
    assert queued.startswith("debug cannot follow a melody, so this uses debug-melody.\n")


async def test_no_allowed_melody_model_is_explained(alice, admin, channel, tmp_path):
    await admin.slash(channel, "music admin settings", allowed_models="debug, debug-stereo")
    tune = encode_tone(tmp_path / "tune.wav", seconds=1.0).read_bytes()
    refused = await alice.slash(
        channel, "music generate", prompt="x", duration=1.0, melody=("tune.wav", tune)
    )
    assert private_reply(refused).startswith("**model**: No model allowed in this server")


async def test_a_queued_message_says_where_the_job_came_from_after_a_restart(
    simcord_env, alice, bob, admin, channel, database
):
    original = outcome(await alice.slash(channel, "music generate", prompt="a", duration=1.0))
    await admin.slash(channel, "music admin pause")
    queued = await bob.click(original, label="Re-roll")
    await simcord_env.restart_bot(make_bot(database))
    await admin.slash(channel, "music admin resume")
    waiting = [text for text in edits(simcord_env, queued.response) if "Queued as" in text]
    assert waiting and all(text.startswith("Re-roll of #1\nQueued as job #2") for text in waiting)

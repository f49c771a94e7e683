"""A stored result whose file is damaged is named as such wherever the bot reads it back."""

from __future__ import annotations

import pytest

from .bot_helpers import job_id, private_reply
from .test_jam import start_jam, take_turn
from .test_remix import track

pytestmark = pytest.mark.simcord(settle_timeout=60)

DAMAGE = {
    "garbage": lambda flac: b"this is not a FLAC file " * 100,
    "truncated": lambda flac: flac[: len(flac) // 2],
}


@pytest.fixture(params=sorted(DAMAGE))
def damage(request, simcord_bot):
    """Damage a job's stored result in place, as a disk error or a crash would."""

    async def damage_result(number: int) -> None:
        store = simcord_bot.service.store
        path = store.result_path(await store.get(number))
        path.write_bytes(DAMAGE[request.param](path.read_bytes()))

    return damage_result


def says_damaged(reply: str, number: int) -> bool:
    return f"The stored track of job #{number} is damaged" in reply and "generate it" in reply


async def test_show_says_the_stored_track_is_damaged(alice, channel, damage):
    number = job_id(await track(alice, channel, duration=1.0))
    await damage(number)
    shown = await alice.slash(channel, "music show", job=number)
    assert says_damaged(private_reply(shown), number), private_reply(shown)


async def test_continue_says_the_stored_track_is_damaged(alice, bob, channel, damage):
    original = await track(alice, channel, duration=1.0)
    await damage(job_id(original))
    shown = await bob.click(original, label="Continue")
    refused = await bob.submit_modal(shown, {"musicgen:prompt": "more", "musicgen:length": "1"})
    assert says_damaged(private_reply(refused), job_id(original)), private_reply(refused)


async def test_jam_export_says_which_turn_is_damaged(alice, bob, channel, damage):
    thread = await start_jam(alice, channel)
    await take_turn(alice, thread, "drums", length=1.0)
    second = await take_turn(bob, thread, "bass", length=1.0)
    await damage(job_id(second))
    exported = await alice.slash(thread, "music jam export")
    assert says_damaged(private_reply(exported), job_id(second)), private_reply(exported)
    carried = await alice.slash(thread, "music jam add", prompt="keys", length=1.0)
    assert says_damaged(private_reply(carried), job_id(second)), private_reply(carried)


async def test_a_deleted_track_is_named_the_same_way_wherever_it_is_read(
    alice, bob, channel, simcord_bot
):
    async def delete(number: int) -> None:
        store = simcord_bot.service.store
        store.result_path(await store.get(number)).unlink()

    def says_gone(reply: str, number: int) -> bool:
        return reply.startswith(f"The track of job #{number} is no longer kept: generate it")

    original = await track(alice, channel, duration=1.0)
    await delete(job_id(original))
    shown = await alice.slash(channel, "music show", job=job_id(original))
    assert says_gone(private_reply(shown), job_id(original)), private_reply(shown)
    form = await bob.click(original, label="Continue")
    refused = await bob.submit_modal(form, {"musicgen:prompt": "more", "musicgen:length": "1"})
    assert says_gone(private_reply(refused), job_id(original)), private_reply(refused)

    thread = await start_jam(alice, channel)
    turn = await take_turn(alice, thread, "drums", length=1.0)
    await delete(job_id(turn))
    exported = await alice.slash(thread, "music jam export")
    assert says_gone(private_reply(exported), job_id(turn)), private_reply(exported)
    carried = await alice.slash(thread, "music jam add", prompt="keys", length=1.0)
    assert says_gone(private_reply(carried), job_id(turn)), private_reply(carried)

"""Under every result, and on any audio message: re-roll, continue, edit, use as melody."""

from __future__ import annotations

import io

import discord
import mutagen.id3
import numpy as np
import pytest
from PIL import Image

from generation.audio.input import AudioLimits, decode_audio
from generation.audio.stored import content_hash
from generation.audio.waveform import GAP, HEIGHT, MARKER, WIDTH
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
from .helpers import encode_titled_tone, encode_tone, wav_without_decoder

pytestmark = pytest.mark.simcord(settle_timeout=60)


async def track(member, channel, prompt="warm synthwave", **options):
    """A result message, made by ``member``."""
    options = {"duration": 2.0, **options}
    result = await member.slash(channel, "music generate", prompt=prompt, **options)
    return outcome(result)


async def mp3(message) -> bytes:
    (attachment,) = [a for a in message.attachments if a.filename.endswith(".mp3")]
    return await attachment.read()


def id3(data: bytes) -> dict[str, str]:
    return {frame.desc: frame.text[0] for frame in mutagen.id3.ID3(io.BytesIO(data)).getall("TXXX")}


def text_inputs(shown) -> dict[str, str | None]:
    """A shown modal's text inputs: custom_id to pre-filled value."""
    return {
        control["custom_id"]: control.get("value")
        for row in shown.modal["components"]
        for control in row["components"]
    }


async def test_every_result_has_a_waveform_and_the_buttons(alice, channel):
    message = await track(alice, channel)
    number = job_id(message)
    assert buttons(message) == {
        "Re-roll": f"musicgen:reroll:{number}",
        "Continue": f"musicgen:continue:{number}",
        "Edit": f"musicgen:edit:{number}",
        "Variations": f"musicgen:variations:{number}",
        "Stems": f"musicgen:stems:{number}",
    }
    (png,) = [a for a in message.attachments if a.filename == "waveform.png"]
    assert message.embeds[0].image.url.endswith("waveform.png")
    image = Image.open(io.BytesIO(await png.read()))
    assert (image.format, image.size) == ("PNG", (800, 160))
    colours = {colour for _, colour in image.getcolors(maxcolors=1000)}
    assert len(colours) >= 2  # the wave is drawn over the background


async def test_re_roll_is_the_same_request_with_a_new_seed_for_whoever_clicks(alice, bob, channel):
    original = await track(alice, channel, temperature=0.8, seed=11)
    clicked = await bob.click(original, custom_id=f"musicgen:reroll:{job_id(original)}")
    reply = outcome(clicked)
    assert reply.content.startswith(f"<@{bob.id}>")  # bob's job, delivered to bob
    before, after = fields(original), fields(reply)
    assert reply.embeds[0].title == "warm synthwave"
    assert reply.embeds[0].description == (
        f"Re-roll of #{job_id(original)}\nRequested by <@{bob.id}>"
    )
    assert list(after) == list(before) == ["Model", "Duration", "Seed", "Temperature"]
    for name in ("Model", "Duration", "Temperature"):
        assert after[name] == before[name], name
    assert after["Seed"] != before["Seed"]
    assert job_id(reply) != job_id(original)
    assert buttons(reply)["Re-roll"] == f"musicgen:reroll:{job_id(reply)}"


async def test_continue_extends_the_result_with_a_new_prompt_and_length(
    alice, bob, channel, database
):
    original = await track(alice, channel, prompt="piano intro", duration=2.0)
    shown = await bob.click(original, custom_id=f"musicgen:continue:{job_id(original)}")
    assert text_inputs(shown) == {"musicgen:prompt": "piano intro", "musicgen:length": "10"}
    done = await bob.submit_modal(
        shown, {"musicgen:prompt": "drums come in", "musicgen:length": "1.5"}
    )
    reply = outcome(done)
    assert reply.embeds[0].title == "drums come in"
    assert reply.embeds[0].description.startswith(f"Continues #{job_id(original)}\n")
    assert fields(reply)["Continuation of"] == "2.0 s intro"
    assert seconds(await mp3_of(reply)) == pytest.approx(3.5, abs=0.1)
    # The waveform shows where the 2 s intro ends: about 4/7 of the way.
    (png,) = [a for a in reply.attachments if a.filename == "waveform.png"]
    picture = np.asarray(Image.open(io.BytesIO(await png.read())).convert("RGB"))
    marker = np.flatnonzero((picture == MARKER).all(axis=-1).sum(axis=0) >= HEIGHT - 1)
    assert marker.size and abs(marker.mean() - WIDTH * 2.0 / 3.5) <= 0.02 * WIDTH
    # Its tags name what it carries on: the job and take, and the exact intro's hash.
    tags = id3(await mp3(reply))
    assert (tags["musicgen_origin"], tags["musicgen_source_job"]) == (
        "continuation",
        str(job_id(original)),
    )
    assert tags["musicgen_source_take"] == "1"
    store = await SqliteStore.open(database, owner=False)
    try:
        continued = await store.get(job_id(reply))
    finally:
        await store.close()
    assert tags["musicgen_continuation_sha256"] == content_hash(continued.request.continuation)


async def test_continue_refuses_a_bad_length(alice, channel):
    original = await track(alice, channel)
    shown = await alice.click(original, custom_id=f"musicgen:continue:{job_id(original)}")
    refused = await alice.submit_modal(shown, {"musicgen:prompt": "x", "musicgen:length": "long"})
    assert private_reply(refused) == "**length**: Enter a number between 1 and 60."


async def test_edit_runs_again_with_the_new_prompt_duration_and_temperature(alice, channel):
    original = await track(alice, channel, prompt="calm", duration=2.0, seed=99)
    shown = await alice.click(original, custom_id=f"musicgen:edit:{job_id(original)}")
    assert text_inputs(shown) == {
        "musicgen:prompt": "calm",
        "musicgen:duration": "2",
        "musicgen:temperature": "1",
    }
    done = await alice.submit_modal(
        shown,
        {"musicgen:prompt": "stormy", "musicgen:duration": "1", "musicgen:temperature": "0.5"},
    )
    values = fields(outcome(done))
    assert outcome(done).embeds[0].title == "stormy"
    assert outcome(done).embeds[0].description.startswith(f"Edit of #{job_id(original)}\n")
    assert (values["Temperature"], values["Seed"]) == ("0.5", "99")
    assert seconds(await mp3_of(outcome(done))) == pytest.approx(1.0, abs=0.1)

    shown = await alice.click(original, custom_id=f"musicgen:edit:{job_id(original)}")
    refused = await alice.submit_modal(
        shown, {"musicgen:prompt": "x", "musicgen:duration": "2", "musicgen:temperature": "hot"}
    )
    assert private_reply(refused) == "**temperature**: Enter a number between 0 and 2."


async def test_a_refused_edit_names_every_bad_field_and_keeps_what_was_typed(alice, bob, channel):
    original = await track(alice, channel, prompt="calm", duration=2.0, seed=99)
    typed = {
        "musicgen:prompt": "stormy sea",
        "musicgen:duration": "600",
        "musicgen:temperature": "hot",
    }
    shown = await alice.click(original, label="Edit")
    refused = await alice.submit_modal(shown, typed)
    assert private_reply(refused) == (
        "**duration**: Enter a number between 1 and 60.\n"
        "**temperature**: Enter a number between 0 and 2."
    )
    reopened = await alice.click(original, label="Edit")
    assert text_inputs(reopened) == typed  # what alice typed, to fix
    assert text_inputs(await bob.click(original, label="Edit"))["musicgen:prompt"] == "calm"

    fixed = {**typed, "musicgen:duration": "1", "musicgen:temperature": "0.5"}
    done = await alice.submit_modal(reopened, fixed)
    assert outcome(done).embeds[0].title == "stormy sea"
    again = await alice.click(original, label="Edit")  # accepted: the job's values again
    assert text_inputs(again)["musicgen:prompt"] == "calm"


async def test_edit_is_bounded_by_the_servers_longest_track(alice, admin, channel):
    original = await track(alice, channel, prompt="calm", duration=2.0)
    await admin.slash(channel, "music admin settings", max_duration=5.0)
    shown = await alice.click(original, label="Edit")
    refused = await alice.submit_modal(
        shown, {"musicgen:prompt": "x", "musicgen:duration": "10", "musicgen:temperature": "abc"}
    )
    assert private_reply(refused) == (  # both at once, within this server's limit
        "**duration**: Enter a number between 1 and 5.\n"
        "**temperature**: Enter a number between 0 and 2."
    )
    (duration,) = [
        row["components"][0]
        for row in shown.modal["components"]
        if row["components"][0]["custom_id"] == "musicgen:duration"
    ]
    assert duration["label"] == "Duration in seconds (1-5)"


async def test_use_as_melody_is_bounded_by_the_servers_longest_track(alice, admin, channel):
    await admin.slash(channel, "music admin settings", max_duration=5.0)
    upload = await alice.send(channel, "tune", attachments=[("tune.wav", b"RIFF" * 100)])
    shown = await alice.context_menu(channel, "Use as melody", upload)
    assert text_inputs(shown)["musicgen:duration"] == "5"
    refused = await alice.submit_modal(shown, {"musicgen:prompt": "x", "musicgen:duration": "10"})
    assert private_reply(refused) == "**duration**: Enter a number between 1 and 5."


async def test_continue_this_track_on_an_uploaded_clip(alice, bob, channel, tmp_path):
    riff = encode_tone(tmp_path / "riff.m4a", seconds=1.5).read_bytes()
    upload = await alice.send(channel, "my riff", attachments=[("riff.m4a", riff)])
    shown = await bob.context_menu(channel, "Continue this track", upload)
    assert set(text_inputs(shown)) == {"musicgen:prompt", "musicgen:length"}
    done = await bob.submit_modal(shown, {"musicgen:prompt": "guitar solo", "musicgen:length": "2"})
    reply = outcome(done)
    assert reply.content.startswith(f"<@{bob.id}>")
    assert reply.embeds[0].description.startswith("Continues an upload (riff.m4a)\n")
    assert fields(reply)["Continuation of"] == "1.5 s intro"
    assert seconds(await mp3_of(reply)) == pytest.approx(3.5, abs=0.1)
    tags = id3(await mp3(reply))
    assert (tags["musicgen_origin"], tags["musicgen_source_file"]) == (
        "upload-continuation",
        "riff.m4a",
    )
    # The hash of the upload as decoded: the same clip in any file gives the same hash.
    assert tags["musicgen_continuation_sha256"] == content_hash(decode_audio(riff, AudioLimits()))


async def test_continue_this_track_on_a_result(alice, bob, channel):
    original = await track(alice, channel, prompt="bassline", duration=2.0)
    message = channel.history()[-1]
    assert message.id == original.id
    shown = await bob.context_menu(channel, "Continue this track", message)
    done = await bob.submit_modal(shown, {"musicgen:prompt": "more bass", "musicgen:length": "1"})
    assert fields(outcome(done))["Continuation of"] == "2.0 s intro"


async def test_use_as_melody_picks_a_melody_model_and_says_so(
    simcord_env, alice, bob, channel, tmp_path
):
    tune = encode_tone(tmp_path / "tune.wav", seconds=2.0, frequency=523.0).read_bytes()
    upload = await alice.send(channel, "hum this", attachments=[("tune.wav", tune)])
    shown = await bob.context_menu(channel, "Use as melody", upload)
    assert text_inputs(shown) == {"musicgen:prompt": None, "musicgen:duration": "10"}
    done = await bob.submit_modal(shown, {"musicgen:prompt": "orchestra", "musicgen:duration": "2"})
    values = fields(outcome(done))
    assert (values["Model"], values["Melody"]) == ("debug-melody", "2.0 s clip")
    assert outcome(done).embeds[0].description.startswith("Melody from an upload (tune.wav)\n")
    tags = id3(await mp3(outcome(done)))
    assert (tags["musicgen_origin"], tags["musicgen_source_file"]) == ("upload-melody", "tune.wav")
    assert len(tags["musicgen_melody_sha256"]) == 64
    queued = [
        entry.json["content"]
        for entry in simcord_env.http_requests
        if isinstance(entry.json, dict) and "Queued as job" in str(entry.json.get("content"))
    ]
    assert "debug cannot follow a melody, so this uses debug-melody." in queued[-1]


async def test_context_menus_need_an_audio_attachment(alice, channel, tmp_path):
    text = await alice.send(channel, "no audio here")
    for name in ("Continue this track", "Use as melody"):
        refused = await alice.context_menu(channel, name, text)
        assert private_reply(refused) == "That message has no audio attachment to use."
    big = encode_tone(tmp_path / "big.wav", seconds=10.0).read_bytes()  # over the 1 MiB limit
    upload = await alice.send(channel, "too big", attachments=[("big.wav", big)])
    refused = await alice.context_menu(channel, "Use as melody", upload)
    assert "**melody**" in private_reply(refused) and "the limit is 1 MiB" in private_reply(refused)


async def test_a_bad_upload_gets_a_clear_error_after_the_form(alice, channel):
    upload = await alice.send(channel, "fake", attachments=[("fake.mp3", b"not audio" * 100)])
    shown = await alice.context_menu(channel, "Continue this track", upload)
    refused = await alice.submit_modal(shown, {"musicgen:prompt": "x", "musicgen:length": "2"})
    assert "not audio we can read" in private_reply(refused)


async def test_an_upload_without_a_decoder_is_named_after_the_menu(alice, channel):
    upload = await alice.send(channel, "odd", attachments=[("odd.wav", wav_without_decoder())])
    shown = await alice.context_menu(channel, "Use as melody", upload)
    refused = await alice.submit_modal(shown, {"musicgen:prompt": "x", "musicgen:duration": "2"})
    assert private_reply(refused) == (
        "**melody**: The melody file's audio codec is not one we can decode: "
        "upload WAV, MP3, OGG/Opus, FLAC or M4A."
    )


async def test_use_as_melody_on_an_upload_titled_in_latin_1(alice, channel, tmp_path):
    tune = encode_titled_tone(tmp_path / "cafe.flac", "Café".encode("latin-1"), seconds=2.0)
    upload = await alice.send(channel, "hum", attachments=[("cafe.flac", tune.read_bytes())])
    shown = await alice.context_menu(channel, "Use as melody", upload)
    done = await alice.submit_modal(shown, {"musicgen:prompt": "strings", "musicgen:duration": "1"})
    assert fields(outcome(done))["Melody"] == "2.0 s clip"


async def test_buttons_work_after_a_restart(simcord_env, alice, bob, channel, database):
    original = await track(alice, channel, prompt="before the restart", seed=3)
    await simcord_env.restart_bot(make_bot(database))
    rerolled = await bob.click(original, custom_id=f"musicgen:reroll:{job_id(original)}")
    assert outcome(rerolled).embeds[0].title == "before the restart"
    assert fields(outcome(rerolled))["Seed"] != "3"
    shown = await bob.click(original, label="Continue")
    done = await bob.submit_modal(shown, {"musicgen:prompt": "after", "musicgen:length": "1"})
    assert fields(outcome(done))["Continuation of"] == "2.0 s intro"
    shown = await bob.click(original, label="Edit")
    assert text_inputs(shown)["musicgen:prompt"] == "before the restart"


async def test_variations_are_several_takes_delivered_together(alice, bob, channel, database):
    original = await track(alice, channel, prompt="lofi loop", duration=1.5, seed=20)
    clicked = await bob.click(original, label="Variations")
    reply = outcome(clicked)
    assert reply.content.startswith(f"<@{bob.id}>, your tracks are ready.")
    mp3s = [a for a in reply.attachments if a.filename.endswith(".mp3")]
    assert len(mp3s) == 4
    seeds = [int(seed) for seed in fields(reply)["Seeds"].split(", ")]
    assert seeds == [seeds[0] + take for take in range(4)] and seeds[0] != 20
    assert [a.filename for a in mp3s] == [f"lofi-loop-{seed}.mp3" for seed in seeds]
    takes = [decode_audio(await a.read(), AudioLimits()).samples for a in mp3s]
    assert all(seconds(take) == pytest.approx(1.5, abs=0.1) for take in takes)
    assert not np.allclose(takes[0], takes[1], atol=1e-3)  # different seeds, different music
    (png,) = [a for a in reply.attachments if a.filename == "waveform.png"]
    assert Image.open(io.BytesIO(await png.read())).size == (800, 4 * 160 + 3 * GAP)
    assert reply.embeds[0].description.startswith(f"Variations of #{job_id(original)}\n")

    number = job_id(reply)
    shown = await alice.click(reply, custom_id=f"musicgen:continue:{number}:2")
    assert list(buttons(reply))[-8:] == [
        *(f"Continue {take}" for take in range(1, 5)),
        *(f"Stems {take}" for take in range(1, 5)),
    ]
    done = await alice.submit_modal(shown, {"musicgen:prompt": "third", "musicgen:length": "1"})
    assert fields(outcome(done))["Continuation of"] == "1.5 s intro"
    store = await SqliteStore.open(database, owner=False)
    try:
        variations = await store.get(number)
        continued = await store.get(job_id(outcome(done)))
        take_3, _ = await store.load_result(variations, take=2)
    finally:
        await store.close()
    np.testing.assert_allclose(continued.request.continuation.samples, take_3, atol=1e-6)


async def test_a_button_press_counts_against_the_pressers_limits(
    simcord_env, guild, alice, bob, channel
):
    original = await track(alice, channel)
    mods = guild.create_role("Mods", permissions=discord.Permissions(manage_guild=True))
    admin = guild.add_member(simcord_env.create_user("mod"), roles=[mods])
    await admin.slash(channel, "music admin pause")
    for _ in range(3):
        queued = await bob.click(original, label="Re-roll")
        assert "Re-roll of job" in queued.response.content
    refused = await bob.click(original, label="Variations")
    assert "already have 3 jobs" in private_reply(refused)


async def test_use_as_melody_without_any_melody_model_allowed(alice, guild, simcord_env, channel):
    mods = guild.create_role("Mods", permissions=discord.Permissions(manage_guild=True))
    admin = guild.add_member(simcord_env.create_user("mod"), roles=[mods])
    await admin.slash(channel, "music admin settings", allowed_models="debug, debug-stereo")
    upload = await alice.send(channel, "tune", attachments=[("tune.wav", b"RIFF" * 100)])
    shown = await alice.context_menu(channel, "Use as melody", upload)
    refused = await alice.submit_modal(shown, {"musicgen:prompt": "x", "musicgen:duration": "2"})
    assert private_reply(refused).startswith("**model**: No model allowed in this server")

"""The bot end to end against SimCord: discord.py's real machinery, the real engine."""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import pytest
import simcord

from bot.presentation import job_choice, matching_jobs
from generation.audio.input import MAX_PENDING_DECODES, AudioLimits, decode_audio, pending_slot
from generation.audio.output import encode_mp3_within, normalise_loudness, request_tags
from generation.jobs.job import Job
from generation.request import GenerationRequest

from .bot_helpers import fields, mp3_of, outcome, private_reply
from .bot_helpers import job_id as job_number
from .helpers import as_stored, encode_tone, ima_adpcm_wav, wav_without_decoder

# Debug-model jobs take well under a second, but the first melody model build imports
# demucs and compiles librosa's filters.
pytestmark = pytest.mark.simcord(settle_timeout=60)


def tone_bytes(tmp_path, name: str, **kwargs) -> bytes:
    return encode_tone(tmp_path / name, **kwargs).read_bytes()


async def test_generate_replies_with_an_mp3_and_what_sets_it_apart(alice, channel):
    result = await alice.slash(
        channel, "music generate", prompt="lo-fi hip hop beat", duration=2.0, seed=7
    )
    message = outcome(result)
    assert message.content.startswith(f"<@{alice.id}>")
    audio = await mp3_of(message)
    assert audio.shape[0] == 1
    assert audio.shape[1] / 32_000 == pytest.approx(2.0, abs=0.1)
    embed = message.embeds[0]
    assert embed.title == "lo-fi hip hop beat"
    assert embed.description == f"Requested by <@{alice.id}>"
    # Only the model, duration and seed: every other option has its default.
    assert fields(message) == {"Model": "debug", "Duration": "2.0 s", "Seed": "7"}

    changed = await alice.slash(
        channel, "music generate", prompt="x", duration=1.0, top_k=50, no_sampling=True
    )
    assert list(fields(outcome(changed)))[3:] == ["Top-k", "Sampling"]


async def test_every_option_reaches_the_engine(alice, channel, engine):
    """(The embed shows each option given here, as none is the default.)"""
    options = dict(
        duration=3.0,
        temperature=0.7,
        top_k=50,
        top_p=0.5,
        cfg_coef=5.0,
        two_step_cfg=True,
        extend_stride=10.0,
        seed=1234,
        model="debug-stereo",
    )
    result = await alice.slash(channel, "music generate", prompt="ambient pads", **options)
    values = fields(outcome(result))
    assert (values["Model"], values["Seed"], values["Top-k"]) == ("debug-stereo", "1234", "50")
    assert (values["Top-p"], values["CFG coef"], values["Temperature"]) == ("0.5", "5", "0.7")
    assert (values["Two-step CFG"], values["Extend stride"]) == ("on", "10 s")

    # The same request run directly gives the same audio: every option got there.
    request = GenerationRequest(prompt="ambient pads", use_sampling=True, **options)
    direct = engine.generate(request)
    data, _ = encode_mp3_within(
        as_stored(normalise_loudness(direct.audio, direct.sample_rate), direct.sample_rate),
        direct.sample_rate,
        25 * 2**20,
        tags=request_tags(direct.request),
    )
    np.testing.assert_allclose(
        await mp3_of(outcome(result)), decode_audio(data, AudioLimits()).samples, atol=1e-4
    )


async def test_no_sampling_is_greedy(alice, channel):
    first = await alice.slash(
        channel, "music generate", prompt="rock", duration=1.0, no_sampling=True, seed=1
    )
    second = await alice.slash(
        channel, "music generate", prompt="rock", duration=1.0, no_sampling=True, seed=2
    )
    assert fields(outcome(first))["Sampling"] == "off (greedy)"
    np.testing.assert_array_equal(await mp3_of(outcome(first)), await mp3_of(outcome(second)))


async def test_a_melody_upload_guides_a_melody_model(alice, channel, tmp_path):
    melody = tone_bytes(tmp_path, "melody.ogg", seconds=3.0, frequency=523.0)
    result = await alice.slash(
        channel,
        "music generate",
        prompt="jazz arrangement",
        model="debug-melody",
        duration=2.0,
        melody=("melody.ogg", melody),
    )
    assert fields(outcome(result))["Melody"] == "3.0 s clip"
    assert (await mp3_of(outcome(result))).shape[1] / 32_000 == pytest.approx(2.0, abs=0.1)


async def test_a_continuation_upload_is_extended(alice, channel, tmp_path):
    intro = tone_bytes(tmp_path, "intro.m4a", seconds=1.5, channels=2, sample_rate=48_000)
    result = await alice.slash(
        channel,
        "music generate",
        prompt="energetic solo",
        duration=3.0,
        continuation=("intro.m4a", intro),
    )
    assert fields(outcome(result))["Continuation of"] == "1.5 s intro"
    assert (await mp3_of(outcome(result))).shape[1] / 32_000 == pytest.approx(3.0, abs=0.1)


@pytest.mark.parametrize(
    ("filename", "data", "expected"),
    [
        ("notes.txt", b"definitely not audio" * 50, "not audio we can read"),
        ("huge.wav", None, "the limit is 1 MiB"),
        ("codec.wav", wav_without_decoder(), "audio codec is not one we can decode"),
        ("tiny-rate.wav", ima_adpcm_wav(sample_rate=8), "sample rate is 8 Hz"),
    ],
)
async def test_bad_uploads_are_refused_and_the_bot_keeps_serving(
    alice, channel, tmp_path, filename, data, expected
):
    if data is None:
        data = tone_bytes(tmp_path, "huge.wav", seconds=10.0)  # 1.7 MiB, over the 1 MiB limit
    rejected = await alice.slash(
        channel, "music generate", prompt="x", model="debug-melody", melody=(filename, data)
    )
    assert expected in private_reply(rejected)
    assert "**melody**" in private_reply(rejected)
    served = await alice.slash(channel, "music generate", prompt="after", duration=1.0)
    assert outcome(served).attachments


async def test_uploads_beyond_the_pending_places_are_refused_before_download(
    alice, channel, tmp_path, simcord_env, monkeypatch
):
    cdn = simcord_env.backend.cdn
    downloads = []
    read = cdn.get
    monkeypatch.setattr(cdn, "get", lambda url: downloads.append(url) or read(url))
    melody = tone_bytes(tmp_path, "m.wav", seconds=1.0)
    with contextlib.ExitStack() as held:
        for _ in range(MAX_PENDING_DECODES):  # uploads being downloaded or decoded
            held.enter_context(pending_slot("melody"))
        refused = await alice.slash(
            channel, "music generate", prompt="x", model="debug-melody", melody=("m.wav", melody)
        )
    assert private_reply(refused) == (
        "**melody**: Too many uploads are being decoded right now: send the melody again in "
        "a moment."
    )
    assert downloads == []


async def test_melody_on_a_model_without_melody_is_refused_before_queueing(
    alice, channel, tmp_path, simcord_env
):
    melody = tone_bytes(tmp_path, "m.wav", seconds=1.0)
    result = await alice.slash(
        channel, "music generate", prompt="x", model="debug", melody=("m.wav", melody)
    )
    assert "cannot follow a melody" in private_reply(result)
    queue = await alice.slash(channel, "music queue")
    assert "No jobs waiting" in queue.response.embeds[0].description
    assert not any(m.attachments for m in channel.history())


async def test_options_are_declared_with_their_ranges(alice, channel):
    with pytest.raises(simcord.OptionError) as caught:
        await alice.slash(channel, "music generate", prompt="x", temperature=2.5)
    assert caught.value.code == "option-range"
    with pytest.raises(simcord.OptionError) as caught:
        await alice.slash(channel, "music generate", prompt="x", duration=61.0)
    assert caught.value.code == "option-range"
    with pytest.raises(simcord.OptionError) as caught:
        await alice.slash(channel, "music generate", prompt="x", model="facebook/musicgen-large")
    assert caught.value.code == "option-choice"


async def test_a_job_finished_after_the_token_expired_is_posted_in_the_channel(
    alice, admin, channel, simcord_env
):
    await admin.slash(channel, "music admin pause")
    queued = await alice.slash(channel, "music generate", prompt="slow burn", duration=1.0)
    assert "paused" in queued.response.content
    await simcord_env.advance_time(16 * 60)
    await admin.slash(channel, "music admin resume")
    delivered = channel.last_message
    assert delivered.content.startswith(f"<@{alice.id}>")
    assert alice.id in [user.id for user in delivered.mentions]
    assert delivered.attachments[0].filename == "slow-burn-" + fields(delivered)["Seed"] + ".mp3"


async def test_pause_keeps_jobs_queued_and_resume_runs_them(alice, admin, channel):
    await admin.slash(channel, "music admin pause")
    queued = await alice.slash(channel, "music generate", prompt="waiting", duration=1.0)
    assert "waits until an admin resumes it" in queued.response.content
    assert "ready in" not in queued.response.content and "position" not in queued.response.content
    queue = await alice.slash(channel, "music queue")
    assert "waiting" in queue.response.embeds[0].description
    assert "Paused" in queue.response.embeds[0].footer.text
    await admin.slash(channel, "music admin resume")
    assert outcome(queued).attachments


@pytest.mark.parametrize("command", ["music admin pause", "music admin resume"])
async def test_admin_commands_need_manage_server(alice, channel, command):
    result = await alice.slash(channel, command)
    assert result.ephemeral
    assert "Manage Server" in result.response.content


async def test_cancel_a_queued_job(alice, bob, admin, channel):
    await admin.slash(channel, "music admin pause")
    first = await alice.slash(channel, "music generate", prompt="first", duration=1.0)
    second = await bob.slash(channel, "music generate", prompt="second", duration=1.0)
    job_id = int(second.response.content.split("#")[1].split(":")[0])

    refused = await alice.slash(channel, "music cancel", job=job_id)
    assert "not yours" in refused.response.content

    mine = await alice.slash(channel, "music cancel")
    assert mine.ephemeral and "Cancelled job" in mine.response.content
    assert "cancelled" in first.response.content

    by_admin = await admin.slash(channel, "music cancel", job=job_id)
    assert f"Cancelled job #{job_id}" in by_admin.response.content
    assert "cancelled" in second.response.content

    nothing = await alice.slash(channel, "music cancel")
    assert "no queued or running job" in nothing.response.content
    await admin.slash(channel, "music admin resume")
    assert not first.response.attachments and not second.response.attachments


async def test_queue_shows_position_requester_prompt_model_duration_and_eta(
    alice, bob, admin, channel
):
    await admin.slash(channel, "music admin pause")
    await alice.slash(channel, "music generate", prompt="first tune", duration=2.0)
    await bob.slash(
        channel, "music generate", prompt="second tune", model="debug-stereo", duration=3.0
    )
    result = await alice.slash(channel, "music queue")
    lines = result.response.embeds[0].description.splitlines()
    assert lines[0].startswith("1. #") and f"<@{alice.id}>" in lines[0]
    assert "first tune (debug, 2 s)" in lines[0]
    assert "waits for an admin" in lines[0] and "ready in" not in lines[0]  # paused: no ETA
    assert lines[1].startswith("2. #") and "second tune (debug-stereo, 3 s)" in lines[1]


async def test_queue_limits_are_explained(alice, admin, channel):
    await admin.slash(channel, "music admin pause")
    for n in range(3):
        await alice.slash(channel, "music generate", prompt=f"tune {n}", duration=1.0)
    refused = await alice.slash(channel, "music generate", prompt="one more", duration=1.0)
    assert "already have 3 jobs" in private_reply(refused)


async def test_models_lists_the_enabled_models_and_what_they_can_do(alice, channel):
    result = await alice.slash(channel, "music models")
    embed = result.response.embeds[0]
    names = [field.name for field in embed.fields]
    assert names == ["debug (default)", "debug-melody", "debug-stereo", "facebook/musicgen-small"]
    assert "text + melody" in embed.fields[1].value
    assert "stereo" in embed.fields[2].value


async def test_help_explains_every_option_and_gives_the_tips(alice, channel):
    result = await alice.slash(channel, "music help")
    text = "\n".join(field.value for field in result.response.embeds[0].fields)
    for option in (
        "prompt",
        "model",
        "duration",
        "temperature",
        "top_k",
        "top_p",
        "cfg_coef",
        "no_sampling",
        "melody",
        "continuation",
        "two_step_cfg",
        "extend_stride",
        "seed",
    ):
        assert f"**{option}**" in text
    for tip in ("small model", "0.7-1.2", "melody model", "same style", "Stereo"):
        assert tip in text


async def test_job_life_is_logged_without_secrets(alice, channel, caplog):
    caplog.set_level(logging.INFO)  # the bot's level (below it, libraries log request URLs)
    done = await alice.slash(channel, "music generate", prompt="logged", duration=1.0)
    failed = await alice.slash(
        channel,
        "music generate",
        prompt="no weights",
        duration=1.0,
        model="facebook/musicgen-small",
    )
    assert "could not load facebook/musicgen-small" in outcome(failed).content.lower()
    messages = [record.getMessage() for record in caplog.records]
    for event in ("queued", "started", "finished", "failed", "delivered"):
        assert any(f"event={event}" in message for message in messages), event
    assert outcome(done).attachments
    # SimCord's interaction tokens start so; the bot stores them and must never log them.
    for secret in ("not-a-real-token", "simcord_interaction_"):
        assert not any(secret in message for message in messages)


async def test_a_failing_job_does_not_stop_the_next(alice, bob, channel):
    failed = await alice.slash(
        channel, "music generate", prompt="x", duration=1.0, model="facebook/musicgen-small"
    )
    assert "failed" in outcome(failed).content
    served = await bob.slash(channel, "music generate", prompt="y", duration=1.0)
    assert outcome(served).attachments


async def test_fairness_between_two_servers(simcord_env, alice, bob, channel, caplog):
    """Three jobs from one server, then one from another: the other's runs second."""
    caplog.set_level(logging.INFO, logger="generation.jobs.worker")
    other = simcord_env.create_guild("Other Server")
    other_channel = other.create_text_channel("music")
    carol = other.add_member(simcord_env.create_user("carol"))

    async def no_settle(**_):  # let the interactions arrive while the worker is busy
        return None

    simcord_env._settle_internal = no_settle
    try:
        results = [
            await alice.slash(channel, "music generate", prompt="a1", duration=4.0),
            await alice.slash(channel, "music generate", prompt="a2", duration=1.0),
            await bob.slash(channel, "music generate", prompt="a3", duration=1.0),
        ]
    finally:
        del simcord_env._settle_internal
    results.append(await carol.slash(other_channel, "music generate", prompt="b1", duration=1.0))

    prompt_of = {
        int(outcome(r).embeds[0].footer.text.removeprefix("Job #")): outcome(r).embeds[0].title
        for r in results
    }
    started = [
        record.args[0] for record in caplog.records if record.msg.startswith("job=%d event=started")
    ]
    assert [prompt_of[job_id] for job_id in started] == ["a1", "b1", "a2", "a3"]


async def test_show_autocompletes_the_members_recent_tracks(alice, bob, admin, channel):
    made = []
    for prompt in ("lofi rain", "dark techno"):
        result = await alice.slash(channel, "music generate", prompt=prompt, duration=1.0)
        made.append(job_number(outcome(result)))
    bobs = job_number(
        outcome(await bob.slash(channel, "music generate", prompt="bob's", duration=1.0))
    )
    await alice.slash(channel, "music generate", prompt="failing", model="facebook/musicgen-small")

    choices = await alice.autocomplete(channel, "music show", "job", "")
    assert choices == [  # alice's tracks, newest first; not bob's, nor the failed job
        {"name": f"#{made[1]} dark techno (done)", "value": made[1]},
        {"name": f"#{made[0]} lofi rain (done)", "value": made[0]},
    ]
    assert [c["value"] for c in await alice.autocomplete(channel, "music show", "job", "rain")] == [
        made[0]
    ]
    typed = f"#{made[0]}"
    assert made[0] in [
        c["value"] for c in await alice.autocomplete(channel, "music show", "job", typed)
    ]
    everyone = await admin.autocomplete(channel, "music show", "job", "")
    assert [c["value"] for c in everyone] == [bobs, made[1], made[0]]
    assert everyone[0]["name"] == f"#{bobs} bob's (done, another member's)"


async def test_cancel_autocompletes_live_jobs(alice, bob, admin, channel):
    await admin.slash(channel, "music admin pause")
    queued = []
    for member, prompt in ((alice, "one"), (bob, "two"), (alice, "three")):
        result = await member.slash(channel, "music generate", prompt=prompt, duration=1.0)
        queued.append(int(result.response.content.split("job #")[1].split(":")[0]))
    mine = await alice.autocomplete(channel, "music cancel", "job", "")
    assert [c["value"] for c in mine] == [queued[0], queued[2]]
    assert mine[0]["name"] == f"#{queued[0]} one (queued)"
    assert [
        c["value"] for c in await admin.autocomplete(channel, "music cancel", "job", "")
    ] == queued
    cancelled = await alice.slash(channel, "music cancel", job=mine[0]["value"])
    assert cancelled.response.content == f"Cancelled job #{queued[0]}."
    await admin.slash(channel, "music admin resume")


def test_autocomplete_offers_at_most_25_short_choices():
    jobs = [
        Job(number, GenerationRequest(prompt="a very long prompt " * 20, model="debug"), 1, 1, 1)
        for number in range(100, 0, -1)
    ]
    names = [job_choice(job, "someone with a long name " * 5) for job in matching_jobs(jobs, "")]
    assert len(names) == 25 and all(len(name) <= 100 for name in names)
    assert [job.id for job in matching_jobs(jobs, "#1")][:3] == [100, 19, 18]


async def test_a_prompt_with_a_nul_byte_is_refused_before_it_is_queued(alice, channel):
    refused = await alice.slash(channel, "music generate", prompt="lo-fi\x00 beat", duration=1.0)
    assert "**prompt**" in private_reply(refused)
    assert "U+0000" in private_reply(refused)
    served = await alice.slash(channel, "music generate", prompt="lo-fi beat", duration=1.0)
    assert outcome(served).attachments

"""Stems: demucs' own HTDemucs (tiny, random weights) splits a result on the worker; the
Stems button posts one file per stem, and any stem feeds the existing menus."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from demucs.apply import BagOfModels
from demucs.states import serialize_model
from omegaconf import OmegaConf

from bot.presentation import result_embed
from generation.audio.input import AudioLimits, decode_audio
from generation.audio.stems import STEMS
from generation.engine.debug_models import tiny_htdemucs
from generation.engine.results import GenerationResult
from generation.engine.stems import load_separator, separate
from generation.errors import ModelLoadError
from generation.jobs.job import Job
from generation.origin import Origin, OriginKind
from generation.request import AudioClip, GenerationRequest

from .bot_helpers import buttons, fields, job_id, outcome, private_reply
from .helpers import as_stored

SR = 32_000


def chord(seconds: float, channels: int) -> AudioClip:
    t = np.arange(int(seconds * SR)) / SR
    mono = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.2 * np.sin(2 * np.pi * 330 * t)
    return AudioClip(np.stack([mono * (1 - 0.2 * c) for c in range(channels)]).astype("f4"), SR)


def test_the_released_separator_loads_through_demucs_own_loader(tmp_path):
    """A bag named htdemucs in a local demucs repository, as demucs' loader reads the
    released one (its files are the download that cannot happen here)."""
    saved = serialize_model(tiny_htdemucs(), OmegaConf.create({}), half=False)
    torch.save(saved, tmp_path / "ab12cd34.th")
    (tmp_path / "htdemucs.yaml").write_text("models: ['ab12cd34']\n")
    bag = load_separator("htdemucs", "cpu", repo=tmp_path)
    assert type(bag) is BagOfModels and bag.sources == list(STEMS)
    clip = chord(1.0, 1)
    np.testing.assert_allclose(
        separate(bag, clip, "cpu")["bass"],
        separate(tiny_htdemucs(), clip, "cpu")["bass"],
        atol=1e-5,
    )
    with pytest.raises(ModelLoadError, match="stem separator"):
        load_separator("ffffffff", "cpu", repo=tmp_path)


@pytest.mark.parametrize("channels", [1, 2])
def test_htdemucs_splits_a_track_into_its_four_stems_at_the_tracks_rate(channels):
    clip = chord(3.0, channels)
    stems = separate(tiny_htdemucs(), clip, "cpu")
    assert tuple(stems) == STEMS
    for audio in stems.values():
        assert audio.shape == clip.samples.shape
        assert audio.dtype == np.float32 and np.isfinite(audio).all()
        assert np.abs(audio).max() > 0  # random weights, but a real forward pass


def test_the_engine_splits_a_stems_jobs_track_once_and_gives_a_take_per_stem(engine):
    clip = chord(2.0, 2)
    job = Job(
        id=1,
        request=GenerationRequest(prompt="x", model="debug-stereo", duration=2.0, stems_of=clip),
        guild_id=1,
        channel_id=1,
        user_id=1,
        takes=len(STEMS),
        origin=Origin(OriginKind.STEMS, job_id=7),
    )
    results = engine.generate_batch(job.take_requests())
    assert [result.request.stem for result in results] == list(STEMS)
    assert all(result.audio.shape == clip.samples.shape for result in results)
    assert all(result.sample_rate == SR for result in results)
    alone = separate(tiny_htdemucs(), clip, "cpu")
    for result in results:
        np.testing.assert_allclose(result.audio, alone[result.request.stem], atol=1e-5)


def test_a_silent_stem_says_so_in_the_embed():
    request = GenerationRequest(prompt="x", model="debug", seed=1)
    job = Job(2, request, 1, 1, 1, takes=2, origin=Origin(OriginKind.STEMS, job_id=1))
    drums, vocals = job.take_requests()[:2]
    results = [
        GenerationResult(drums, chord(1.0, 1).samples, SR, 0.1),
        GenerationResult(vocals, np.full((1, SR), 1e-4, np.float32), SR, 0.1),  # 68 dB below
    ]
    embed = result_embed(job, results, bitrate=320)
    stems = {field.name: field.value for field in embed.fields}["Stems"]
    assert stems == "1. drums, 2. bass (silent)"


pytestmark_simcord = pytest.mark.simcord(settle_timeout=60)


@pytestmark_simcord
async def test_stems_button_posts_each_stem_within_the_upload_limit(alice, bob, channel):
    original = outcome(
        await alice.slash(channel, "music generate", prompt="funk jam", duration=3.0, seed=5)
    )
    reply = outcome(await bob.click(original, label="Stems"))
    assert reply.content.startswith(f"<@{bob.id}>")  # bob's job, counted against bob
    assert reply.embeds[0].description.startswith(f"Stems of #{job_id(original)}\n")
    values = fields(reply)
    assert values["Seed"] == "5"
    assert values["Stems"] == "1. drums, 2. bass, 3. other, 4. vocals"
    mp3s = [a for a in reply.attachments if a.filename.endswith(".mp3")]
    assert [a.filename for a in mp3s] == [f"funk-jam-5-{stem}.mp3" for stem in STEMS]
    assert sum(a.size for a in reply.attachments) <= 10 * 2**20  # the upload limit
    for attachment in mp3s:
        audio = decode_audio(await attachment.read(), AudioLimits()).samples
        assert audio.shape[-1] / SR == pytest.approx(3.0, abs=0.1)
    # A stem is continued like any take; it is not split again, nor re-rolled.
    assert list(buttons(reply)) == [f"Continue {take}" for take in range(1, 5)]


@pytestmark_simcord
async def test_a_stem_is_kept_as_separated_not_normalised(alice, channel, simcord_env, engine):
    original = outcome(
        await alice.slash(channel, "music generate", prompt="funk jam", duration=2.0, seed=3)
    )
    reply = outcome(await alice.click(original, label="Stems"))
    store = simcord_env.bot.service.store
    track, _ = await store.load_result(await store.get(job_id(original)))
    stems = await store.load_result(await store.get(job_id(reply)), take=0)
    expected = separate(tiny_htdemucs(), AudioClip(track, SR), "cpu")["drums"]
    np.testing.assert_allclose(stems[0], as_stored(expected, SR), atol=1e-5)


@pytestmark_simcord
async def test_use_as_melody_on_the_drum_stem_of_another_members_track(alice, bob, channel):
    original = outcome(
        await alice.slash(channel, "music generate", prompt="funk jam", duration=2.0, seed=5)
    )
    stems = outcome(await alice.click(original, label="Stems"))
    shown = await bob.context_menu(channel, "Use as melody", stems)
    inputs = {
        control["custom_id"]: control.get("value")
        for row in shown.modal["components"]
        for control in row["components"]
    }
    assert inputs["musicgen:file"] == "1"
    refused = await bob.submit_modal(
        shown, {"musicgen:prompt": "x", "musicgen:duration": "2", "musicgen:file": "9"}
    )
    assert private_reply(refused) == "**file**: Enter a number between 1 and 4."
    shown = await bob.context_menu(channel, "Use as melody", stems)
    done = await bob.submit_modal(
        shown,
        {"musicgen:prompt": "brass over drums", "musicgen:duration": "2", "musicgen:file": "1"},
    )
    reply = outcome(done)
    assert reply.content.startswith(f"<@{bob.id}>")
    assert reply.embeds[0].description.startswith("Melody from an upload (funk-jam-5-drums.mp3)")
    assert fields(reply)["Model"] == "debug-melody"


@pytestmark_simcord
async def test_continue_a_bass_stem_from_its_button(alice, channel):
    original = outcome(
        await alice.slash(channel, "music generate", prompt="funk jam", duration=2.0, seed=5)
    )
    stems = outcome(await alice.click(original, label="Stems"))
    shown = await alice.click(stems, label="Continue 2")
    done = await alice.submit_modal(shown, {"musicgen:prompt": "bass solo", "musicgen:length": "2"})
    reply = outcome(done)
    assert reply.embeds[0].description.startswith(f"Continues take 2 of #{job_id(stems)}")

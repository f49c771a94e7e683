"""Seamless loops: cut at the beats, a whole number of them, the end flowing into the start;
from the command line and from Discord."""

from __future__ import annotations

import shlex

import numpy as np
import pytest
import simcord
from mutagen.mp3 import MP3

from bot.cli import main
from generation.audio.loop import BEATS_PER_BAR, loop_bpm, make_loop
from generation.engine.models import resolve_model
from generation.errors import GenerationError, InvalidOption
from generation.request import GenerationRequest, validate_request

from .bot_helpers import fields, mp3_of, outcome
from .bot_helpers import job_id as job_number

SR = 32_000
BPM = 123.0


def beat_track(seconds: float = 12.0, bpm: float = BPM, offset: float = 0.3) -> np.ndarray:
    """Stereo music with a known tempo: two held tones (neither a whole number of cycles a
    beat, so a cut that is not crossfaded jumps) and a tone burst on every beat."""
    t = np.arange(int(seconds * SR)) / SR
    pad = 0.3 * np.sin(2 * np.pi * 220.3 * t) + 0.2 * np.sin(2 * np.pi * 331.0 * t)
    since = (t - offset) % (60.0 / bpm)
    attack = np.clip(since / 0.004, 0.0, 1.0)  # 4 ms: a soft attack, no step
    burst = 0.5 * attack * np.exp(-since / 0.03) * np.sin(2 * np.pi * 1000.0 * t)
    burst[t < offset] = 0.0
    mono = pad + burst
    return np.stack([mono, 0.8 * mono]).astype(np.float32)


def seam_jump(audio: np.ndarray) -> float:
    """How far the last sample is from the first: the step heard when the loop repeats."""
    return float(np.abs(audio[:, 0] - audio[:, -1]).max())


def largest_step(audio: np.ndarray) -> float:
    """The signal's own largest sample-to-sample variation inside the loop."""
    return float(np.abs(np.diff(audio, axis=-1)).max())


def test_a_loop_holds_a_whole_number_of_beats_at_the_tracks_tempo():
    loop = make_loop(beat_track(), SR, bars=4)
    assert loop.beats == 4 * BEATS_PER_BAR
    beats = loop.audio.shape[-1] / SR * BPM / 60
    assert beats == pytest.approx(16, abs=0.01)  # within 5 ms over 7.8 s
    assert loop.bpm == pytest.approx(BPM, abs=0.1)
    assert loop_bpm(4, loop.audio.shape[-1] / SR) == loop.bpm  # what the embed shows


def test_played_on_repeat_the_seam_steps_no_more_than_the_music_does():
    track = beat_track()
    loop = make_loop(track, SR, bars=2)
    twice = np.concatenate([loop.audio, loop.audio], axis=-1)
    assert seam_jump(loop.audio) <= largest_step(loop.audio)
    assert largest_step(twice) == pytest.approx(largest_step(loop.audio))
    # The same cut without the crossfade clicks: the measure can tell.
    length = loop.audio.shape[-1]
    start = round(0.3 * SR)
    hard_cut = track[:, start : start + length]
    assert seam_jump(hard_cut) > 3 * largest_step(hard_cut)
    # No gap: the ends are as loud as the rest.
    edge = int(0.05 * SR)
    rms = float(np.sqrt(np.mean(loop.audio**2)))
    for part in (loop.audio[:, :edge], loop.audio[:, -edge:]):
        assert np.sqrt(np.mean(part**2)) > 0.5 * rms


def test_a_track_too_short_for_the_bars_says_which_duration_would_do():
    with pytest.raises(GenerationError, match=r"At 123 BPM, 8 bars take 1[56]\.\d s but 6\.0 s"):
        make_loop(beat_track(seconds=6.0), SR, bars=8)


def test_silence_has_no_beat_to_loop_on():
    with pytest.raises(GenerationError, match="no steady beat"):
        make_loop(np.zeros((1, 5 * SR), np.float32), SR, bars=1)


@pytest.mark.parametrize("bars", [-1, 17, 2.5, True])
def test_the_number_of_bars_is_bounded(bars):
    request = GenerationRequest(prompt="x", model="debug", loop=bars)
    with pytest.raises(InvalidOption) as error:
        validate_request(request, resolve_model("debug"))
    assert error.value.option == "loop"
    assert "from 1 to 16" in error.value.message


def test_the_command_line_writes_a_loop_with_its_tempo(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = "generate --model debug --prompt 'drum loop' --duration 8 --seed 1 --loop 2"
    assert main([*shlex.split(args), "--output", "loop.mp3"]) == 0
    tags = MP3(tmp_path / "loop.mp3").tags
    assert tags["TXXX:musicgen_loop"].text == ["2 bars"]
    bpm = float(tags["TXXX:musicgen_bpm"].text[0])
    assert f"a 2-bar loop at {bpm:.2f} BPM" in capsys.readouterr().out


def test_the_command_line_refuses_too_many_bars_naming_the_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["generate", "--model", "debug", "--prompt", "x", "--loop", "17"])
    assert "--loop: Use a whole number of bars from 1 to 16" in capsys.readouterr().err


@pytest.mark.simcord(settle_timeout=60)
async def test_discord_loop_shows_its_bpm_and_repeats_without_a_click(alice, channel, simcord_env):
    result = await alice.slash(
        channel, "music generate", prompt="drum loop", duration=8.0, seed=1, loop=2
    )
    message = outcome(result)
    bars, bpm = fields(message)["Loop"].split(" bars at ")
    assert bars == "2"
    bpm = float(bpm.removesuffix(" BPM"))
    store = simcord_env.bot.service.store
    kept, rate = await store.load_result(await store.get(job_number(message)))
    # The loop as kept (loudness normalised) is 8 beats at the tempo shown...
    assert kept.shape[-1] / rate * bpm / 60 == pytest.approx(8, abs=0.01)
    # ...and repeats without a step larger than the music's own.
    assert seam_jump(kept) <= largest_step(kept)
    audio = await mp3_of(message)
    assert audio.shape[-1] / rate == pytest.approx(kept.shape[-1] / rate, abs=0.05)


@pytest.mark.simcord(settle_timeout=60)
async def test_discord_loop_is_bounded_and_a_short_track_says_what_to_change(alice, channel):
    with pytest.raises(simcord.OptionError) as caught:
        await alice.slash(channel, "music generate", prompt="x", loop=17)
    assert caught.value.code == "option-range"
    result = await alice.slash(
        channel, "music generate", prompt="drum loop", duration=3.0, seed=1, loop=8
    )
    failed = outcome(result).content
    assert "failed: At " in failed
    assert "ask for a duration of at least" in failed

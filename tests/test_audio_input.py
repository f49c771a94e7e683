"""Uploads are decoded safely: right length and layout, or a clear error."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from generation.audio.input import (
    MAX_DECODERS,
    MAX_PENDING_DECODES,
    AudioLimits,
    decode_audio,
    decode_upload,
    decoder_slot,
    pending_slot,
    read_audio_file,
)
from generation.errors import AudioInputError

from .helpers import (
    FORMATS,
    encode_titled_tone,
    encode_tone,
    ima_adpcm_wav,
    wav_without_decoder,
    with_id3v1,
)

LIMITS = AudioLimits()


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_each_upload_format_decodes_to_the_model_rate(tmp_path, fmt):
    path = encode_tone(tmp_path / f"tone.{fmt}", seconds=2.0, channels=2)
    clip = decode_audio(path.read_bytes(), LIMITS, "melody")
    assert clip.sample_rate == 32_000
    assert clip.channels == 2
    assert clip.seconds == pytest.approx(2.0, abs=0.05)
    assert 0.05 < np.abs(clip.samples).max() <= 1.0


def test_mono_stays_mono_and_many_channels_fold_to_stereo(tmp_path):
    mono = encode_tone(tmp_path / "mono.wav", channels=1, sample_rate=8_000)
    surround = encode_tone(tmp_path / "surround.wav", channels=6, sample_rate=96_000)
    assert decode_audio(mono.read_bytes(), LIMITS).channels == 1
    clip = decode_audio(surround.read_bytes(), LIMITS)
    assert (clip.channels, clip.sample_rate) == (2, 32_000)


def test_an_oversized_file_is_refused_before_it_is_read(tmp_path, monkeypatch):
    path = encode_tone(tmp_path / "big.wav", seconds=1.0)
    limits = AudioLimits(max_bytes=1000)
    monkeypatch.setattr(type(path), "read_bytes", lambda self: pytest.fail("file was read"))
    with pytest.raises(AudioInputError, match=r"MiB; the limit is"):
        read_audio_file(path, limits, "melody")


def test_a_long_clip_is_refused_while_decoding(tmp_path):
    # Ten minutes of FLAC silence is under 1% of its PCM: it must not expand to all of it.
    path = encode_tone(tmp_path / "long.flac", seconds=600.0, frequency=0.0)
    assert path.stat().st_size < 600 * 44_100 * 2 * 2 / 100
    with pytest.raises(AudioInputError, match="longer than 30 seconds"):
        decode_audio(path.read_bytes(), AudioLimits(max_seconds=30), "continuation")


def test_decoding_has_a_time_budget(tmp_path):
    path = encode_tone(tmp_path / "tone.mp3", seconds=5.0)
    with pytest.raises(AudioInputError, match="took too long"):
        decode_audio(path.read_bytes(), AudioLimits(timeout_seconds=0.0), "melody")


@pytest.mark.parametrize(
    "data",
    [
        b"this is not audio at all" * 10,
        b"\x89PNG\r\n\x1a\n" + bytes(200),
        b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(40),
    ],
    ids=["text", "png", "truncated-wav"],
)
def test_corrupt_or_non_audio_input_gets_a_clear_error(data):
    with pytest.raises(AudioInputError, match="melody"):
        decode_audio(data, LIMITS, "melody")


def test_an_empty_file_is_refused():
    with pytest.raises(AudioInputError, match="empty"):
        decode_audio(b"", LIMITS, "melody")


def test_a_playlist_cannot_make_the_decoder_open_a_network_address():
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(1.0)
    port = server.getsockname()[1]
    connections: list[object] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            connections.append(server.accept())

    listener = threading.Thread(target=accept)
    listener.start()
    playlist = (
        "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n"
        f"http://127.0.0.1:{port}/segment.ts\n#EXT-X-ENDLIST\n"
    ).encode()
    try:
        with pytest.raises(AudioInputError):
            decode_audio(playlist, LIMITS, "melody")
    finally:
        listener.join()
        server.close()
    assert connections == []


def test_a_missing_file_is_named():
    with pytest.raises(AudioInputError, match=r"nowhere\.wav"):
        read_audio_file("nowhere.wav", LIMITS, "melody")


# Decodes a file in a fresh interpreter and prints how much its peak RSS grew, in MiB: PyAV
# allocates in C, where tracemalloc cannot see. A small WAV is decoded first, so the codec
# tables and the resampler's code count as the baseline.
PEAK_RSS_SCRIPT = """
import json, sys
from generation.audio.input import AudioLimits, decode_audio
from tests.helpers import peak_resident_bytes, riff_wav
import struct
warm = riff_wav(struct.pack("<HHIIHH", 1, 1, 8000, 16000, 2, 16), bytes(16000))
decode_audio(warm, AudioLimits(), "melody")
limits = AudioLimits(**json.loads(sys.argv[2]))
before = peak_resident_bytes()
try:
    decode_audio(open(sys.argv[1], "rb").read(), limits, "melody")
    error = None
except Exception as e:
    error = f"{type(e).__name__}: {e}"
grown = (peak_resident_bytes() - before) / 2**20
print(json.dumps({"error": error, "grown_mib": grown}))
"""


def peak_rss_of_decoding(path, **limits) -> dict:
    run = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_SCRIPT, str(path), json.dumps(limits)],
        capture_output=True,
        text=True,
        check=True,
        env={"OMP_NUM_THREADS": "1", "PATH": ""},
        cwd=Path(__file__).parents[1],
    )
    return json.loads(run.stdout)


@pytest.mark.parametrize(
    ("limits", "refusal"),
    [
        ({}, "sample rate is 8 Hz: upload audio at 8,000 to 384,000 Hz"),
        # Without the rate floor, the frame's length is checked before it is resampled.
        ({"min_input_rate": 1}, "longer than 120 seconds"),
    ],
    ids=["rate-floor", "frame-length"],
)
def test_a_tiny_declared_rate_cannot_expand_a_small_file(tmp_path, limits, refusal):
    # 4 KiB of IMA-ADPCM at 8 Hz: one block is 17 minutes, 750 MiB once resampled to 32 kHz.
    path = tmp_path / "tiny-rate.wav"
    path.write_bytes(ima_adpcm_wav(sample_rate=8))
    assert path.stat().st_size < 4200
    outcome = peak_rss_of_decoding(path, **limits)
    assert outcome["error"] is not None and refusal in outcome["error"]
    assert outcome["error"].startswith("AudioInputError: The melody")
    assert outcome["grown_mib"] < 32  # max_seconds of 32 kHz stereo float32 is 29 MiB


def test_an_absurdly_high_rate_is_refused(tmp_path):
    path = encode_tone(tmp_path / "fast.wav", seconds=0.1, sample_rate=768_000)
    with pytest.raises(AudioInputError, match="768,000 Hz: upload audio at 8,000 to 384,000 Hz"):
        decode_audio(path.read_bytes(), LIMITS, "continuation")


@pytest.mark.parametrize("fmt", ["wav", "flac"])
def test_a_latin_1_title_does_not_stop_a_decode(tmp_path, fmt):
    title = "Café".encode("latin-1")  # not UTF-8, as the container expects
    path = encode_titled_tone(tmp_path / f"titled.{fmt}", title, seconds=1.0)
    assert title in path.read_bytes()
    clip = decode_audio(path.read_bytes(), LIMITS, "melody")
    assert clip.seconds == pytest.approx(1.0, abs=0.05)


def test_a_latin_1_id3v1_tag_does_not_stop_a_decode(tmp_path):
    mp3 = encode_tone(tmp_path / "tone.mp3", seconds=1.0).read_bytes()
    clip = decode_audio(with_id3v1(mp3, "Café".encode("latin-1")), LIMITS, "melody")
    assert clip.seconds == pytest.approx(1.0, abs=0.1)


def test_a_stream_whose_format_changes_mid_way_decodes(tmp_path):
    first = encode_tone(tmp_path / "a.mp3", seconds=1.0, sample_rate=44_100, channels=1)
    second = encode_tone(
        tmp_path / "b.mp3", seconds=1.5, frequency=880.0, sample_rate=22_050, channels=2
    )
    clip = decode_audio(first.read_bytes() + second.read_bytes(), LIMITS, "melody")
    assert clip.sample_rate == 32_000
    assert clip.seconds == pytest.approx(2.5, abs=0.1)
    # Both halves are there, each at its own pitch once resampled.
    for start, frequency in ((0.2, 440.0), (1.5, 880.0)):
        part = clip.samples[0, int(start * 32_000) : int((start + 0.5) * 32_000)]
        peak = np.argmax(np.abs(np.fft.rfft(part))) / 0.5
        assert peak == pytest.approx(frequency, abs=4.0)


def test_a_codec_without_a_decoder_is_refused_clearly():
    with pytest.raises(AudioInputError, match="melody file's audio codec is not one we can"):
        decode_audio(wav_without_decoder(), LIMITS, "melody")


def test_decoders_at_once_are_bounded(tmp_path):
    wav = encode_tone(tmp_path / "tone.wav", seconds=0.5).read_bytes()
    busy = AudioLimits(timeout_seconds=0.05)
    with contextlib.ExitStack() as held:
        for _ in range(MAX_DECODERS):
            held.enter_context(decoder_slot(LIMITS, "melody"))
        with pytest.raises(AudioInputError, match=r"Too many uploads .* send the melody again"):
            decode_audio(wav, busy, "melody")
    assert decode_audio(wav, busy, "melody").seconds == pytest.approx(0.5, abs=0.05)


async def test_uploads_waiting_for_a_decoder_are_bounded(tmp_path):
    wav = encode_tone(tmp_path / "tone.wav", seconds=0.5).read_bytes()
    limits = AudioLimits(timeout_seconds=10.0)
    with contextlib.ExitStack() as held:
        for _ in range(MAX_DECODERS):
            held.enter_context(decoder_slot(LIMITS, "melody"))
        waiting = [
            asyncio.ensure_future(decode_upload(downloads(wav), limits, "melody"))
            for _ in range(MAX_PENDING_DECODES)
        ]
        await asyncio.sleep(0)  # each has been handed to a decoding thread
        with pytest.raises(AudioInputError, match="Too many uploads"):
            await decode_upload(downloads(wav), limits, "continuation")
    clips = await asyncio.gather(*waiting)
    assert [clip.seconds for clip in clips] == [pytest.approx(0.5, abs=0.05)] * len(clips)


async def test_an_upload_with_no_place_is_refused_before_it_is_downloaded(tmp_path):
    wav = encode_tone(tmp_path / "tone.wav", seconds=0.5).read_bytes()
    downloaded = []

    async def download() -> bytes:
        downloaded.append(len(wav))
        return wav

    with contextlib.ExitStack() as held:
        for _ in range(MAX_PENDING_DECODES):
            held.enter_context(pending_slot("melody"))
        with pytest.raises(AudioInputError, match=r"Too many uploads .* send the melody again"):
            await decode_upload(download, LIMITS, "melody")
        assert downloaded == []
    clip = await decode_upload(download, LIMITS, "melody")  # the places are free again
    assert (downloaded, clip.seconds) == ([len(wav)], pytest.approx(0.5, abs=0.05))


def downloads(data: bytes):
    """An upload's download, as :func:`decode_upload` takes it."""

    async def download() -> bytes:
        return data

    return download

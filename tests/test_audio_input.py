"""Uploads are decoded safely: right length and layout, or a clear error."""

from __future__ import annotations

import contextlib
import socket
import threading

import numpy as np
import pytest

from generation.audio_input import AudioLimits, decode_audio, read_audio_file
from generation.errors import AudioInputError

from .helpers import FORMATS, encode_tone

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

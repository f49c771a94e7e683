"""The waveform picture in each result's embed."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from generation.waveform import HEIGHT, WIDTH, render_waveform

from .helpers import sine


def drawn_columns(png: bytes) -> np.ndarray:
    """How many pixels of each column are drawn (not background)."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    return (pixels != pixels[0, 0]).any(axis=-1).sum(axis=0)


def test_the_picture_follows_the_loudness_of_the_audio():
    quiet_then_loud = np.concatenate([sine(1.0, 440.0) * 0.1, sine(1.0, 440.0)], axis=-1)
    png = render_waveform(quiet_then_loud)
    image = Image.open(io.BytesIO(png))
    assert (image.format, image.size) == ("PNG", (WIDTH, HEIGHT))
    heights = drawn_columns(png)
    assert heights[: WIDTH // 2].max() < heights[WIDTH // 2 :].min()
    assert heights.max() >= HEIGHT - 2  # the loudest part fills the height


def test_stereo_silence_and_very_short_audio_render():
    assert render_waveform(np.zeros((2, 32_000), np.float32))
    assert len(drawn_columns(render_waveform(np.ones((1, 10), np.float32)))) == WIDTH

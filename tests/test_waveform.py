"""The waveform picture in each result's embed."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from generation.waveform import BACKGROUND, HEIGHT, WIDTH, render_waveforms

from .helpers import sine


def drawn_columns(png: bytes) -> np.ndarray:
    """How many pixels of each column are drawn (not background)."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    return (pixels != BACKGROUND).any(axis=-1).sum(axis=0)


def test_the_picture_follows_the_loudness_of_the_audio():
    quiet_then_loud = np.concatenate([sine(1.0, 440.0) * 0.1, sine(1.0, 440.0)], axis=-1)
    png = render_waveforms([quiet_then_loud])
    image = Image.open(io.BytesIO(png))
    assert (image.format, image.size) == ("PNG", (WIDTH, HEIGHT))
    heights = drawn_columns(png)
    assert heights[: WIDTH // 2].max() < heights[WIDTH // 2 :].min()
    assert heights.max() >= HEIGHT - 2  # the loudest part fills the height


def test_stereo_silence_and_very_short_audio_render():
    assert render_waveforms([np.zeros((2, 32_000), np.float32)])
    assert len(drawn_columns(render_waveforms([np.ones((1, 10), np.float32)]))) == WIDTH


def test_takes_are_drawn_one_under_the_other():
    png = render_waveforms([sine(1.0, 440.0) * 0.01, np.zeros((1, 32_000), np.float32)])
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert pixels.shape[:2] == (2 * HEIGHT, WIDTH)
    drawn = (pixels != BACKGROUND).any(axis=-1).sum(axis=1)
    assert drawn[:HEIGHT].sum() > 10 * drawn[HEIGHT:].sum()  # quiet audio still fills its row

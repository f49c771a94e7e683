"""The waveform picture in each result's embed."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from generation.audio.waveform import (
    BACKGROUND,
    FOREGROUND,
    GAP,
    HEIGHT,
    INTRO,
    LABEL,
    MARKER,
    WIDTH,
    render_waveforms,
)

from .helpers import sine

SR = 32_000


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def drawn_columns(png: bytes) -> np.ndarray:
    """How many pixels of each column are drawn (not background)."""
    return (pixels(png) != BACKGROUND).any(axis=-1).sum(axis=0)


def coloured(image: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    return (image == colour).all(axis=-1)


def test_the_picture_follows_the_loudness_of_the_audio():
    quiet_then_loud = np.concatenate([sine(1.0, 440.0) * 0.1, sine(1.0, 440.0)], axis=-1)
    png = render_waveforms([quiet_then_loud], SR)
    image = Image.open(io.BytesIO(png))
    assert (image.format, image.size) == ("PNG", (WIDTH, HEIGHT))
    heights = drawn_columns(png)
    assert heights[: WIDTH // 2].max() < heights[WIDTH // 2 :].min()
    assert heights.max() >= HEIGHT - 2  # the loudest part fills the height


def test_one_click_does_not_flatten_the_rest():
    audio = sine(2.0, 440.0)
    audio[:, -1] = 1.0  # a click, more than three times as loud as the music
    heights = drawn_columns(render_waveforms([audio], SR))
    assert heights[: WIDTH - 1].min() >= 0.9 * HEIGHT  # the music fills its row...
    assert heights[-1] <= HEIGHT  # ...and the click is clipped to it


def test_stereo_silence_and_very_short_audio_render():
    assert render_waveforms([np.zeros((2, 32_000), np.float32)], SR)
    assert len(drawn_columns(render_waveforms([np.ones((1, 10), np.float32)], SR))) == WIDTH


def test_takes_are_numbered_and_apart():
    takes = [sine(1.0, 440.0 * (take + 1)) for take in range(4)]
    image = pixels(render_waveforms(takes, SR))
    assert image.shape[:2] == (4 * HEIGHT + 3 * GAP, WIDTH)
    tops = [take * (HEIGHT + GAP) for take in range(4)]
    labels = []
    for top in tops:
        strip = image[top : top + HEIGHT]
        assert coloured(strip, FOREGROUND).any(axis=0).sum() > 0.9 * WIDTH  # its wave
        corner = strip[:28, :28]
        assert coloured(corner, LABEL).sum() >= 5  # its number, over the wave
        labels.append(coloured(corner, LABEL))
        if top:
            assert (image[top - GAP : top] == BACKGROUND).all()  # apart from the one above
    assert all(not np.array_equal(labels[0], other) for other in labels[1:])  # 1, 2, 3, 4
    single = pixels(render_waveforms(takes[:1], SR))
    assert not coloured(single, LABEL).any()  # one take needs no number


def test_a_continuation_shows_where_its_intro_ends():
    audio = sine(3.0, 440.0)
    image = pixels(render_waveforms([audio], SR, intro_seconds=1.0))
    end = WIDTH // 3
    intro_columns = coloured(image, INTRO).any(axis=0)
    new_columns = coloured(image, FOREGROUND).any(axis=0)
    assert intro_columns[: end - 2].all() and not intro_columns[end + 3 :].any()
    assert new_columns[end + 3 :].all() and not new_columns[: end - 2].any()
    marker = np.flatnonzero(coloured(image, MARKER).sum(axis=0) >= HEIGHT - 1)
    assert marker.size and abs(marker.mean() - end) <= 2
    plain = pixels(render_waveforms([audio], SR))
    assert not coloured(plain, INTRO).any() and not coloured(plain, MARKER).any()

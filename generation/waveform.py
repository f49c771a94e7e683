"""A picture of a result: the waveform of each take as a PNG, for the result's embed."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

WIDTH, HEIGHT = 800, 160
BACKGROUND = (43, 45, 49)  # Discord's dark embed background
FOREGROUND = (88, 101, 242)  # blurple, as the embeds


def render_waveforms(takes: list[np.ndarray], *, width: int = WIDTH, height: int = HEIGHT) -> bytes:
    """Draw each take ([channels, samples]) as a waveform, top to bottom, in one PNG.

    Each is ``height`` pixels tall, with one bar per pixel column from the lowest to the
    highest sample (channels mixed down) in that column's span. Blocking (about a
    millisecond per second of audio): run it off the event loop.
    """
    image = Image.new("RGB", (width, height * len(takes)), BACKGROUND)
    for row, audio in enumerate(takes):
        image.paste(_draw(audio, width, height), (0, row * height))
    return _png(image)


def _draw(audio: np.ndarray, width: int, height: int) -> Image.Image:
    mono = np.asarray(audio, dtype=np.float32).mean(axis=0)
    columns = min(width, max(1, mono.size))
    spans = np.array_split(mono, columns) if mono.size else [np.zeros(1, np.float32)]
    lows = np.array([span.min() for span in spans])
    highs = np.array([span.max() for span in spans])
    peak = max(float(np.abs(mono).max(initial=0.0)), 1e-6)
    middle = (height - 1) / 2
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    scale = width / columns
    for column, (low, high) in enumerate(zip(lows, highs, strict=True)):
        top = middle - high / peak * middle
        bottom = middle - low / peak * middle
        left = column * scale
        draw.rectangle((left, top, left + max(scale - 1, 0), bottom), fill=FOREGROUND)
    return image


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()

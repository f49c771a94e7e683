"""A picture of a result: its waveform as a PNG, for the result's embed."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

WIDTH, HEIGHT = 800, 160
BACKGROUND = (43, 45, 49)  # Discord's dark embed background
FOREGROUND = (88, 101, 242)  # blurple, as the embeds


def render_waveform(audio: np.ndarray, *, width: int = WIDTH, height: int = HEIGHT) -> bytes:
    """Draw ``audio`` ([channels, samples]) as a PNG: one bar per pixel column, from the
    lowest to the highest sample of the channels mixed down in that column's span.

    Blocking (about a millisecond per second of audio): run it off the event loop.
    """
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
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()

"""A picture of a result: the waveform of each take as a PNG, for the result's embed."""

from __future__ import annotations

import io
from functools import cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 800, 160
#: Space between the takes of one result.
GAP = 12
BACKGROUND = (43, 45, 49)  # Discord's dark embed background
FOREGROUND = (88, 101, 242)  # blurple, as the embeds
#: The intro of a continuation (music it was given, not made).
INTRO = (128, 132, 142)
#: The line where a continuation's intro ends.
MARKER = (254, 231, 92)
LABEL = (255, 255, 255)
#: Peaks above this percentile of a take's column peaks are clipped: a click does not
#: flatten the rest of the take into a thin band.
SCALE_PERCENTILE = 99.0


def render_waveforms(
    takes: list[np.ndarray],
    sample_rate: int,
    *,
    intro_seconds: float = 0.0,
    width: int = WIDTH,
    height: int = HEIGHT,
) -> bytes:
    """Draw each take ([channels, samples]) as a waveform, top to bottom, in one PNG.

    Each is ``height`` pixels tall, with one bar per pixel column from the lowest to the
    highest sample (channels mixed down) in that column's span, scaled to the take's loud
    parts. Several takes are numbered from 1 (as their "Continue" buttons) and apart by
    :data:`GAP` pixels. The first ``intro_seconds`` (a continuation's intro) are drawn in
    grey, with a line where the new music starts. Blocking (about a millisecond per second
    of audio): run it off the event loop.
    """
    rows = len(takes)
    image = Image.new("RGB", (width, height * rows + GAP * (rows - 1)), BACKGROUND)
    for row, audio in enumerate(takes):
        intro = intro_seconds * sample_rate / max(audio.shape[-1], 1)
        strip = _draw(audio, width, height, min(intro, 1.0))
        if rows > 1:
            _label(strip, str(row + 1), (6, 4))
        image.paste(strip, (0, row * (height + GAP)))
    return _png(image)


def _draw(audio: np.ndarray, width: int, height: int, intro: float) -> Image.Image:
    """One take; ``intro`` is the fraction of it that is a continuation's intro."""
    mono = np.asarray(audio, dtype=np.float32).mean(axis=0)
    columns = min(width, max(1, mono.size))
    spans = np.array_split(mono, columns) if mono.size else [np.zeros(1, np.float32)]
    lows = np.array([span.min() for span in spans])
    highs = np.array([span.max() for span in spans])
    peaks = np.maximum(np.abs(lows), np.abs(highs))
    scale = max(float(np.percentile(peaks, SCALE_PERCENTILE)), 1e-6)
    middle = (height - 1) / 2
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    step = width / columns
    for column, (low, high) in enumerate(zip(lows, highs, strict=True)):
        top = max(middle - high / scale * middle, 0)
        bottom = min(middle - low / scale * middle, height - 1)
        left = column * step
        colour = INTRO if (column + 0.5) / columns <= intro else FOREGROUND
        draw.rectangle((left, top, left + max(step - 1, 0), bottom), fill=colour)
    if 0 < intro < 1:
        x = round(intro * width)
        draw.line((x, 0, x, height - 1), fill=MARKER, width=2)
        text_width = draw.textlength("intro", font=_font())
        if x - text_width - 8 > 0:
            _label(image, "intro", (x - text_width - 6, height - 22))
    return image


def _label(image: Image.Image, text: str, at: tuple[float, float]) -> None:
    """``text`` at ``at``, on a patch of background so the wave does not hide it."""
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = draw.textbbox(at, text, font=_font())
    draw.rectangle((left - 3, top - 2, right + 3, bottom + 2), fill=BACKGROUND)
    draw.text(at, text, fill=LABEL, font=_font())


@cache
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=16)


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()

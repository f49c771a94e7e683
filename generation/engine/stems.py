"""Splitting a track into stems (drums, bass, other, vocals) with demucs' htdemucs.

The released htdemucs is loaded through demucs' own loader (``demucs.pretrained.get_model``,
which downloads it once into torch's hub cache); debug models' tracks are split by a tiny
random-weight ``HTDemucs`` (:func:`generation.engine.debug_models.tiny_htdemucs`), so the
path runs offline. Separation follows demucs' own ``Separator.separate_tensor``: the track is
resampled to the model's rate and channels, standardised, split in overlapping segments, and
each stem brought back to the track's rate and channel count.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import torch
from audiocraft.data.audio_utils import convert_audio

from generation.audio.stems import STEMS
from generation.engine.debug_models import DEBUG_MODELS, tiny_htdemucs
from generation.engine.results import GenerationResult
from generation.errors import GenerationError, ModelLoadError
from generation.request import AudioClip, GenerationRequest

log = logging.getLogger(__name__)

#: The demucs model that splits the released models' tracks.
SEPARATOR = "htdemucs"


def load_separator(name: str, device: str, repo: Path | None = None) -> torch.nn.Module:
    """demucs model ``name`` (``debug``: the tiny random-weight one), ready on ``device``;
    from demucs' own repository (downloaded once), or from the local folder ``repo``.

    Raises:
        ModelLoadError: demucs could not load it (no network for the first download...).
    """
    if name == "debug":
        return tiny_htdemucs(device)
    from demucs.pretrained import get_model

    try:
        model = get_model(name, repo=repo)
    except Exception as error:  # demucs raises bare exceptions from the hub and the disk
        raise ModelLoadError(
            f"The stem separator ({name}) could not be loaded; try again later."
        ) from error
    return model.to(device).eval()


def separate(model: torch.nn.Module, clip: AudioClip, device: str) -> dict[str, np.ndarray]:
    """Split ``clip`` into the model's sources, each shaped like ``clip.samples``."""
    channels, length = clip.samples.shape
    wav = torch.from_numpy(np.ascontiguousarray(clip.samples, dtype=np.float32)).to(device)
    wav = convert_audio(wav, clip.sample_rate, model.samplerate, model.audio_channels)
    reference = wav.mean(0)
    mean, std = reference.mean(), reference.std() + 1e-8
    from demucs.apply import apply_model

    with torch.no_grad():
        out = apply_model(
            model, ((wav - mean) / std)[None], shifts=0, split=True, overlap=0.25, device=device
        )[0]
    out = out * std + mean
    stems = {}
    for name, source in zip(model.sources, out, strict=True):
        back = convert_audio(source, model.samplerate, clip.sample_rate, channels)
        audio = back[..., :length].float().cpu().numpy()
        stems[name] = np.pad(audio, ((0, 0), (0, length - audio.shape[-1])))
    return stems


class StemSeparator:
    """Splits tracks for the engine, keeping each demucs model it loads.

    Args:
        device: Where demucs runs (the engine's device).
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self._models: dict[str, torch.nn.Module] = {}
        self._last: tuple[AudioClip, dict[str, np.ndarray]] | None = None
        self._lock = threading.Lock()

    def separate(self, request: GenerationRequest) -> GenerationResult:
        """``request``'s ``stem`` of its ``stems_of`` track. The takes of a stems job share
        their track (one clip), which is split once: the last split is kept for the next.

        Raises:
            ModelLoadError: the separator could not be loaded.
            GenerationError: the separation gave no usable audio.
        """
        clip = request.stems_of
        assert clip is not None and request.stem in STEMS
        started = time.perf_counter()
        with self._lock:
            if self._last is None or self._last[0] is not clip:
                self._last = (clip, separate(self._model(request.model), clip, self.device))
                log.info("split a %.1f s track into stems", clip.seconds)
            audio = self._last[1][request.stem]
        if not np.isfinite(audio).all():
            raise GenerationError("Splitting the track gave no usable audio; try again.")
        elapsed = time.perf_counter() - started
        return GenerationResult(request, audio, clip.sample_rate, elapsed)

    def _model(self, music_model: str) -> torch.nn.Module:
        """The separator for a track of ``music_model``: the tiny one for debug models."""
        name = "debug" if music_model in DEBUG_MODELS else SEPARATOR
        if name not in self._models:
            self._models[name] = load_separator(name, self.device)
        return self._models[name]

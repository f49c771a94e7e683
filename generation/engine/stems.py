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
from collections.abc import Sequence
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
        self._lock = threading.Lock()

    def separate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """A result per request: its ``stem`` of its ``stems_of`` track. Takes of one job
        share their track, which is split once.

        Raises:
            ModelLoadError: the separator could not be loaded.
            GenerationError: the separation gave no usable audio.
        """
        started = time.perf_counter()
        split: dict[int, dict[str, np.ndarray]] = {}
        with self._lock:
            for request in requests:
                clip = request.stems_of
                assert clip is not None and request.stem in STEMS
                if id(clip) not in split:
                    split[id(clip)] = separate(self._model(request.model), clip, self.device)
        elapsed = time.perf_counter() - started
        results = []
        for request in requests:
            assert request.stems_of is not None
            audio = split[id(request.stems_of)][request.stem]
            if not np.isfinite(audio).all():
                raise GenerationError("Splitting the track gave no usable audio; try again.")
            results.append(GenerationResult(request, audio, request.stems_of.sample_rate, elapsed))
        log.info("split %d track(s) into stems in %.1f s", len(split), elapsed)
        return results

    def _model(self, music_model: str) -> torch.nn.Module:
        """The separator for a track of ``music_model``: the tiny one for debug models."""
        name = "debug" if music_model in DEBUG_MODELS else SEPARATOR
        if name not in self._models:
            self._models[name] = load_separator(name, self.device)
        return self._models[name]

"""The catalogue of MusicGen checkpoints and what each can do."""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

from generation.errors import ModelLoadError, UnknownModel

#: Files of a checkpoint folder, as ``audiocraft.utils.export`` writes them.
LM_CHECKPOINT = "state_dict.bin"
COMPRESSION_CHECKPOINT = "compression_state_dict.bin"

#: Number formats a model may decode in (``generation.precision``), here without torch so the
#: gateway's configuration can check them; :mod:`generation.engine.precision` applies them.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class ModelSpec:
    """A model and its capabilities.

    Args:
        name: The name users pick it by (a hub id, a debug model, or a checkpoint folder).
        size: Small, medium or large (debug models are "tiny").
        parameters: The language model's size, for people ("300M").
        melody: Whether it takes melody conditioning (``generate_with_chroma``).
        stereo: Whether it generates two channels.
        vram_gb: GPU memory it needs, roughly.
        ram_gb: System memory it needs, roughly.
        offline: Whether it is built locally with random weights (the debug models).
    """

    name: str
    size: str
    parameters: str
    melody: bool = False
    stereo: bool = False
    vram_gb: float = 0.0
    ram_gb: float = 0.0
    offline: bool = False

    @property
    def description(self) -> str:
        """One line for people: size, channels and conditioning."""
        features = ["stereo" if self.stereo else "mono", "text + melody" if self.melody else "text"]
        memory = f", ~{self.vram_gb:g} GB VRAM / {self.ram_gb:g} GB RAM" if self.vram_gb else ""
        return f"{self.size} ({self.parameters}), {', '.join(features)}{memory}"


_SMALL = {"size": "small", "parameters": "300M", "vram_gb": 2, "ram_gb": 4}
_MEDIUM = {"size": "medium", "parameters": "1.5B", "vram_gb": 6, "ram_gb": 8}
_LARGE = {"size": "large", "parameters": "3.3B", "vram_gb": 12, "ram_gb": 16}
_TINY = {"size": "tiny", "parameters": "<1M", "offline": True}

CATALOGUE: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("facebook/musicgen-small", **_SMALL),
        ModelSpec("facebook/musicgen-medium", **_MEDIUM),
        ModelSpec("facebook/musicgen-large", **_LARGE),
        ModelSpec("facebook/musicgen-melody", melody=True, **_MEDIUM),
        ModelSpec("facebook/musicgen-melody-large", melody=True, **_LARGE),
        ModelSpec("facebook/musicgen-stereo-small", stereo=True, **_SMALL),
        ModelSpec("facebook/musicgen-stereo-medium", stereo=True, **_MEDIUM),
        ModelSpec("facebook/musicgen-stereo-large", stereo=True, **_LARGE),
        ModelSpec("debug", **_TINY),
        ModelSpec("debug-melody", melody=True, **_TINY),
        ModelSpec("debug-stereo", stereo=True, **_TINY),
    )
}

DEFAULT_MODEL = "facebook/musicgen-small"


def catalogue_name(name: str) -> str | None:
    """The catalogue's name for a hub id or a short name ("small", "stereo-large"), if any."""
    for candidate in (name, f"facebook/musicgen-{name}"):
        if candidate in CATALOGUE:
            return candidate
    return None


def resolve_model(name: str) -> ModelSpec:
    """Find a model by hub id, short name ("small", "stereo-large") or checkpoint folder.

    Raises:
        UnknownModel: when nothing matches.
    """
    known = catalogue_name(name)
    if known is not None:
        return CATALOGUE[known]
    if os.path.isdir(name):
        return _spec_from_checkpoint_folder(Path(name))
    raise UnknownModel(name, list(CATALOGUE))


def _spec_from_checkpoint_folder(folder: Path) -> ModelSpec:
    """Read a local checkpoint's capabilities from the training config stored beside its weights."""
    # Here, not at the top: the catalogue must load without torch (`musicgen-bot --help`).
    import torch
    from omegaconf import OmegaConf

    lm_file = folder / LM_CHECKPOINT
    if not lm_file.is_file() or not (folder / COMPRESSION_CHECKPOINT).is_file():
        raise UnknownModel(str(folder), [*CATALOGUE, f"a folder with {LM_CHECKPOINT}"])
    try:
        # mmap keeps this cheap: only the config string is read, not the tensors.
        package = torch.load(lm_file, map_location="cpu", mmap=True, weights_only=True)
        cfg = OmegaConf.create(package["xp.cfg"])
    except pickle.UnpicklingError as error:
        raise ModelLoadError.unsafe(str(folder)) from error
    except (OSError, RuntimeError, KeyError, ValueError) as error:
        raise ModelLoadError(f"{lm_file} is not a MusicGen checkpoint: {error}") from error
    conditioners = cfg.get("conditioners") or {}
    stereo = bool(OmegaConf.select(cfg, "interleave_stereo_codebooks.use", default=False))
    return ModelSpec(
        name=str(folder),
        size="custom",
        parameters="local checkpoint",
        melody="self_wav" in conditioners,
        stereo=stereo,
    )

"""Loading models: the released checkpoints and local folders through audiocraft's loaders,
the debug models from audiocraft's builders."""

from __future__ import annotations

import logging
import pickle

import torch
from audiocraft.models import MusicGen

from generation.engine.debug_models import DEBUG_MODELS, build_debug_model
from generation.engine.models import ModelSpec
from generation.errors import ModelLoadError

log = logging.getLogger(__name__)


def default_device() -> str:
    """The first CUDA GPU when there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(spec: ModelSpec, device: str) -> MusicGen:
    """Load ``spec`` onto ``device``.

    Hub ids and checkpoint folders go through ``MusicGen.get_pretrained``, which reads the
    exported format (a YAML ``xp.cfg`` beside ``best_state``) with ``torch.load``'s default
    ``weights_only=True``: a checkpoint that needs arbitrary unpickling is refused, never run.

    Raises:
        ModelLoadError: when the weights cannot be downloaded or read.
    """
    log.info("loading model %s on %s", spec.name, device)
    if spec.name in DEBUG_MODELS:
        return build_debug_model(spec.name, device)
    try:
        return MusicGen.get_pretrained(spec.name, device=device)
    except pickle.UnpicklingError as error:
        raise ModelLoadError.unsafe(spec.name) from error
    except (OSError, KeyError, RuntimeError, ValueError) as error:
        log.warning("could not load %s: %s", spec.name, error)
        raise ModelLoadError(
            f"Could not load {spec.name}: its weights could not be downloaded or read. "
            "Check the network or the Hugging Face cache (HF_HOME), or use a local "
            "checkpoint folder."
        ) from error

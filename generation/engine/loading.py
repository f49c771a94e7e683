"""Loading models: the released checkpoints and local folders in audiocraft's format, the debug
models from audiocraft's builders.

audiocraft's own loaders build a randomly initialised model and then copy the checkpoint into
it, so loading holds the model twice (4.15 GiB at the peak for MusicGen-small). Here the same
modules are built on PyTorch's meta device (shapes, no memory) from the same config by the
same builders, and the checkpoint's tensors become the weights (``load_state_dict(...,
assign=True)``): the model is held once. The checkpoint files are found and read by
audiocraft's own functions (Hugging Face cache, local folders), as before.
"""

from __future__ import annotations

import logging
import pickle
from typing import Any

import torch
from audiocraft.models import MusicGen, builders, loaders
from omegaconf import DictConfig, OmegaConf
from torch.nn import Module

from generation.engine.debug_models import DEBUG_MODELS, build_debug_model
from generation.engine.models import ModelSpec
from generation.errors import ModelLoadError

log = logging.getLogger(__name__)

_META = torch.device("meta")


def default_device() -> str:
    """The first CUDA GPU when there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(
    spec: ModelSpec, device: str, transformer_dtype: torch.dtype | None = None
) -> MusicGen:
    """Load ``spec`` onto ``device``.

    ``transformer_dtype`` is what a checkpoint's LM transformer is built in; audiocraft's
    (float32 on a CPU, float16 on a GPU) when None. Debug models are built in float32.

    Hub ids and checkpoint folders are read by audiocraft's checkpoint functions, which load
    the exported format (a YAML ``xp.cfg`` beside ``best_state``) with ``torch.load``'s default
    ``weights_only=True``: a checkpoint that needs arbitrary unpickling is refused, never run.

    Raises:
        ModelLoadError: when the weights cannot be downloaded or read.
    """
    log.info("loading model %s on %s", spec.name, device)
    if spec.name in DEBUG_MODELS:
        return build_debug_model(spec.name, device)
    try:
        return load_checkpoint(spec.name, device, transformer_dtype)
    except pickle.UnpicklingError as error:
        raise ModelLoadError.unsafe(spec.name) from error
    except (OSError, KeyError, RuntimeError, ValueError) as error:
        log.warning("could not load %s: %s", spec.name, error)
        raise ModelLoadError(
            f"Could not load {spec.name}: its weights could not be downloaded or read. "
            "Check the network or the Hugging Face cache (HF_HOME), or use a local "
            "checkpoint folder."
        ) from error


def load_checkpoint(
    name: str, device: str, transformer_dtype: torch.dtype | None = None
) -> MusicGen:
    """What ``MusicGen.get_pretrained(name, device)`` gives, without building random weights.

    ``name`` is a hub id or a checkpoint folder. Each model is built on the meta device and
    takes the checkpoint's tensors as its weights. ``transformer_dtype`` replaces audiocraft's
    dtype for the LM's transformer (float32 on a CPU, float16 on a GPU), so that a float32 or
    bfloat16 model on a GPU is not first rounded to float16.
    """
    lm = _load_lm(loaders.load_lm_model_ckpt(name), device, transformer_dtype)
    compression_model = _load_compression_model(loaders.load_compression_model_ckpt(name), device)
    if "self_wav" in lm.condition_provider.conditioners:  # as get_pretrained does
        lm.condition_provider.conditioners["self_wav"].match_len_on_eval = True
        lm.condition_provider.conditioners["self_wav"]._use_masking = False
    return MusicGen(name, compression_model, lm)


def _load_lm(package: dict[str, Any], device: str, transformer_dtype: torch.dtype | None) -> Module:
    """``audiocraft.models.loaders.load_lm_model`` on the meta device.

    The conditioners are built on ``device`` as audiocraft builds them: they are small, except
    T5 and demucs, which they load from their own hubs and keep out of the state dict.
    """
    cfg = OmegaConf.create(package["xp.cfg"])
    cfg.device = str(device)
    cfg.dtype = "float32" if cfg.device == "cpu" else "float16"  # as audiocraft's loader
    if transformer_dtype is not None:
        cfg.dtype = str(transformer_dtype).removeprefix("torch.")
    for key in (
        "conditioners.self_wav.chroma_stem.cache_path",
        "conditioners.args.merge_text_conditions_p",
        "conditioners.args.drop_desc_p",
    ):
        loaders._delete_param(cfg, key)
    skeleton = cfg.copy()
    skeleton.device = "meta"
    skeleton.conditioners = {}
    with _META:
        lm = builders.get_lm_model(skeleton)
    lm.condition_provider = builders.get_conditioner_provider(cfg.transformer_lm.dim, cfg).to(
        device
    )
    _assign(lm, package["best_state"], device)
    lm.eval()
    lm.cfg = cfg
    return lm


def _load_compression_model(package: dict[str, Any], device: str) -> Module:
    """``audiocraft.models.loaders.load_compression_model`` on the meta device."""
    if "pretrained" in package:  # a reference to another model: audiocraft's way
        return loaders.load_compression_model(package["pretrained"], device=device)
    cfg: DictConfig = OmegaConf.create(package["xp.cfg"])
    cfg.device = "meta"
    with _META:
        model = builders.get_compression_model(cfg)
    _assign(model, package["best_state"], device)
    return model.eval()


def _assign(module: Module, state: dict[str, torch.Tensor], device: str) -> None:
    """Make ``state``'s tensors ``module``'s weights, each in the dtype the builder gave it.

    Raises:
        RuntimeError: the state does not fit the module, or a tensor the state does not hold
            (a buffer outside the state dict) would stay on the meta device.
    """
    expected = module.state_dict(keep_vars=True)
    state = {
        key: tensor.to(device, expected[key].dtype) if key in expected else tensor
        for key, tensor in state.items()
    }
    module.load_state_dict(state, strict=True, assign=True)
    left = [
        name
        for name, tensor in (*module.named_parameters(), *module.named_buffers())
        if tensor.is_meta
    ]
    if left:
        raise RuntimeError(f"the checkpoint does not set {', '.join(left)}")

"""MusicGen-small-sized models with random weights, so the benchmark needs no download.

The audiocraft LM mirrors the released configuration (audiocraft's ``musicgen_lm.yaml`` with
``model_scale/small.yaml``): dim 1024, 24 layers, 16 heads, feed-forward 4096, GELU, 4 codebooks
of 2048 in the delay pattern, cross-attention on the text, ``memory_efficient: true`` and
``custom: false`` (so the released attention path, with its key/value cache, runs). The text
conditioner is a lookup table as wide as T5-base's output (768), projected to the LM's width as
the T5 conditioner is, so prompts cost what T5 tokens cost inside the LM. The codec is the
debug models' small SEANet at 50 frames a second: it times the LM, not the 32 kHz EnCodec.

The peer is transformers' ``MusicgenForCausalLM`` decoder of the same size.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from audiocraft.models import MusicGen, builders
from omegaconf import DictConfig, OmegaConf

from generation.engine.debug_models import debug_config, offline_demucs, prepare_melody_conditioner

#: The released melody models' chroma STFT size, as a power of two (16384 points).
RELEASED_CHROMA_RADIX2_EXP = 14
#: T5-base's hidden size: the width of the released models' text embeddings.
T5_BASE_DIM = 768

_SMALL_LM: dict[str, Any] = {
    # musicgen_lm.yaml over lm/default.yaml
    "n_q": 4,
    "card": 2048,
    "memory_efficient": True,
    "custom": False,
    "causal": True,
    "past_context": None,
    "bias_proj": False,
    "bias_ff": False,
    "bias_attn": False,
    "norm_first": True,
    "layer_scale": None,
    "weight_init": "gaussian",
    "depthwise_init": "current",
    "zero_bias_init": True,
    "attention_as_float32": False,
    "activation": "gelu",
    "hidden_scale": 4,
    "dropout": 0.0,
    "positional_embedding": "sin",
    # model_scale/small.yaml
    "dim": 1024,
    "num_heads": 16,
    "num_layers": 24,
}


def small_config(device: str = "cpu", *, melody: bool = False) -> DictConfig:
    """A training config (``xp.cfg``) shaped like facebook/musicgen-small's; with ``melody``,
    the chroma conditioning of the melody models (prepended, as theirs) too."""
    cfg = debug_config("debug-melody" if melody else "debug", device)
    cfg.transformer_lm = OmegaConf.create(_SMALL_LM)
    if melody:
        # The released melody models' chroma (conditioner/chroma2music.yaml): a 16384-point
        # STFT with a hop of 4096 samples, so a 30 s window prepends 235 chroma frames. The
        # debug models' 4096-point one prepends 938, four times as many for every row to
        # attend to at every step.
        cfg.conditioners.self_wav.chroma_stem.radix2_exp = RELEASED_CHROMA_RADIX2_EXP
    cfg.conditioners.description.lut.dim = T5_BASE_DIM
    cfg.classifier_free_guidance.training_dropout = 0.3
    return cfg


def build_small_musicgen(device: str = "cpu", seed: int = 0, *, melody: bool = False) -> MusicGen:
    """A random-weight MusicGen-small-sized model, built by audiocraft's own builders (with
    ``melody``, its chroma passes through the debug models' tiny demucs)."""
    cfg = small_config(device, melody=melody)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        compression_model = builders.get_compression_model(cfg).eval()
        with offline_demucs(device):
            lm = builders.get_lm_model(cfg).eval()
    lm.cfg = cfg
    prepare_melody_conditioner(lm)
    return MusicGen("bench-small-melody" if melody else "bench-small", compression_model, lm)


def build_small_peer(device: str = "cpu", seed: int = 0) -> torch.nn.Module:
    """transformers' MusicGen decoder (with its LM heads) of the same size, random weights."""
    return _peer(_SMALL_LM, device, seed)


def build_peer(model: str) -> torch.nn.Module:
    """The transformers peer of ``model`` ("small" or "debug")."""
    if model == "small":
        return build_small_peer()
    return _peer(dict(debug_config("debug").transformer_lm), "cpu", 0)


def build_plain_and_optimised(model: str) -> tuple[MusicGen, MusicGen]:
    """``model`` ("small" or "debug") twice, sharing weights: as built, and optimised."""
    from generation.engine.debug_models import build_debug_model
    from generation.engine.decoding import optimise_for_decoding

    plain = build_small_musicgen() if model == "small" else build_debug_model("debug")
    shared = {id(t): t for t in (*plain.lm.parameters(), *plain.lm.buffers())}
    fast = MusicGen(plain.name, plain.compression_model, copy.deepcopy(plain.lm, shared))
    optimise_for_decoding(fast)
    return plain, fast


def _peer(lm: dict[str, Any], device: str, seed: int) -> torch.nn.Module:
    from transformers import MusicgenDecoderConfig, MusicgenForCausalLM

    config = MusicgenDecoderConfig(
        vocab_size=lm["card"],
        num_hidden_layers=lm["num_layers"],
        num_attention_heads=lm["num_heads"],
        hidden_size=lm["dim"],
        ffn_dim=lm["dim"] * lm["hidden_scale"],
        num_codebooks=lm["n_q"],
        activation_function="gelu",
        dropout=0.0,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MusicgenForCausalLM(config)
    return model.to(device).eval()

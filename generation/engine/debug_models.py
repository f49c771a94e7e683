"""Tiny random-weight MusicGen models built from audiocraft's own classes.

They run the real generation paths offline: ``debug`` (mono, text), ``debug-melody``
(audiocraft's chroma conditioning, with a tiny demucs separator standing in for the
downloaded htdemucs) and ``debug-stereo`` (interleaved stereo codebooks, as the released
stereo models). Each is built from an audiocraft training config through
``audiocraft.models.builders``, so the same config can be exported as a checkpoint folder and
loaded back through ``MusicGen.get_pretrained``. Weights depend only on the model name.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from audiocraft.models import MusicGen, builders
from omegaconf import DictConfig, OmegaConf

from generation.request import WINDOW_SECONDS

DEBUG_MODELS = ("debug", "debug-melody", "debug-stereo")

_SAMPLE_RATE = 32_000
_CARD = 2048  # codebook size of the released models


def debug_config(name: str, device: str = "cpu") -> DictConfig:
    """The training config (``xp.cfg``) of a debug model, shaped like the released ones."""
    if name not in DEBUG_MODELS:
        raise KeyError(name)
    stereo = name == "debug-stereo"
    melody = name == "debug-melody"
    n_q = 8 if stereo else 4
    delays = [d for d in range(4) for _ in range(2)] if stereo else list(range(4))
    conditioners: dict[str, Any] = {
        "description": {
            "model": "lut",
            "lut": {"n_bins": 4096, "dim": 16, "tokenizer": "noop"},
        }
    }
    fuser: dict[str, Any] = {
        "cross_attention_pos_emb": False,
        "cross_attention_pos_emb_scale": 1,
        "sum": [],
        "prepend": [],
        "cross": ["description"],
        "input_interpolate": [],
    }
    if melody:
        conditioners["self_wav"] = {
            "model": "chroma_stem",
            "chroma_stem": {
                "sample_rate": _SAMPLE_RATE,
                "n_chroma": 12,
                "radix2_exp": 12,
                "argmax": True,
                "match_len_on_eval": False,
                "eval_wavs": None,
                "n_eval_wavs": 0,
                "cache_path": None,
            },
        }
        fuser["prepend"] = ["self_wav", "description"]
        fuser["cross"] = []
    cfg = {
        "device": device,
        "dtype": "float32",
        "sample_rate": _SAMPLE_RATE,
        "channels": 2 if stereo else 1,
        "dataset": {"segment_duration": WINDOW_SECONDS},
        "compression_model": "encodec",
        "encodec": {
            "autoencoder": "seanet",
            "quantizer": "rvq",
            "sample_rate": _SAMPLE_RATE,
            "channels": 1,  # stereo models interleave the codes of a mono codec
            "causal": False,
            "renormalize": False,
        },
        "seanet": {
            "dimension": 16,
            "channels": 1,
            "causal": False,
            "n_filters": 2,
            "n_residual_layers": 1,
            "ratios": [8, 5, 4, 4],  # hop 640: 50 frames a second, as the released codec
            "activation": "ELU",
            "activation_params": {"alpha": 1.0},
            "norm": "weight_norm",
            "norm_params": {},
            "kernel_size": 7,
            "residual_kernel_size": 3,
            "last_kernel_size": 7,
            "dilation_base": 2,
            "pad_mode": "constant",
            "true_skip": True,
            "compress": 2,
            "lstm": 0,
            "disable_norm_outer_blocks": 0,
            "decoder": {"trim_right_ratio": 1.0, "final_activation": None},
            "encoder": {},
        },
        "rvq": {
            "n_q": 4,
            "q_dropout": False,
            "bins": _CARD,
            "decay": 0.99,
            "kmeans_init": False,
            "kmeans_iters": 0,
            "threshold_ema_dead_code": 2,
        },
        "interleave_stereo_codebooks": {"use": stereo, "per_timestep": False},
        "lm_model": "transformer_lm",
        "codebooks_pattern": {
            "modeling": "delay",
            "delay": {"delays": delays, "flatten_first": 0, "empty_initial": 0},
        },
        "transformer_lm": {
            "n_q": n_q,
            "card": _CARD,
            "dim": 16,
            "num_heads": 2,
            "num_layers": 2,
            "hidden_scale": 2,
            "memory_efficient": True,
            "custom": True,
            "causal": True,
            "bias_proj": False,
            "bias_ff": False,
            "bias_attn": False,
            "norm_first": True,
            "layer_scale": None,
            "weight_init": "gaussian",
            "depthwise_init": "current",
            "zero_bias_init": True,
            "attention_as_float32": False,
            "dropout": 0.0,
            "positional_embedding": "sin",
        },
        "classifier_free_guidance": {"training_dropout": 0.2, "inference_coef": 3.0},
        "attribute_dropout": {},
        "fuser": fuser,
        "conditioners": conditioners,
    }
    return OmegaConf.create(cfg)


def build_debug_model(name: str, device: str = "cpu") -> MusicGen:
    """Build a debug model; the same name always gives the same weights."""
    cfg = debug_config(name, device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(name.encode()))
        compression_model = builders.get_compression_model(cfg).eval()
        with offline_demucs(device):
            lm = builders.get_lm_model(cfg).eval()
    lm.cfg = cfg  # as audiocraft's loader does: MusicGen reads the window and stereo layout here
    prepare_melody_conditioner(lm)
    return MusicGen(name, compression_model, lm)


def prepare_melody_conditioner(lm: torch.nn.Module) -> None:
    """Match the chroma to the window, as ``MusicGen.get_pretrained`` does for melody models."""
    conditioners = lm.condition_provider.conditioners
    if "self_wav" in conditioners:
        conditioners["self_wav"].match_len_on_eval = True
        conditioners["self_wav"]._use_masking = False


def tiny_htdemucs(device: str = "cpu") -> torch.nn.Module:
    """A random-weight ``HTDemucs`` with htdemucs' sources and layout (depth 4, 4096-point
    spectrogram: a shallower one makes its transformer's sequence, and memory, explode)
    but 4 channels and one transformer layer: about 92 k parameters. Same weights each time.
    """
    from demucs.htdemucs import HTDemucs

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(b"htdemucs"))
        model = HTDemucs(
            sources=["drums", "bass", "other", "vocals"],
            audio_channels=2,
            channels=4,
            depth=4,
            t_layers=1,
            t_heads=1,
            t_hidden_scale=1.0,
            dconv_comp=2,
            samplerate=44_100,
            segment=4,
        )
    return model.to(device).eval()


@contextmanager
def offline_demucs(device: str = "cpu") -> Iterator[None]:
    """Hand ``ChromaStemConditioner`` a tiny random-weight htdemucs (:func:`tiny_htdemucs`)
    instead of downloading the released one, while melody models are built (or loaded from a
    checkpoint) in this block.

    The conditioner calls ``demucs.pretrained.get_model('htdemucs')`` in its constructor;
    that download is the only part of the melody path that needs a network.
    """
    from demucs import pretrained

    separator = tiny_htdemucs(device)
    original = pretrained.get_model
    pretrained.get_model = lambda name, repo=None: separator
    try:
        yield
    finally:
        pretrained.get_model = original

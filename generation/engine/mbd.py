"""MultiBand Diffusion: decoding MusicGen's tokens with audiocraft's ``MultiBandDiffusion``
instead of EnCodec's decoder (cleaner highs, fewer artefacts; 20 denoising passes per band).

The released models come through audiocraft's loader
(``MultiBandDiffusion.get_mbd_musicgen``: the 32 kHz EnCodec of musicgen-small and the
diffusion weights from ``facebook/multiband-diffusion``); debug models get a tiny random-weight
MBD built from audiocraft's own classes around their own codec, so the path runs offline.

MBD takes the 4 codebooks of the mono codec. A stereo model's 8 interleaved codebooks are
split into left and right and decoded as a mono batch of twice the size, as audiocraft's demo
does (feeding the 8 in raises ``IndexError: index 4 is out of range``, audiocraft issues
#401 and #408).
"""

from __future__ import annotations

import zlib

import torch
from audiocraft.models import MusicGen
from audiocraft.models.encodec import CompressionModel, InterleaveStereoCompressionModel
from audiocraft.models.multibanddiffusion import DiffusionProcess, MultiBandDiffusion
from audiocraft.models.unet import DiffusionUnet
from audiocraft.modules.diffusion_schedule import NoiseSchedule

from generation.engine.debug_models import DEBUG_MODELS
from generation.errors import ModelLoadError


def decode_tokens(
    mbd: MultiBandDiffusion, tokens: torch.Tensor, codec: CompressionModel
) -> torch.Tensor:
    """Audio ``[batch, channels, samples]`` from the tokens ``[batch, codebooks, frames]`` of
    a model whose compression model is ``codec`` (a stereo one's left and right codebooks are
    decoded as one mono batch)."""
    with torch.no_grad():
        if not isinstance(codec, InterleaveStereoCompressionModel):
            return mbd.tokens_to_wav(tokens)
        left, right = codec.get_left_right_codes(tokens)
        wav = mbd.tokens_to_wav(torch.cat([left, right]))  # [2b, 1, t]: lefts, then rights
    batch = tokens.shape[0]
    return torch.cat([wav[:batch], wav[batch:]], dim=1)  # [b, 2, t]


class MbdDecoders:
    """The MBD decoders loaded so far: one for the released models (they share musicgen-small's
    codec), one per debug model (each has its own random codec)."""

    def __init__(self) -> None:
        self._loaded: dict[str, MultiBandDiffusion] = {}

    def for_request(self, model: MusicGen, decoder: str) -> MultiBandDiffusion | None:
        """The MBD decoder ``decoder`` asks for with ``model``; None for EnCodec."""
        if decoder != "mbd":
            return None
        debug = model.name in DEBUG_MODELS
        key = model.name if debug else "released"
        if key not in self._loaded:
            self._loaded[key] = load_mbd(model, debug)
        return self._loaded[key]


def load_mbd(model: MusicGen, debug: bool) -> MultiBandDiffusion:
    """The MBD decoder for ``model``: audiocraft's released one, or (``debug``) a tiny one.

    Raises:
        ModelLoadError: audiocraft could not load the released weights.
    """
    device = str(model.device)
    if debug:
        return tiny_mbd(mono_codec(model), model.name)
    try:
        return MultiBandDiffusion.get_mbd_musicgen(device=device)
    except Exception as error:  # hub and disk errors of every kind
        raise ModelLoadError(
            "The MultiBand Diffusion decoder could not be loaded; try again later or use "
            "the EnCodec decoder."
        ) from error


def mono_codec(model: MusicGen) -> CompressionModel:
    """The mono codec behind ``model``'s tokens (a stereo model interleaves two of its)."""
    codec = model.compression_model
    return codec.model if isinstance(codec, InterleaveStereoCompressionModel) else codec


def tiny_mbd(codec: CompressionModel, name: str, bands: int = 2) -> MultiBandDiffusion:
    """A random-weight MBD on ``codec``: ``bands`` tiny diffusion U-Nets (conditioned on the
    codec's latents, as the released ones) with audiocraft's noise schedule. Its weights
    depend only on ``name``."""
    device = next(codec.parameters()).device
    processes = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(f"mbd:{name}".encode()))
        for _ in range(bands):
            unet = DiffusionUnet(
                chin=1, hidden=8, depth=2, num_steps=1000, codec_dim=codec.quantizer.dimension
            )
            schedule = NoiseSchedule(
                beta_t0=1e-5, beta_t1=2.9e-2, beta_exp=7.5, num_steps=1000, device=device
            )
            processes.append(DiffusionProcess(unet.to(device).eval(), schedule))
    return MultiBandDiffusion(processes, codec)

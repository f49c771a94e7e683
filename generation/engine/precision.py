"""The number format a model decodes in: ``generation.precision`` made real.

``auto`` keeps audiocraft's choice on a GPU (its LM transformer in float16, run under float16
autocast) and, on a CPU, takes bfloat16 weights only where the CPU computes in bfloat16
natively (AVX512-BF16 or AMX), where halving the bytes read per step is a gain; elsewhere
float32. On a CPU only the LM's transformer and embeddings are cast: the conditioners (T5,
chroma) run once per request and stay in float32, their outputs cast as they enter the
transformer; the output heads stay in float32; the compression model stays in float32 (its
audio quality is not worth the few milliseconds it would save).

The transformer's sinusoidal positions are computed in float32 and then cast: audiocraft computes
them in the dtype of the transformer's input, which is float32 on a GPU (its embeddings stay in
float32 there) but would be bfloat16 here, where whole numbers are exact only up to 256 (5 s
of audio) and the phases of later steps collide.
"""

from __future__ import annotations

import torch
from audiocraft.models import MusicGen
from audiocraft.modules import transformer as ac_transformer
from audiocraft.utils.autocast import TorchAutocast

from generation.engine.models import PRECISIONS

#: Parts of the LM kept in float32 on a CPU: the conditioners (run once per request) and the
#: output heads (3% of the weights), so that logits are float32 and the sampler sees no ties
#: that float32 would not have (top_k=1 stays greedy).
_FLOAT32_PARTS = ("condition_provider", "out_norm", "linears")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _cpu_probe(check: str) -> bool:
    """What PyTorch's own CPU probe (``torch._C._cpu``) says of ``check``; False if it lacks it."""
    probe = getattr(torch._C, "_cpu", None)
    return bool(getattr(probe, check, lambda: False)())


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (the AVX512-BF16 instructions or AMX
    tiles), not emulated."""
    return _cpu_probe("_is_avx512_bf16_supported") or cpu_has_amx_tiles()


def onednn_computes_bf16() -> bool:
    """Whether this CPU's oneDNN computes in bfloat16, natively or emulated on AVX-512 (what
    packing bfloat16 weights needs: on an AVX2 CPU oneDNN refuses to reorder them)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_has_amx_tiles() -> bool:
    """Whether this CPU has AMX tiles, which oneDNN uses for bfloat16 products."""
    return _cpu_probe("_is_amx_tile_supported")


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """``precision`` with ``auto`` replaced by what it means on ``device``.

    Raises:
        ValueError: ``precision`` is not one of auto, fp32, bf16, fp16.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}.")
    if precision != "auto":
        return precision
    if torch.device(device).type == "cuda":
        return "fp16"  # audiocraft's own
    return "bf16" if cpu_has_native_bf16() else "fp32"


def transformer_dtype(precision: str, device: str | torch.device) -> torch.dtype:
    """The dtype a checkpoint's LM transformer is loaded in for ``precision`` on ``device``:
    float32 on a CPU (cast afterwards by :func:`apply_precision`), the precision's on a GPU."""
    if torch.device(device).type != "cuda":
        return torch.float32
    return _DTYPES[resolve_precision(precision, device)]


def apply_precision(model: MusicGen, precision: str) -> str:
    """Set ``model`` (as audiocraft's loader left it) to decode in ``precision``.

    Returns:
        The precision applied (``auto`` resolved).
    """
    precision = resolve_precision(precision, model.device)
    dtype = _DTYPES[precision]
    lm = model.lm
    if model.device.type == "cuda":
        # As audiocraft: the transformer's weights in the dtype, the rest under autocast.
        lm.transformer.to(dtype)
        model.autocast = TorchAutocast(enabled=precision != "fp32", device_type="cuda", dtype=dtype)
        return precision
    model.autocast = TorchAutocast(enabled=False)
    if dtype == torch.float32:
        return precision
    for name, child in lm.named_children():
        if name not in _FLOAT32_PARTS:
            child.to(dtype)
    lm.condition_provider.register_forward_hook(_cast_conditions(dtype))
    lm.transformer.register_forward_hook(_to_float32)
    return precision


def _cast_conditions(dtype: torch.dtype):
    """A forward hook casting the conditioners' outputs (embeddings, not masks) to ``dtype``."""

    def hook(module, args, conditions):
        return {key: (embeds.to(dtype), mask) for key, (embeds, mask) in conditions.items()}

    return hook


def _to_float32(module, args, output: torch.Tensor) -> torch.Tensor:
    """A forward hook handing the transformer's output on in float32, to the float32 heads."""
    return output.float()


_audiocraft_sin_embedding = ac_transformer.create_sin_embedding


def _sin_embedding(
    positions: torch.Tensor, dim: int, max_period: float = 10000, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """audiocraft's ``create_sin_embedding``, computed in float32 whatever ``dtype`` it returns
    (the same result for float32, audiocraft's own case on every device)."""
    embedding = _audiocraft_sin_embedding(positions, dim, max_period, torch.float32)
    return embedding.to(dtype)


ac_transformer.create_sin_embedding = _sin_embedding

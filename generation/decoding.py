"""Faster step-by-step decoding for audiocraft's MusicGen, without forking audiocraft.

audiocraft's cross-attention projects the text conditioning to keys and values again at
every decoding step (its own TODO: "when streaming, we could actually save k, v"), although
the conditioning cannot change while the model streams. For MusicGen-small that is 2 of the
8 weight matrices of each layer read at every step for nothing. :func:`optimise_for_decoding`
makes each cross-attention keep its keys and values in its streaming state for the length of a
``generate`` call: the same operations on the same inputs, so outputs are bit for bit those of
unmodified audiocraft, on every device and under autocast.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from audiocraft.models import MusicGen
from audiocraft.modules import transformer as ac_transformer
from audiocraft.modules.transformer import StreamingMultiheadAttention
from einops import rearrange
from torch.nn import functional as F

_MARK = "_musicgen_bot_cached_kv"
# Streaming-state keys (no dots: audiocraft joins module names with them).
_SOURCE, _KEYS, _VALUES = "cross_source", "cross_keys", "cross_values"


def optimise_for_decoding(model: MusicGen) -> None:
    """Make ``model`` decode faster with identical outputs; calling it again changes nothing."""
    for module in model.lm.modules():
        if isinstance(module, StreamingMultiheadAttention) and _can_cache(module):
            _cache_cross_keys_values(module)


def _can_cache(attention: StreamingMultiheadAttention) -> bool:
    """Cross-attention on audiocraft's own path that the released models take.

    That is the custom projection with PyTorch's scaled dot product attention (released:
    ``memory_efficient: true``); other variants are left as they are.
    """
    return (
        attention.cross_attention
        and attention.custom
        and attention.memory_efficient
        and not attention.qk_layer_norm
        and ac_transformer._efficient_attention_backend == "torch"
    )


def _cache_cross_keys_values(attention: StreamingMultiheadAttention) -> None:
    if getattr(attention, _MARK, False):
        return
    original = attention.forward

    def forward(
        self: StreamingMultiheadAttention,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: Any = None,
        need_weights: bool = False,
        attn_mask: Any = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        if (
            not self._is_streaming
            or key is not value
            or key_padding_mask is not None
            or attn_mask is not None
            or need_weights
            or is_causal
        ):
            return original(
                query,
                key,
                value,
                key_padding_mask,
                need_weights,
                attn_mask,
                average_attn_weights,
                is_causal,
            )
        return _streaming_cross_attention(self, query, key), None

    attention.forward = types.MethodType(forward, attention)
    setattr(attention, _MARK, True)


def _streaming_cross_attention(
    attention: StreamingMultiheadAttention, query: torch.Tensor, source: torch.Tensor
) -> torch.Tensor:
    """audiocraft's custom memory-efficient cross-attention, projecting ``source`` once.

    Mirrors ``StreamingMultiheadAttention.forward`` operation for operation, so results match
    it exactly. The source is recognised by identity: audiocraft hands the same conditioning
    tensor to every step of a generation, and anything else is projected (and kept) anew.
    """
    dim = attention.in_proj_weight.shape[0] // 3
    weight, bias = attention.in_proj_weight, attention.in_proj_bias
    bias_q = bias_k = bias_v = None
    if bias is not None:
        bias_q, bias_k, bias_v = bias[:dim], bias[dim : 2 * dim], bias[2 * dim :]
    heads = attention.num_heads
    state = attention._streaming_state
    if state.get(_SOURCE) is source:
        k, v = state[_KEYS], state[_VALUES]
    else:
        k = F.linear(source, weight[dim : 2 * dim], bias_k)
        v = F.linear(source, weight[2 * dim :], bias_v)
        k, v = (rearrange(x, "b t (h d) -> b h t d", h=heads) for x in (k, v))
        state.update({_SOURCE: source, _KEYS: k, _VALUES: v})
    q = F.linear(query, weight[:dim], bias_q)
    q = rearrange(q, "b t (h d) -> b h t d", h=heads)
    if attention.attention_as_float32:
        q, k, v = q.float(), k.float(), v.float()
    dropout = attention.dropout if attention.training else 0
    x = F.scaled_dot_product_attention(q, k, v, is_causal=False, dropout_p=dropout)
    x = x.to(query.dtype)
    x = rearrange(x, "b h t d -> b t (h d)", h=heads)
    return attention.out_proj(x)

"""Faster step-by-step decoding for audiocraft's MusicGen, without forking audiocraft.

A decoding step on a CPU is mostly memory traffic (matrix products with 2 rows a request:
87-91% of a step), and audiocraft spends some of it for nothing:

- audiocraft's cross-attention projects the text conditioning to keys and values again at
  every step (its own TODO: "when streaming, we could actually save k, v"), although the
  conditioning cannot change while the model streams: 2 of the 8 weight matrices of each
  layer read at every step for nothing. Each cross-attention now keeps its keys and values in
  its streaming state for the length of a ``generate`` call: the same operations on the same
  inputs, so this part is bit for bit audiocraft's, on every device and under autocast.
- The decoding loop shares steps between requests (:mod:`generation.engine.continuous`), and a
  request's tokens must not depend on how many rows share its step. Its products use weights
  packed for oneDNN (:mod:`generation.engine.packed_weights`), the same bits at any number of
  rows. For a weight that is not packed, MKL's float32 ``F.linear`` on an AMD EPYC gave every
  row the same bits from 4 rows up, taking other kernels below; inside
  :func:`batch_invariant` a float32 product on the CPU with fewer rows is padded to 4
  (bfloat16 products are the same at any number of rows, and are left alone). That is MKL's
  choice of kernels, not a promise: on an Intel Xeon with AMX a row's bits among 16 rows
  differed from its bits among 1 to 15, so there only packed weights are exact.
- The self-attention's past keys and values are copied whole (``torch.cat``) at every step;
  they now grow in place in buffers with room for more steps (same values, bit for bit).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import partial
from typing import Any

import torch
from audiocraft.models import MusicGen
from audiocraft.modules import transformer as ac_transformer
from audiocraft.modules.transformer import StreamingMultiheadAttention
from einops import rearrange
from torch.nn import functional as F

from generation.engine.packed_weights import packed_linear, with_rows_padded

_MARK = "_musicgen_bot_optimised"
# Streaming-state keys (no dots: audiocraft joins module names with them).
_SOURCE = "cross_source"
CROSS_KEYS, CROSS_VALUES = "cross_keys", "cross_values"
_KEY_BUFFER, _VALUE_BUFFER = "key_buffer", "value_buffer"
_KV_ROOM = 256  # steps of room in the self-attention's key/value buffers (5 s of audio)
#: Rows from which MKL's float32 ``F.linear`` gave each row the same bits (an AMD EPYC).
_INVARIANT_ROWS = 4
_fewest_rows: ContextVar[int] = ContextVar("fewest_rows", default=1)


def optimise_for_decoding(model: MusicGen) -> None:
    """Make ``model`` decode faster, with the same results; calling it again changes nothing."""
    for module in model.lm.modules():
        if getattr(module, _MARK, False):
            continue
        if isinstance(module, StreamingMultiheadAttention) and on_released_path(module):
            _replace_forward(
                module, _cross_attention if module.cross_attention else _self_attention
            )
        elif isinstance(module, torch.nn.Linear):
            module.forward = types.MethodType(_linear_forward, module)
            setattr(module, _MARK, True)


@contextmanager
def batch_invariant() -> Iterator[None]:
    """Within this block, each row of a float32 product on the CPU gets the same bits whatever
    the number of rows (see the module's docstring)."""
    token = _fewest_rows.set(_INVARIANT_ROWS)
    try:
        yield
    finally:
        _fewest_rows.reset(token)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear``, by packed weights inside :meth:`PackedWeights.active`, with fewer rows
    padded inside :func:`batch_invariant`."""
    product = packed_linear(x, weight, bias)
    if product is not None:
        return product
    if x.device.type != "cpu" or weight.dtype != torch.float32:
        return F.linear(x, weight, bias)
    product = partial(F.linear, weight=weight, bias=bias)
    return with_rows_padded(x, _fewest_rows.get(), weight.shape[0], product)


def _linear_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self.bias)


def on_released_path(attention: StreamingMultiheadAttention) -> bool:
    """Attention on audiocraft's path that the released models take.

    That is the custom projection with PyTorch's scaled dot product attention (released:
    ``memory_efficient: true``), sinusoidal positions and plain heads; other variants are left
    as they are.
    """
    return (
        attention.custom
        and attention.memory_efficient
        and not attention.qk_layer_norm
        and attention.rope is None
        and attention.kv_repeat == 1
        and ac_transformer._efficient_attention_backend == "torch"
    )


_Step = Callable[[StreamingMultiheadAttention, torch.Tensor, torch.Tensor], torch.Tensor]


def _replace_forward(attention: StreamingMultiheadAttention, step: _Step) -> None:
    """Run ``step`` for the streaming calls it handles, audiocraft's forward for the others."""
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
        plain = key_padding_mask is None and attn_mask is None and not (need_weights or is_causal)
        if not (plain and self._is_streaming and _one_step(self, query, key, value)):
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
        return step(self, query, key), None

    attention.forward = types.MethodType(forward, attention)
    setattr(attention, _MARK, True)


def _one_step(
    attention: StreamingMultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
) -> bool:
    """A decoding step: one new query against the text, or against itself and the past."""
    if attention.cross_attention:
        return key is value
    return attention.causal and query is key and key is value and query.shape[1] == 1


def _self_attention(
    attention: StreamingMultiheadAttention, query: torch.Tensor, _: torch.Tensor
) -> torch.Tensor:
    """audiocraft's custom memory-efficient self-attention for one new step.

    Mirrors ``StreamingMultiheadAttention.forward`` (one query needs no mask), with
    audiocraft's own ``_complete_kv`` keeping the past keys and values.
    """
    heads = attention.num_heads
    projected = linear(query, attention.in_proj_weight, attention.in_proj_bias)
    packed = rearrange(projected, "b t (p h d) -> b h p t d", p=3, h=heads)
    q, k, v = packed.unbind(dim=2)
    if attention.past_context is None and "past_keys" in attention._streaming_state:
        k, v = _append_kv(attention._streaming_state, k, v)
    else:
        k, v = attention._complete_kv(k, v)
    return _attend(attention, q, k, v, query.dtype)


def _append_kv(
    state: dict[str, torch.Tensor], k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """audiocraft's ``_complete_kv`` without its ``torch.cat`` of the whole past at each step.

    That copy grows with the context and the batch, and rivals the attention itself late in
    a window of several requests. The past lives in buffers with room for ``_KV_ROOM`` more
    steps; ``past_keys`` and ``past_values`` stay audiocraft's ``[B, H, T, D]``, as views.
    """
    past = state["past_keys"], state["past_values"]
    buffers = state.get(_KEY_BUFFER), state.get(_VALUE_BUFFER)
    steps = past[0].shape[2]
    if any(
        b is None or not _views_start_of(p, b) or b.shape[2] == steps
        for p, b in zip(past, buffers, strict=True)
    ):
        buffers = tuple(_with_room(p) for p in past)
    for buffer, new in zip(buffers, (k, v), strict=True):
        buffer[:, :, steps : steps + 1] = new
    keys, values = (b[:, :, : steps + 1] for b in buffers)
    state.update(
        {
            "past_keys": keys,
            "past_values": values,
            _KEY_BUFFER: buffers[0],
            _VALUE_BUFFER: buffers[1],
        }
    )
    return keys, values


def _views_start_of(view: torch.Tensor, buffer: torch.Tensor) -> bool:
    return view.data_ptr() == buffer.data_ptr() and view.stride() == buffer.stride()


def _with_room(past: torch.Tensor) -> torch.Tensor:
    b, h, t, d = past.shape
    buffer = past.new_empty(b, h, t + _KV_ROOM, d)
    buffer[:, :, :t] = past
    return buffer


def _cross_attention(
    attention: StreamingMultiheadAttention, query: torch.Tensor, source: torch.Tensor
) -> torch.Tensor:
    """audiocraft's custom memory-efficient cross-attention, projecting ``source`` once.

    Mirrors ``StreamingMultiheadAttention.forward`` operation for operation (keys and values
    bit for bit). The source is recognised by identity: audiocraft hands the same conditioning
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
        k, v = state[CROSS_KEYS], state[CROSS_VALUES]
    else:
        k = F.linear(source, weight[dim : 2 * dim], bias_k)
        v = F.linear(source, weight[2 * dim :], bias_v)
        k, v = (rearrange(x, "b t (h d) -> b h t d", h=heads) for x in (k, v))
        state.update({_SOURCE: source, CROSS_KEYS: k, CROSS_VALUES: v})
    q = linear(query, weight[:dim], bias_q)
    q = rearrange(q, "b t (h d) -> b h t d", h=heads)
    return _attend(attention, q, k, v, query.dtype)


def _attend(
    attention: StreamingMultiheadAttention,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    if attention.attention_as_float32:
        q, k, v = q.float(), k.float(), v.float()
    dropout = attention.dropout if attention.training else 0
    x = F.scaled_dot_product_attention(q, k, v, is_causal=False, dropout_p=dropout)
    x = x.to(dtype)
    x = rearrange(x, "b h t d -> b t (h d)", h=attention.num_heads)
    return attention.out_proj(x)

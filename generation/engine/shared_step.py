"""One decoding step for every row of a model at once, each row with its own past.

audiocraft's ``LMModel`` steps a batch whose rows all started together: one past length, one
position, one conditioning length. Here rows join and leave at any step, so each row keeps
its own position and past (:class:`generation.engine.row_cache.RowCache`), and attention is
masked per row. Two parts:

- :func:`prefill` runs a row's first step (its prompt codes, its prepended melody chroma) through
  audiocraft's own streaming forward, alone, and takes the keys and values it leaves behind: the
  first step is audiocraft's, operation for operation.
- :func:`shared_step` runs one new token of every row through the same modules (embeddings,
  layer norms, feed-forward blocks, output heads are audiocraft's; attention is the one part
  written here, with each row's mask), and returns each row's logits.

Only models on the released attention path qualify (:func:`supports`); the engine refuses to
load others, saying so.
"""

from __future__ import annotations

import torch
from audiocraft.models import MusicGen
from audiocraft.modules import transformer as ac_transformer
from audiocraft.modules.transformer import StreamingTransformerLayer
from einops import rearrange
from torch.nn import functional as F

from generation.engine import past_attention
from generation.engine.decoding import (
    CROSS_KEYS,
    CROSS_VALUES,
    batch_invariant,
    linear,
    on_released_path,
)
from generation.engine.row_cache import RowCache, RowPast

ConditionTensors = dict[str, tuple[torch.Tensor, torch.Tensor]]


def attention_dtype(model: MusicGen) -> torch.dtype | None:
    """The dtype a loop keeps keys and values in: the transformer's own (None), except on a
    CPU whose weights are in a dtype :mod:`generation.engine.past_attention` does not read
    (float16), where it is float32."""
    if model.device.type != "cpu" or _weights_dtype(model) in past_attention.SUPPORTED_DTYPES:
        return None
    return torch.float32


def compile_attention(model: MusicGen) -> None:
    """On a CPU, compile the attention kernel for the past ``model``'s loop keeps: when the
    model loads, rather than in the first request's first step."""
    if model.device.type == "cpu":
        past_attention.warm_up(attention_dtype(model) or _weights_dtype(model))


def _weights_dtype(model: MusicGen) -> torch.dtype:
    return model.lm.transformer.layers[0].self_attn.in_proj_weight.dtype


def supports(model: MusicGen) -> bool:
    """Whether ``model`` can share steps: every attention on the released path (see
    :func:`generation.engine.decoding.on_released_path`), sinusoidal positions, no context
    limit, and conditions that are cross-attended or prepended (not summed into the input)."""
    lm = model.lm
    transformer = lm.transformer
    attentions = [
        module
        for layer in transformer.layers
        for module in (layer.self_attn, layer.cross_attention)
        if module is not None
    ]
    return (
        transformer.positional_embedding == "sin"
        and transformer.checkpointing == "none"
        and all(on_released_path(attention) for attention in attentions)
        and all(layer.self_attn.past_context is None for layer in transformer.layers)
        and all(layer.norm_first for layer in transformer.layers)
        and set(lm.fuser.cond2fuse.values()) <= {"cross", "prepend"}
        and not lm.fuser.cross_attention_pos_emb
    )


@torch.no_grad()
def prefill(
    model: MusicGen, sequence: torch.Tensor, conditions: ConditionTensors
) -> tuple[torch.Tensor, list[RowPast]]:
    """Run the first step of ``sequence`` (``[rows, codebooks, steps]``) with ``conditions``.

    Returns:
        The logits of the last step (``[rows, codebooks, card]``) and each row's past.
    """
    lm = model.lm
    with lm.streaming():
        logits = lm(sequence, conditions=[], condition_tensors=conditions)[:, :, -1]
        pasts = [_row_past(lm, row) for row in range(sequence.shape[0])]
    return logits, pasts


@torch.no_grad()
@batch_invariant()
def shared_step(model: MusicGen, cache: RowCache, tokens: torch.Tensor) -> torch.Tensor:
    """Decode one step of every row in ``cache``, whose last tokens are ``tokens``
    (``[rows, codebooks]``); the step's keys and values are written after each row's past
    (``cache.advance()`` counts them in once the step is taken).

    Returns:
        Logits ``[rows, codebooks, card]``.
    """
    lm = model.lm
    transformer = lm.transformer
    codebooks = tokens.shape[1]
    x = sum(lm.emb[k](tokens[:, k : k + 1]) for k in range(codebooks))
    width = x.shape[-1]
    positions = cache.lengths.view(-1, 1, 1)
    # Looked up at call time: generation.engine.precision computes positions in float32.
    embedding = ac_transformer.create_sin_embedding(
        positions, width, max_period=transformer.max_period, dtype=x.dtype
    )
    x = x + transformer.positional_scale * embedding
    cache.prepare_step()
    layout = _Layout(cache, exact=not padded_attention(x.device))
    for index, layer in enumerate(transformer.layers):
        x = _layer_step(layer, index, x, cache, layout)
    if x.dtype != lm.linears[0].weight.dtype and not torch.is_autocast_enabled(x.device.type):
        x = x.to(lm.linears[0].weight.dtype)  # as the precision's hook does for the transformer
    if lm.out_norm:
        x = lm.out_norm(x)
    logits = torch.stack([lm.linears[k](x) for k in range(codebooks)], dim=1)
    return logits[:, :, -1]


def padded_attention(device: torch.device) -> bool:
    """Whether rows attend all at once over padded, masked keys (on a GPU; see :class:`_Layout`)."""
    return device.type != "cpu"


class _Layout:
    """Which keys each row attends to in this step.

    On a CPU, exactly its own (``exact``): :func:`generation.engine.past_attention.attend`
    reads each row's past up to its own length, so a request's tokens do not depend on the
    others' lengths. On a GPU, all rows at once with masks over the padding (one kernel;
    the last bits may then depend on the mixture, as with any batched GPU inference), over
    whole blocks of time (:meth:`RowCache.padded_time`), so that the shapes repeat.
    """

    def __init__(self, cache: RowCache, *, exact: bool) -> None:
        self.lengths = cache.attended_lengths() if exact else None
        self.masks = None if exact else cache.masks(cache.padded_time())

    def attend(
        self,
        attention: torch.nn.Module,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        dtype: torch.dtype,
        *,
        cross: bool,
    ) -> torch.Tensor:
        if self.lengths is not None:
            lengths = self.lengths[1] if cross else self.lengths[0]
            x = past_attention.attend(q, keys, values, lengths)  # sums in float32
        else:
            assert self.masks is not None
            mask = self.masks[1] if cross else self.masks[0]
            keys, values = keys[:, :, : mask.shape[-1]], values[:, :, : mask.shape[-1]]
            if attention.attention_as_float32:
                keys, values = keys.float(), values.float()
            q = q.to(keys.dtype)  # the cache may keep a wider type (see attention_dtype)
            x = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        x = rearrange(x.to(dtype), "b h t d -> b t (h d)")
        return attention.out_proj(x)


def _layer_step(
    layer: StreamingTransformerLayer, index: int, x: torch.Tensor, cache: RowCache, layout: _Layout
) -> torch.Tensor:
    """``StreamingTransformerLayer.forward`` (norm first) for one step of every row."""
    attention = layer.self_attn
    projected = linear(layer.norm1(x), attention.in_proj_weight, attention.in_proj_bias)
    q, k, v = rearrange(projected, "b t (p h d) -> b h p t d", p=3, h=attention.num_heads).unbind(2)
    keys, values = cache.write(index, k, v)
    x = x + layer.layer_scale_1(layout.attend(attention, q, keys, values, x.dtype, cross=False))
    if layer.cross_attention is not None:
        cross = layer.cross_attention
        dim = cross.in_proj_weight.shape[0] // 3
        bias = None if cross.in_proj_bias is None else cross.in_proj_bias[:dim]
        query = linear(layer.norm_cross(x), cross.in_proj_weight[:dim], bias)
        query = rearrange(query, "b t (h d) -> b h t d", h=cross.num_heads)
        keys, values = cache.cross(index)
        x = x + layer.layer_scale_cross(
            layout.attend(cross, query, keys, values, x.dtype, cross=True)
        )
    return x + layer.layer_scale_2(layer._ff_block(layer.norm2(x)))


def _row_past(lm: torch.nn.Module, row: int) -> RowPast:
    """Row ``row``'s keys and values as audiocraft's streaming state holds them after a step
    (copied: the state is dropped when streaming ends)."""
    layers = list(lm.transformer.layers)
    crosses = [layer.cross_attention for layer in layers if layer.cross_attention is not None]
    return RowPast(
        keys=[layer.self_attn._streaming_state["past_keys"][row].clone() for layer in layers],
        values=[layer.self_attn._streaming_state["past_values"][row].clone() for layer in layers],
        cross_keys=[cross._streaming_state[CROSS_KEYS][row].clone() for cross in crosses],
        cross_values=[cross._streaming_state[CROSS_VALUES][row].clone() for cross in crosses],
    )

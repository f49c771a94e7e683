"""Per-step timing: the wall and CPU time of each decoding step, the same way for every model.

A step is one forward pass with its CFG twin (2 rows per request) and top-k sampling. Times
are medians over ``steps`` steps after a few warm-up ones, taken from the first steps of a
generation (a short context, so attention over past steps weighs less than at step 500).
"""

from __future__ import annotations

import contextlib
import itertools
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from audiocraft.models import MusicGen
from audiocraft.modules.conditioners import ConditioningAttributes
from torch.nn import functional as F

from generation.engine import past_attention
from generation.engine.continuous import DecodingLoop
from generation.engine.decoding import linear
from generation.engine.packed_weights import PackedWeights
from generation.engine.request_decoding import RequestDecoding
from generation.engine.row_cache import RowCache
from generation.request import GenerationRequest

PROMPT = "lo-fi hip hop beat with mellow piano chords, soft vinyl crackle and a slow groove"
WARMUP_STEPS = 3


@dataclass(frozen=True)
class StepTime:
    """Median seconds per decoding step: wall clock, and CPU time of this process."""

    wall: float
    cpu: float


class _Clock:
    def __init__(self) -> None:
        self.marks: list[tuple[float, float]] = []

    def __call__(self, *_: int) -> None:
        self.marks.append((time.perf_counter(), time.process_time()))

    def median(self) -> StepTime:
        marks = self.marks[WARMUP_STEPS:]
        pairs = list(itertools.pairwise(marks))
        return StepTime(
            wall=statistics.median(b[0] - a[0] for a, b in pairs),
            cpu=statistics.median(b[1] - a[1] for a, b in pairs),
        )


def audiocraft_step(model: MusicGen, batch: int, steps: int) -> StepTime:
    """Decode ``steps`` steps of ``batch`` requests through audiocraft's ``LMModel.generate``."""
    clock = _Clock()
    attributes = [ConditioningAttributes(text={"description": PROMPT}) for _ in range(batch)]
    with torch.no_grad(), model.autocast:
        model.lm.generate(
            None,
            attributes,
            max_gen_len=steps + WARMUP_STEPS + 1,
            use_sampling=True,
            top_k=250,
            cfg_coef=3.0,
            callback=clock,
        )
    return clock.median()


def peer_step(peer: torch.nn.Module, batch: int, steps: int, text_tokens: int) -> StepTime:
    """Decode ``steps`` steps of ``batch`` requests with transformers' MusicGen decoder.

    Its own KV caches (self and cross attention), CFG over 2 rows a request and top-k
    sampling, as ``MusicgenForConditionalGeneration.generate`` does; ``text_tokens`` is the
    length of the encoder output it cross-attends to.
    """
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    config = peer.config
    weight = next(peer.parameters())
    rows = 2 * batch
    encoder = torch.randn(
        rows, text_tokens, config.hidden_size, device=weight.device, dtype=weight.dtype
    )
    device = weight.device
    codes = torch.full((rows * config.num_codebooks, 1), config.bos_token_id, device=device)
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    clock = _Clock()
    with torch.no_grad():
        for _ in range(steps + WARMUP_STEPS + 1):
            out = peer(
                input_ids=codes,
                encoder_hidden_states=encoder,
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.past_key_values
            logits = out.logits[:, -1].view(rows, config.num_codebooks, -1)
            cond, uncond = logits.split(batch)
            probs = torch.softmax(uncond + (cond - uncond) * 3.0, dim=-1)
            top, index = probs.topk(250, dim=-1)
            picked = torch.multinomial(top.flatten(0, 1), 1).view(batch, -1, 1)
            token = index.gather(-1, picked)
            codes = token.repeat(2, 1, 1).view(-1, 1)
            clock()
    return clock.median()


class PlainLayout(PackedWeights):
    """Packs no weight: every product by ``F.linear`` on the weights as PyTorch keeps them."""

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor | None:
        return None


def pytorch_attention(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: np.ndarray
) -> torch.Tensor:
    """The loop's attention before :mod:`generation.engine.past_attention`, as a baseline:
    PyTorch's ``scaled_dot_product_attention`` once per run of rows of equal length, over
    their unpadded past."""
    runs, first = [], 0
    for end in range(1, len(lengths) + 1):
        if end == len(lengths) or lengths[end] != lengths[first]:
            length = int(lengths[first])
            runs.append(
                F.scaled_dot_product_attention(
                    queries[first:end].to(keys.dtype),
                    keys[first:end, :, :length],
                    values[first:end, :, :length],
                )
            )
            first = end
    return torch.cat(runs).float()


@contextlib.contextmanager
def attending_with(attend: Callable[..., torch.Tensor]) -> Iterator[None]:
    """Run the loop's steps with ``attend`` in place of :func:`past_attention.attend`."""
    kernel = past_attention.attend
    past_attention.attend = attend
    try:
        yield
    finally:
        past_attention.attend = kernel


def joined_loop(
    model: MusicGen, batch: int, past_dtype: torch.dtype | None = None, *, packed: bool = True
) -> DecodingLoop:
    """The engine's shared decoding loop (:mod:`generation.engine.continuous`) with ``batch``
    requests of 30 s joined, each with its own random stream; its past kept in ``past_dtype``
    (None: the engine's choice), its weights packed for oneDNN where the engine packs them or,
    without ``packed``, not."""
    loop = DecodingLoop(model, batch)
    if past_dtype is not None:
        loop.cache = RowCache(loop.cache.capacity, dtype=past_dtype)
    if not packed:
        loop.packed = PlainLayout(loop.cache.capacity)
    request = GenerationRequest(prompt=PROMPT, model=model.name, duration=30.0, cfg_coef=3.0)
    with torch.inference_mode():
        for seed in range(batch):
            loop.join(RequestDecoding(model, replace(request, seed=seed)))
    return loop


@dataclass(frozen=True)
class LoopVariant:
    """How a loop is set up: the dtype its past is kept in, whether its weights are packed,
    and what attends to the past."""

    past_dtype: torch.dtype
    packed: bool = True
    attend: Callable[..., torch.Tensor] = past_attention.attend


def loop_steps(loop: DecodingLoop, steps: int) -> StepTime:
    """Time ``steps`` more steps of ``loop``."""
    clock = _Clock()
    with torch.inference_mode():
        for _ in range(steps + WARMUP_STEPS + 1):
            loop.step()
            clock()
    return clock.median()


def loop_step(model: MusicGen, batch: int, steps: int) -> StepTime:
    """Decode ``steps`` steps of ``batch`` requests in the engine's shared decoding loop."""
    return loop_steps(joined_loop(model, batch), steps)


def late_loops(
    model: MusicGen, batch: int, past: int, variants: Sequence[LoopVariant]
) -> list[DecodingLoop]:
    """:func:`joined_loop` decoded until every row has ``past`` steps of past, once for each
    variant."""
    loops = []
    with torch.inference_mode():
        for variant in variants:
            loop = joined_loop(model, batch, variant.past_dtype, packed=variant.packed)
            with attending_with(variant.attend):
                while int(loop.cache.lengths.min()) < past:
                    loop.step()
            loops.append(loop)
    return loops


def attention_seconds(
    model: MusicGen,
    lengths: np.ndarray,
    attend: Callable[..., torch.Tensor],
    dtype: torch.dtype,
    repeats: int,
) -> float:
    """Median seconds for ``attend`` over one step of every layer's self-attention of
    ``model``'s size, on its own: a row for each of ``lengths``, with that many steps of
    random past in ``dtype`` (views of longer buffers, as the loop's cache keeps them)."""
    transformer = model.lm.transformer
    attention = transformer.layers[0].self_attn
    heads, dim = attention.num_heads, attention.embed_dim // attention.num_heads
    rows, room = len(lengths), int(lengths.max()) + 64
    pasts = [
        (
            torch.randn(rows, heads, room, dim).to(dtype),
            torch.randn(rows, heads, room, dim).to(dtype),
        )
        for _ in transformer.layers
    ]
    query = torch.randn(rows, heads, 1, dim)
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first compiles or warms up
            started = time.perf_counter()
            for keys, values in pasts:
                attend(query, keys, values, lengths)
            times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def weight_read_floor(model: MusicGen, repeats: int = 5) -> float:
    """Seconds to read every weight a decoding step reads, once, in its own dtype: one row
    through each of the LM's matrices (the transformer's and the output heads'), nothing
    else, by ``F.linear`` or by the weights packed for oneDNN (as the engine multiplies them),
    whichever is faster. No step of one request can take less."""
    lm = model.lm
    linears = [*lm.transformer.modules(), *lm.linears]
    weights = [module.weight for module in linears if isinstance(module, torch.nn.Linear)]
    weights += [layer.self_attn.in_proj_weight for layer in model.lm.transformer.layers]
    weights += [
        layer.cross_attention.in_proj_weight[: layer.cross_attention.embed_dim]
        for layer in model.lm.transformer.layers
        if layer.cross_attention is not None
    ]
    rows = [torch.randn(1, weight.shape[1], dtype=weight.dtype) for weight in weights]
    floors = []
    for packs in (PlainLayout(rows=1), PackedWeights(rows=1)):
        times = []
        with torch.inference_mode(), packs.active():
            for _ in range(repeats + 1):  # the first packs the weights
                started = time.perf_counter()
                for row, weight in zip(rows, weights, strict=True):
                    linear(row, weight, None)
                times.append(time.perf_counter() - started)
        floors.append(statistics.median(times[1:]))
    return min(floors)

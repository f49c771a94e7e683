"""The memory floor of a stream: how long exact decoding of it must take on this machine, at
the least, whatever the schedule.

Every decoding step reads every weight of the LM at least once (all rows share that read),
and every row reads its own keys and values, its whole past, in every layer (a request and
its CFG twin see different conditions; only the unconditioned twins of two requests share
anything, the positions of their null conditioning, which this floor counts for each row). So a stream takes at
least ``steps x weight read + positions x key/value read``, where ``steps`` is how many steps
its decoding loop ran (at least the longest request's) and ``positions`` is the sum, over
every step of every row, of the past the row attended to (which depends on the requests
alone, not on what shared their steps). Both reads are timed here, in the engine's precision.

``bench/mixed.py`` prints the floor of its stream; ``OMP_NUM_THREADS=1 ./dev python -m
bench.memory_floor`` decodes that stream continuously alone and prints the floor beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
from audiocraft.models import MusicGen
from torch.nn import functional as F

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.steps import weight_read_floor
from generation.engine.continuous import DecodingLoop


@dataclass
class StepCount:
    """Steps a run's decoding loops took, and the positions their rows attended to."""

    steps: int = 0
    positions: int = 0


@contextlib.contextmanager
def counting_steps() -> Iterator[StepCount]:
    """Count the steps of every :class:`DecodingLoop` while inside (on any thread)."""
    count = StepCount()
    step = DecodingLoop.step

    def counted(loop: DecodingLoop) -> tuple:
        count.steps += 1
        # Each row attends to its past and the step being written.
        count.positions += int(loop.cache.lengths.sum()) + loop.cache.rows
        return step(loop)

    with mock.patch.object(DecodingLoop, "step", counted):
        yield count


def key_value_read_seconds(model: MusicGen, rows: int = 16, past: int = 1024) -> float:
    """Seconds for one row to attend to one position of its past in every layer, in the
    LM's dtype: ``rows`` rows of ``past`` positions attended at once (the cheapest way, one
    call a layer over contiguous keys and values), divided out."""
    transformer = model.lm.transformer
    attention = transformer.layers[0].self_attn
    heads, width = attention.num_heads, attention.embed_dim
    dtype = next(model.lm.parameters()).dtype
    layers = len(transformer.layers)
    query = torch.randn(rows, heads, 1, width // heads, dtype=dtype)
    keys = [torch.randn(rows, heads, past, width // heads, dtype=dtype) for _ in range(layers)]
    values = [torch.randn_like(layer) for layer in keys]
    times = []
    with torch.inference_mode():
        for _ in range(6):
            started = time.perf_counter()
            for layer_keys, layer_values in zip(keys, values, strict=True):
                F.scaled_dot_product_attention(query, layer_keys, layer_values)
            times.append(time.perf_counter() - started)
    return statistics.median(times[1:]) / (rows * past)


def floor_seconds(model: MusicGen, count: StepCount) -> tuple[float, float, float]:
    """The floor of a run counted by :func:`counting_steps` on ``model`` (in the precision
    it decoded in): (total seconds, weight read per step, key/value read per position)."""
    weights = weight_read_floor(model)
    position = key_value_read_seconds(model)
    return count.steps * weights + count.positions * position, weights, position


def main(argv: Sequence[str] | None = None) -> None:
    """Decode the mixed stream continuously through the bot (``bench/mixed.py``), counted,
    and print its floor: the floor line of ``--sections mixed`` without its baselines."""
    from bench.mixed import in_engine_precision, mixed_stream, through_bot
    from bench.models import build_small_musicgen
    from generation.engine.debug_models import build_debug_model
    from generation.engine.export import export_checkpoint

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["small", "debug"], default="small")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.model == "small":
        plain = build_small_musicgen(melody=True)
    else:
        plain = build_debug_model("debug-melody")
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = export_checkpoint(plain, plain.lm.cfg, Path(folder))
        stream = mixed_stream(str(checkpoint), args.requests)
        with counting_steps() as counted:
            run = through_bot(checkpoint, stream, args.max_batch, join_running=True)
    floor, weights, position = floor_seconds(in_engine_precision(plain), counted)
    print(
        f"continuous: all done in {run.wall_seconds:.1f} s; {counted.steps} steps x "
        f"{1000 * weights:.1f} ms (weights) + {counted.positions / 1e6:.2f} M positions x "
        f"{1e9 * position:.1f} ns (keys and values) = {floor:.1f} s, "
        f"{run.wall_seconds / floor:.2f}x the floor"
    )


if __name__ == "__main__":
    main()

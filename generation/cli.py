"""``musicgen-bot generate``: one generation from the command line, option for option as the
AudioCraft MusicGen command line."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

from .audio_input import AudioLimits, read_audio_file
from .errors import AudioInputError, GenerationError, InvalidOption
from .models import CATALOGUE, DEFAULT_MODEL
from .request import DEFAULT_MAX_DURATION, GenerationRequest

#: Request fields whose flag is not simply ``--field-name``.
_FLAG_OF = {"use_sampling": "--no-sampling"}


def flag_for(option: str) -> str:
    """The command-line flag of a request field."""
    return _FLAG_OF.get(option, "--" + option.replace("_", "-"))


class CommandLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: ``prog: error: --flag: what to change``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_generate_command(commands: argparse._SubParsersAction) -> None:
    """Add ``generate`` and its flags to a parser's subcommands."""
    parser = commands.add_parser(
        "generate",
        help="generate music from a prompt and write an MP3",
        description="Generate music with MusicGen and write it as an MP3.",
    )
    defaults = GenerationRequest(prompt="", model=DEFAULT_MODEL)
    add = parser.add_argument
    add("--prompt", required=True, help="describe the music")
    add(
        "--model",
        default=DEFAULT_MODEL,
        help=f"one of {', '.join(CATALOGUE)}, or a local checkpoint folder "
        f"(default: {DEFAULT_MODEL})",
    )
    add(
        "--duration",
        type=float,
        default=defaults.duration,
        help=f"seconds of audio, intro included; above 30 uses extended generation "
        f"(default: {defaults.duration:g}, at most {DEFAULT_MAX_DURATION:g})",
    )
    add(
        "--temperature",
        type=float,
        default=defaults.temperature,
        help="0.0-2.0: higher is more creative, lower more predictable (default: 1.0)",
    )
    add(
        "--top-k",
        type=int,
        default=defaults.top_k,
        help="sample from the K most likely tokens (default: 250)",
    )
    add(
        "--top-p",
        type=float,
        default=defaults.top_p,
        help="0.0-1.0: nucleus sampling threshold; 0 uses top-k (default: 0.0)",
    )
    add(
        "--cfg-coef",
        type=float,
        default=defaults.cfg_coef,
        help="classifier-free guidance strength (default: 3.0)",
    )
    add("--no-sampling", action="store_true", help="greedy decoding instead of sampling")
    add("--melody", type=Path, metavar="FILE", help="a melody to follow (melody models only)")
    add("--continuation", type=Path, metavar="FILE", help="an intro to extend")
    add(
        "--two-step-cfg",
        action="store_true",
        help="run guidance as two forward passes instead of one batch",
    )
    add(
        "--extend-stride",
        type=float,
        default=defaults.extend_stride,
        help="seconds to advance each window of extended generation, below 30 (default: 18)",
    )
    add("--seed", type=int, help="make the run reproducible (default: random)")
    add(
        "--output",
        type=Path,
        metavar="FILE",
        help="where to write the MP3 (default: named after the prompt and seed)",
    )
    add("--device", help="cpu, cuda, cuda:1... (default: the GPU if there is one)")
    add(
        "--service",
        choices=["audiocraft"],
        default="audiocraft",
        help="generation backend (audiocraft is the one there is)",
    )
    parser.set_defaults(handler=run_generate, command_parser=parser)


def run_generate(args: argparse.Namespace) -> int:
    """Run one generation; returns the exit status."""
    # torch and audiocraft take seconds to import: wait until the arguments have been read.
    from tqdm import tqdm

    from .audio_output import encode_mp3, mp3_filename, normalise_loudness, request_tags
    from .engine import MusicGenEngine

    parser: argparse.ArgumentParser = args.command_parser
    if args.device is not None:
        _check_device(args.device, parser)
    engine = MusicGenEngine(device=args.device)
    limits = AudioLimits(max_seconds=engine.max_duration)
    try:
        request = GenerationRequest(
            prompt=args.prompt,
            model=args.model,
            duration=args.duration,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            cfg_coef=args.cfg_coef,
            use_sampling=not args.no_sampling,
            two_step_cfg=args.two_step_cfg,
            extend_stride=args.extend_stride,
            seed=args.seed,
        ).with_seed()
        engine.validate(request)
        request = _with_audio(request, args, limits)
        engine.validate(request)
    except InvalidOption as error:
        parser.error(f"{flag_for(error.option)}: {error.message}")

    with tqdm(total=None, unit="step", desc=request.model, disable=None) as bar:

        def show(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        try:
            result = engine.generate(request, progress=show)
        except GenerationError as error:
            bar.close()
            print(f"musicgen-bot: error: {error}", file=sys.stderr)
            return 1

    audio = normalise_loudness(result.audio, result.sample_rate)
    data = encode_mp3(audio, result.sample_rate, tags=request_tags(result.request))
    output = args.output or Path(mp3_filename(result.request))
    output.write_bytes(data)
    print(
        f"{output}: {result.seconds:.1f} s, {result.channels} channel(s), model {request.model}, "
        f"seed {result.request.seed}, generated in {result.generation_seconds:.1f} s"
    )
    return 0


def _with_audio(
    request: GenerationRequest, args: argparse.Namespace, limits: AudioLimits
) -> GenerationRequest:
    """``request`` with the clips named by --melody and --continuation, decoded."""
    clips = {}
    for option in ("melody", "continuation"):
        path = getattr(args, option)
        if path is not None:
            try:
                clips[option] = read_audio_file(path, limits, option)
            except AudioInputError as error:
                raise InvalidOption(option, str(error)) from error
    return replace(request, **clips)


def _check_device(device: str, parser: argparse.ArgumentParser) -> None:
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        parser.error(f"--device: {device!r} is not a device: use cpu, cuda or cuda:N.")
    if kind == "cuda" and not torch.cuda.is_available():
        parser.error("--device: CUDA is not available on this machine; use --device cpu.")


CommandAdder = Callable[[argparse._SubParsersAction], None]


def build_parser(*adders: CommandAdder) -> argparse.ArgumentParser:
    """The ``musicgen-bot`` parser with the subcommands the ``adders`` add."""
    parser = CommandLineParser(
        prog="musicgen-bot", description="MusicGen for the command line and for Discord."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in adders:
        add(commands)
    return parser


def main(argv: Sequence[str] | None = None, *, adders: Sequence[CommandAdder] = ()) -> int:
    """Run ``musicgen-bot`` with ``generate`` and any further subcommands; returns the status."""
    parser = build_parser(add_generate_command, *adders)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=FutureWarning)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())

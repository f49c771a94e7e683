"""``musicgen-bot generate``: one generation from the command line, option for option as the
AudioCraft MusicGen command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

from generation.audio.input import AudioLimits, read_audio_file
from generation.audio.loop import BEATS_PER_BAR, MAX_LOOP_BARS
from generation.engine.models import CATALOGUE, DEFAULT_MODEL, PRECISIONS, resolve_model
from generation.errors import AudioInputError, GenerationError, InvalidOption
from generation.request import (
    CODEBOOK_SIZE,
    DECODERS,
    DEFAULT_MAX_DURATION,
    MAX_CFG_COEF,
    MAX_SEED,
    TEMPERATURE_RANGE,
    TOP_P_RANGE,
    WINDOW_SECONDS,
    GenerationRequest,
    validate_request,
)

#: Request fields whose flag is not simply ``--field-name``.
_FLAG_OF = {"use_sampling": "--no-sampling"}
#: What ``--output`` may end in, and the format (see ``audio_output.encode_audio``) each names.
OUTPUT_FORMATS = {".mp3": "mp3", ".wav": "wav", ".flac": "flac", ".ogg": "ogg"}


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
        help="generate music from a prompt and write an MP3 (or WAV, FLAC, OGG)",
        description="Generate music with MusicGen and write it as an MP3, WAV, FLAC or OGG file.",
    )
    defaults = GenerationRequest(prompt="", model=DEFAULT_MODEL)
    short_names = [name.removeprefix("facebook/musicgen-") for name in CATALOGUE]
    add = parser.add_argument
    add("--prompt", required=True, help="describe the music")
    add(
        "--model",
        default=DEFAULT_MODEL,
        help=f"one of {', '.join(short_names)} (or its full name, such as {DEFAULT_MODEL}), "
        f"or a local checkpoint folder (default: {DEFAULT_MODEL})",
    )
    add(
        "--duration",
        type=float,
        default=defaults.duration,
        metavar="SECONDS",
        help=f"more than 0, at most {DEFAULT_MAX_DURATION:g}: seconds of audio, intro included; "
        f"above {WINDOW_SECONDS:g} uses extended generation (default: {defaults.duration:g})",
    )
    add(
        "--temperature",
        type=float,
        default=defaults.temperature,
        metavar="T",
        help=f"{_range(TEMPERATURE_RANGE)}: higher is more creative, lower more predictable "
        f"(default: {defaults.temperature:.1f})",
    )
    add(
        "--top-k",
        type=int,
        default=defaults.top_k,
        metavar="K",
        help=f"0 to {CODEBOOK_SIZE}: sample from the K most likely tokens; 0 for all "
        f"(default: {defaults.top_k})",
    )
    add(
        "--top-p",
        type=float,
        default=defaults.top_p,
        metavar="P",
        help=f"{_range(TOP_P_RANGE)}: nucleus sampling threshold; 0 uses top-k "
        f"(default: {defaults.top_p:.1f})",
    )
    add(
        "--cfg-coef",
        type=float,
        default=defaults.cfg_coef,
        metavar="COEF",
        help=f"{_range((0.0, MAX_CFG_COEF))}: classifier-free guidance strength "
        f"(default: {defaults.cfg_coef:.1f})",
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
        metavar="SECONDS",
        help=f"more than 0, less than {WINDOW_SECONDS:g}: seconds each window of extended "
        f"generation moves on (default: {defaults.extend_stride:g})",
    )
    add(
        "--seed",
        type=int,
        metavar="N",
        help=f"0 to {MAX_SEED}: makes the run reproducible (default: random, printed)",
    )
    add(
        "--decoder",
        choices=DECODERS,
        default=defaults.decoder,
        help="what turns the tokens into audio: encodec (MusicGen's own, fast) or mbd "
        "(MultiBand Diffusion: cleaner, several times slower) (default: encodec)",
    )
    add(
        "--loop",
        type=int,
        default=defaults.loop,
        metavar="BARS",
        help=f"1 to {MAX_LOOP_BARS}: cut the result to a seamless loop of BARS bars of "
        f"{BEATS_PER_BAR} beats, at the beats of its tempo (printed); the duration must hold "
        "them (default: no loop)",
    )
    add(
        "--output",
        type=Path,
        metavar="FILE",
        help=f"where to write the result; its extension picks the format: "
        f"{', '.join(OUTPUT_FORMATS)} (default: named after the prompt and seed, .mp3)",
    )
    add("--device", help="cpu, cuda, cuda:1... (default: the GPU if there is one)")
    add(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="number format to decode in (default: auto, float16 autocast on a GPU, "
        "bfloat16 on a CPU with native bfloat16, else float32)",
    )
    add(
        "--service",
        choices=["audiocraft"],
        default="audiocraft",
        help="generation backend (audiocraft is the one there is)",
    )
    parser.set_defaults(handler=run_generate, command_parser=parser)


def _range(bounds: tuple[float, float]) -> str:
    low, high = bounds
    return f"{low:.1f} to {high:.1f}"


def run_generate(args: argparse.Namespace) -> int:
    """Run one generation; returns the exit status.

    Every flag is checked before torch and audiocraft load (seconds) and before generating
    (minutes): a mistake costs nothing.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=FutureWarning)
    parser: argparse.ArgumentParser = args.command_parser
    output_format = _check_output(args.output, parser)
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
            loop=args.loop,
            decoder=args.decoder,
        ).with_seed()
        spec = resolve_model(request.model)
        validate_request(request, spec)
        request = _with_audio(request, args, AudioLimits(max_seconds=DEFAULT_MAX_DURATION))
        validate_request(request, spec)
    except InvalidOption as error:
        parser.error(f"{flag_for(error.option)}: {error.message}")
    if args.device is not None:
        _check_device(args.device, parser)

    from tqdm import tqdm

    from generation.audio.output import encode_audio, mp3_filename, normalise_loudness, request_tags
    from generation.engine.musicgen import MusicGenEngine

    engine = MusicGenEngine(device=args.device, precision=args.precision)
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
    tags = request_tags(result.request, seconds=result.seconds)
    data = encode_audio(audio, result.sample_rate, output_format, tags=tags)
    output = args.output or Path(mp3_filename(result.request))
    try:
        output.write_bytes(data)
    except OSError as error:
        print(f"musicgen-bot: error: --output: cannot write {output}: {error}", file=sys.stderr)
        return 1
    loop = ""
    if request.loop:
        loop = f", a {request.loop}-bar loop at {tags['musicgen_bpm']} BPM"
    print(
        f"{output}: {result.seconds:.1f} s{loop}, {result.channels} channel(s), model "
        f"{request.model}, seed {result.request.seed}, generated in "
        f"{result.generation_seconds:.1f} s"
    )
    return 0


def _check_output(output: Path | None, parser: argparse.ArgumentParser) -> str:
    """The format ``--output`` asks for; exits naming ``--output`` when it cannot be written."""
    if output is None:  # named after the prompt and seed, in the working directory
        output_format, folder = "mp3", Path.cwd()
    else:
        if output.is_dir():
            parser.error(f"--output: {output} is a folder: name a file in it.")
        output_format = OUTPUT_FORMATS.get(output.suffix.lower())
        if output_format is None:
            parser.error(
                f"--output: {output} does not end in a known extension: use "
                f"{', '.join(OUTPUT_FORMATS)}."
            )
        folder = output.parent
    if not folder.is_dir():
        parser.error(f"--output: there is no folder {folder}: create it or pick another path.")
    if not os.access(folder, os.W_OK | os.X_OK) or (
        output is not None and output.exists() and not os.access(output, os.W_OK)
    ):
        parser.error(f"--output: cannot write to {output or folder}: pick another path.")
    return output_format


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
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())

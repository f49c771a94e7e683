"""What a generation request holds, and the checks every request passes before it runs."""

from __future__ import annotations

import secrets
import unicodedata
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from generation.audio.loop import MAX_LOOP_BARS
from generation.audio.stems import STEMS
from generation.engine.models import ModelSpec
from generation.errors import InvalidOption

#: The released models' context window; longer requests use extended generation.
WINDOW_SECONDS = 30.0
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_P_RANGE = (0.0, 1.0)
MAX_CFG_COEF = 20.0
MAX_PROMPT_CHARS = 1000
#: Control characters a prompt may hold: line breaks and tabs (forms and files have them).
ALLOWED_CONTROLS = frozenset("\n\r\t")
MAX_SEED = 2**32 - 1
DEFAULT_MAX_DURATION = 120.0
#: The released models' codebook size: the largest top_k.
CODEBOOK_SIZE = 2048
#: What may turn tokens into audio (see :mod:`generation.engine.mbd`), the default first.
DECODERS = ("encodec", "mbd")


@dataclass(frozen=True, eq=False)
class AudioClip:
    """Decoded audio: float32 samples shaped ``[channels, samples]`` at ``sample_rate``."""

    samples: np.ndarray
    sample_rate: int

    @property
    def channels(self) -> int:
        return int(self.samples.shape[0])

    @property
    def seconds(self) -> float:
        return self.samples.shape[-1] / self.sample_rate


@dataclass(frozen=True)
class GenerationRequest:
    """One generation, with every MusicGen option (defaults as the MusicGen command line's).

    ``seed`` None means "pick one": :meth:`with_seed` fixes it before the run, so every result
    can be reproduced. ``duration`` is the length of the output, intro included.
    """

    prompt: str
    model: str
    duration: float = 10.0
    temperature: float = 1.0
    top_k: int = 250
    top_p: float = 0.0
    cfg_coef: float = 3.0
    use_sampling: bool = True
    two_step_cfg: bool = False
    extend_stride: float = 18.0
    seed: int | None = None
    #: Bars (of four beats) to cut the result to as a seamless loop; 0 for no loop.
    loop: int = 0
    #: What turns the tokens into audio: "encodec" (MusicGen's own) or "mbd" (MultiBand
    #: Diffusion: cleaner, several times slower).
    decoder: str = "encodec"
    melody: AudioClip | None = field(default=None, repr=False)
    continuation: AudioClip | None = field(default=None, repr=False)
    #: A track to split into stems instead of generating (a result of another job).
    stems_of: AudioClip | None = field(default=None, repr=False)
    #: The stem of ``stems_of`` this request gives (see :data:`STEMS`); set per take.
    stem: str = ""

    @property
    def sampled(self) -> bool:
        """Whether tokens are sampled; a temperature of 0 is greedy decoding, as in
        audiocraft's sampler."""
        return self.use_sampling and self.temperature > 0

    def with_seed(self) -> GenerationRequest:
        """This request with a concrete seed (a random one when none was given)."""
        if self.seed is not None:
            return self
        return replace(self, seed=secrets.randbelow(MAX_SEED + 1))

    def parameters(self) -> dict[str, str]:
        """Every option as text, for tags, embeds and logs (audio inputs by length only)."""
        values: dict[str, object] = {
            "prompt": self.prompt,
            "model": self.model,
            "duration": self.duration,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "cfg_coef": self.cfg_coef,
            "use_sampling": self.use_sampling,
            "two_step_cfg": self.two_step_cfg,
            "extend_stride": self.extend_stride,
            "seed": self.seed,
        }
        if self.loop:
            values["loop"] = f"{self.loop} bars"
        if self.decoder != "encodec":
            values["decoder"] = self.decoder
        if self.melody is not None:
            values["melody"] = f"{self.melody.seconds:.1f} s"
        if self.continuation is not None:
            values["continuation"] = f"{self.continuation.seconds:.1f} s"
        if self.stem:
            values["stem"] = self.stem
        return {key: str(value) for key, value in values.items()}


def validate_request(
    request: GenerationRequest,
    spec: ModelSpec,
    *,
    max_duration: float = DEFAULT_MAX_DURATION,
    codebook_size: int = CODEBOOK_SIZE,
) -> None:
    """Check every option of ``request`` for ``spec``.

    Raises:
        InvalidOption: naming the first option at fault in ``option``, with what to change in
            a message that does not name it again (each front end names it its own way).
    """
    prompt = request.prompt.strip()
    if not prompt:
        raise InvalidOption("prompt", "The prompt is empty: describe the music you want.")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidOption(
            "prompt", f"The prompt is {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}."
        )
    _check_prompt_characters(prompt)
    if not 0 < request.duration <= max_duration:
        raise InvalidOption("duration", f"Use more than 0 and at most {max_duration:g} seconds.")
    _check_range("temperature", request.temperature, *TEMPERATURE_RANGE)
    if isinstance(request.top_k, bool) or not isinstance(request.top_k, int):
        raise InvalidOption("top_k", "Use a whole number.")
    for flag in ("use_sampling", "two_step_cfg"):
        if not isinstance(getattr(request, flag), bool):
            raise InvalidOption(flag, "Use true or false.")
    if request.top_k < 0 or request.top_k > codebook_size:
        raise InvalidOption(
            "top_k", f"Use a whole number from 0 to {codebook_size} (the model's codebook size)."
        )
    _check_range("top_p", request.top_p, *TOP_P_RANGE)
    _check_range("cfg_coef", request.cfg_coef, 0.0, MAX_CFG_COEF)
    if not 0 < request.extend_stride < WINDOW_SECONDS:
        raise InvalidOption(
            "extend_stride",
            f"Use more than 0 and less than the {WINDOW_SECONDS:g} s window, in seconds.",
        )
    if request.seed is not None and not 0 <= request.seed <= MAX_SEED:
        raise InvalidOption("seed", f"Use a whole number from 0 to {MAX_SEED}.")
    if (
        isinstance(request.loop, bool)
        or not isinstance(request.loop, int)
        or not 0 <= request.loop <= MAX_LOOP_BARS
    ):
        raise InvalidOption(
            "loop", f"Use a whole number of bars from 1 to {MAX_LOOP_BARS} (0 for no loop)."
        )
    if request.decoder not in DECODERS:
        raise InvalidOption("decoder", f"Use {' or '.join(DECODERS)}.")
    _check_audio_inputs(request, spec)


def _check_prompt_characters(prompt: str) -> None:
    """Refuse control characters (a NUL breaks the MP3's tags) and lone surrogates (no UTF-8
    can hold them), naming the first one and where it is."""
    for position, character in enumerate(prompt, start=1):
        kind = unicodedata.category(character)
        if (kind == "Cc" and character not in ALLOWED_CONTROLS) or kind == "Cs":
            raise InvalidOption(
                "prompt",
                f"The prompt has an invisible control character (U+{ord(character):04X}) at "
                f"character {position}: remove it (line breaks and tabs are fine).",
            )


def _check_range(option: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:  # also rejects NaN
        raise InvalidOption(option, f"Use a value from {low:g} to {high:g}.")


#: The released models that follow a melody: the advice where no narrower list is known.
MELODY_MODELS = ("facebook/musicgen-melody", "facebook/musicgen-melody-large")


def check_audio_options(
    spec: ModelSpec,
    *,
    melody: bool,
    continuation: bool,
    melody_models: Sequence[str] = MELODY_MODELS,
) -> None:
    """Check which audio inputs a request has against its model, before any is read;
    ``melody_models`` are the ones to advise instead (those the user may pick)."""
    if melody and continuation:
        raise InvalidOption(
            "melody",
            "Use either a melody or a continuation, not both: MusicGen cannot combine them.",
        )
    if melody and not spec.melody:
        raise InvalidOption(
            "melody",
            f"{spec.name} cannot follow a melody: pick a melody model "
            f"({' or '.join(melody_models)}).",
        )


def _check_audio_inputs(request: GenerationRequest, spec: ModelSpec) -> None:
    if request.stems_of is not None and (request.melody or request.continuation):
        raise InvalidOption("stems_of", "Split a track into stems alone, without audio inputs.")
    if request.stem and request.stem not in STEMS:
        raise InvalidOption("stem", f"Use one of {', '.join(STEMS)}.")
    check_audio_options(
        spec, melody=request.melody is not None, continuation=request.continuation is not None
    )
    clip = request.continuation
    if clip is None:
        return
    if clip.seconds >= request.duration:
        raise InvalidOption(
            "continuation",
            f"The intro is {clip.seconds:.1f} s long: the duration ({request.duration:g} s) "
            "must be longer than the intro it extends.",
        )
    if clip.seconds >= WINDOW_SECONDS:
        raise InvalidOption(
            "continuation",
            f"The intro is {clip.seconds:.1f} s long: MusicGen continues intros shorter "
            f"than its {WINDOW_SECONDS:g} s window.",
        )


def batch_key(request: GenerationRequest) -> tuple[Hashable, ...]:
    """Requests with equal keys can run in one of audiocraft's batched ``generate`` calls.

    audiocraft takes one set of generation parameters per call; prompts and seeds may differ.
    Audio inputs must have the same length: audiocraft pads a batch's melodies and intros to
    the longest, which would change the music of the shorter ones. The engine's continuous
    decoding needs none of this (any requests share its steps); the key still forms the
    batches of the batch-at-a-time worker (the benchmark's baseline) and the queue's
    forecast, which counts a batch of equal keys as one pass.
    """
    return (
        request.model,
        request.duration,
        request.sampled,
        request.temperature,
        request.top_k,
        request.top_p,
        request.cfg_coef,
        request.two_step_cfg,
        request.extend_stride,
        request.decoder,
        _clip_shape(request.melody),
        _clip_shape(request.continuation),
        _clip_shape(request.stems_of),
    )


def _clip_shape(clip: AudioClip | None) -> tuple[int, ...] | None:
    return None if clip is None else (clip.sample_rate, *clip.samples.shape)

"""One request's part of a shared decoding loop: its conditions, windows, codes and random stream.

This is audiocraft's ``MusicGen._generate_tokens`` and ``LMModel.generate`` for one request,
cut at step boundaries so that the loop can interleave many: a window opens
(:meth:`RequestDecoding.open_window` gives what its first step runs on), then each step's
logits become the request's next tokens (:meth:`RequestDecoding.accept`), following the
codebook pattern, until the window is full; a request longer than the model's window moves on
to its next one (its last ``duration - extend_stride`` seconds as the prompt) as audiocraft's
extended generation does, while the other rows go on.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from audiocraft.data.audio_utils import convert_audio
from audiocraft.models import MusicGen
from audiocraft.modules.conditioners import (
    ClassifierFreeGuidanceDropout,
    ConditioningAttributes,
    WavCondition,
)
from audiocraft.utils import utils as audiocraft_utils

from generation.engine.results import CancelFlag
from generation.engine.sampling import PythonRandom, drawing_from
from generation.engine.shared_step import ConditionTensors
from generation.request import AudioClip, GenerationRequest

#: Codes not generated yet (as audiocraft's ``LMModel.generate``).
UNKNOWN = -1


#: What a window's first step runs on: ``[rows, codebooks, steps]`` codes with their
#: conditions; one pass for the request and its CFG twin, or one each with two-step CFG.
FirstStep = list[tuple[torch.Tensor, ConditionTensors]]


class RequestDecoding:
    """A request (its row and its CFG twin) decoding in a shared loop.

    Args:
        model: The model it decodes on (its generation parameters are not read).
        request: What to generate, its seed set.
        cancel: Read before each step; once set, the request leaves the loop.
    """

    rows = 2

    def __init__(
        self,
        model: MusicGen,
        request: GenerationRequest,
        cancel: CancelFlag | None = None,
    ) -> None:
        assert request.seed is not None
        self.model = model
        self.request = request
        self.cancel = cancel
        self.generator = torch.Generator(device=model.device).manual_seed(request.seed)
        self._python_random = PythonRandom(request.seed)
        self.total_steps = planned_steps(model, request)
        self.steps_done = 0
        #: Requests decoding in the steps this one took, summed (see :attr:`shared_with`).
        self.requests_seen = 0
        self.started = time.perf_counter()
        self._attributes, self._prompt = _attributes_and_prompt(model, request)
        self._reference = self._attributes[0].wav["self_wav"]
        self._total_frames = int(request.duration * model.frame_rate)
        self._extended = request.duration > model.max_duration
        self._stride_frames = int(model.frame_rate * request.extend_stride)
        self._offset_frames = 0
        self._collected: list[torch.Tensor] = []
        if self._extended and self._prompt is not None:
            self._collected.append(self._prompt)
        self._pattern = None
        self._sequence = self._mask = torch.empty(0)
        self._offset = self._window_frames = 0

    @property
    def shared_with(self) -> float:
        """How many requests (itself included) decoded in its steps, on average."""
        shared_steps = max(self.steps_done - 1, 1)  # the first step runs alone
        return max(self.requests_seen / shared_steps, 1.0)

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def open_window(self) -> FirstStep:
        """Start the next window; returns what its first step runs on."""
        model, lm = self.model, self.model.lm
        prompt_frames = 0 if self._prompt is None else self._prompt.shape[-1]
        if self._extended:
            seconds = min(
                self.request.duration - self._offset_frames / model.frame_rate, model.max_duration
            )
            self._window_frames = int(seconds * model.frame_rate)
            self._loop_melody()
        else:
            self._window_frames = self._total_frames
        self._pattern = lm.pattern_provider.get_pattern(self._window_frames)
        codes = torch.full(
            (1, lm.num_codebooks, self._window_frames),
            UNKNOWN,
            dtype=torch.long,
            device=model.device,
        )
        if self._prompt is not None:
            codes[..., :prompt_frames] = self._prompt
        self._sequence, _, self._mask = self._pattern.build_pattern_sequence(
            codes, lm.special_token_id
        )
        self._offset = self._pattern.get_first_step_with_timesteps(prompt_frames)
        start = self._sequence[..., : self._offset]
        return self._passes(start)

    def last_tokens(self) -> torch.Tensor:
        """The tokens the request's rows feed the next step, ``[rows, codebooks]``."""
        return self._sequence[:, :, self._offset - 1].expand(self.rows, -1)

    def accept(self, logits: torch.Tensor) -> bool:
        """Take the step's logits for the request's rows (``[rows, codebooks, card]``, the
        conditioned row first): sample the next tokens into the window.

        Returns:
            Whether the window is full.
        """
        conditioned, unconditioned = logits[0], logits[1]
        guided = unconditioned + (conditioned - unconditioned) * self.request.cfg_coef
        token = self._sample(guided[None])  # [1, codebooks, 1]
        offset = self._offset
        valid = self._mask[..., offset : offset + 1].expand(1, -1, -1)
        token[~valid] = self.model.lm.special_token_id
        current = self._sequence[..., offset : offset + 1]
        self._sequence[..., offset : offset + 1] = torch.where(current == UNKNOWN, token, current)
        self._offset += 1
        self.steps_done += 1
        return self._offset == self._sequence.shape[-1]

    def close_window(self) -> bool:
        """Keep the full window's codes.

        Returns:
            Whether another window follows.
        """
        codes, _, _ = self._pattern.revert_pattern_sequence(self._sequence, special_token=UNKNOWN)
        codes = codes[..., : self._window_frames]
        if not self._extended:
            self._collected = [codes]
            return False
        if self._prompt is None:
            self._collected.append(codes)
        else:
            self._collected.append(codes[:, :, self._prompt.shape[-1] :])
        self._prompt = codes[:, :, self._stride_frames :]
        self._offset_frames += self._stride_frames
        return self._offset_frames + self._prompt.shape[-1] < self._total_frames

    def codes(self) -> torch.Tensor:
        """The request's codes, ``[1, codebooks, frames]`` (its intro's included)."""
        return torch.cat(self._collected, dim=-1)

    def _passes(self, start: torch.Tensor) -> FirstStep:
        provider = self.model.lm.condition_provider
        null = ClassifierFreeGuidanceDropout(p=1.0)(self._attributes)
        with self._python_random.active():
            if self.request.two_step_cfg:
                return [
                    (start, provider(provider.tokenize(self._attributes))),
                    (start, provider(provider.tokenize(null))),
                ]
            conditions = provider(provider.tokenize(self._attributes + null))
        return [(torch.cat([start, start], dim=0), conditions)]

    def _loop_melody(self) -> None:
        """As audiocraft's extended generation: each window's melody is the reference from
        the window's start, repeated to fill a whole window."""
        wav, length = self._reference[0], self._reference.length.item()
        if length == 0:
            return
        model = self.model
        first = int(self._offset_frames / model.frame_rate * model.sample_rate)
        target = int(model.max_duration * model.sample_rate)
        positions = torch.arange(first, first + target, device=model.device)
        self._attributes[0].wav["self_wav"] = WavCondition(
            wav[..., positions % length],
            torch.full_like(self._reference.length, target),
            [model.sample_rate] * wav.size(0),
            [None],
            [0.0],
        )

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        """audiocraft's sampler (``LMModel._sample_next_token``) on this request's stream."""
        request = self.request
        if not request.sampled:
            return torch.argmax(logits, dim=-1, keepdim=True)
        probs = torch.softmax(logits / request.temperature, dim=-1)
        with drawing_from([self.generator]):
            if request.top_p > 0.0:
                return audiocraft_utils.sample_top_p(probs, p=request.top_p)
            if request.top_k > 0:
                return audiocraft_utils.sample_top_k(probs, k=request.top_k)
            return audiocraft_utils.multinomial(probs, num_samples=1)


def _attributes_and_prompt(
    model: MusicGen, request: GenerationRequest
) -> tuple[list[ConditioningAttributes], torch.Tensor | None]:
    """The request's conditioning and intro codes, as ``generate``, ``generate_with_chroma``
    and ``generate_continuation`` prepare them."""
    melody = intro = None
    if request.melody is not None:
        melody = [_converted(model, request.melody)]
    if request.continuation is not None:
        intro = _converted(model, request.continuation)[None]
    return model._prepare_tokens_and_attributes([request.prompt.strip()], intro, melody)


def _converted(model: MusicGen, clip: AudioClip) -> torch.Tensor:
    samples = torch.from_numpy(clip.samples).to(model.device)
    return convert_audio(samples, clip.sample_rate, model.sample_rate, model.audio_channels)


def planned_steps(model: MusicGen, request: GenerationRequest) -> int:
    """How many decoding steps ``request`` takes, following audiocraft's windowing."""
    frame_rate = model.frame_rate
    total_frames = int(request.duration * frame_rate)
    prompt_frames = 0
    if request.continuation is not None:
        prompt_frames = int(np.ceil(request.continuation.seconds * frame_rate))
    if request.duration <= model.max_duration:
        return _window_steps(model, total_frames, prompt_frames)
    stride_frames = int(frame_rate * request.extend_stride)
    offset = steps = 0
    while offset + prompt_frames < total_frames:
        window = min(request.duration - offset / frame_rate, model.max_duration)
        window_frames = int(window * frame_rate)
        steps += _window_steps(model, window_frames, prompt_frames)
        prompt_frames = window_frames - stride_frames
        offset += stride_frames
    return steps


def _window_steps(model: MusicGen, frames: int, prompt_frames: int) -> int:
    pattern = model.lm.pattern_provider.get_pattern(frames)
    # The decoding loop runs over the whole layout (num_sequence_steps + 1 entries),
    # starting at the first step that holds a frame after the prompt.
    first = pattern.get_first_step_with_timesteps(prompt_frames)
    return len(pattern.layout) - first


def audiocraft_tokens(model: MusicGen, request: GenerationRequest) -> torch.Tensor:
    """The codes audiocraft's own ``MusicGen`` generates for ``request`` in one call of its
    own (as its command line or demo would): what the loop is tested and benchmarked against.
    The caller seeds audiocraft's random streams.
    """
    model.set_generation_params(
        use_sampling=request.sampled,
        top_k=request.top_k,
        top_p=request.top_p,
        temperature=request.temperature,
        duration=request.duration,
        cfg_coef=request.cfg_coef,
        two_step_cfg=request.two_step_cfg,
        extend_stride=request.extend_stride,
    )
    # audiocraft's two-step CFG reads the LM's own coefficient, not the one it is given.
    model.lm.cfg_coef = request.cfg_coef
    if request.melody is not None:
        melody = torch.from_numpy(request.melody.samples)[None]
        args = ([request.prompt], melody, request.melody.sample_rate)
        return model.generate_with_chroma(*args, return_tokens=True)[1]
    if request.continuation is not None:
        intro = torch.from_numpy(request.continuation.samples)[None]
        args = (intro, request.continuation.sample_rate, [request.prompt])
        return model.generate_continuation(*args, return_tokens=True)[1]
    return model.generate([request.prompt], return_tokens=True)[1]

"""The generation engine: a request in, audio out, through audiocraft's MusicGen."""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from audiocraft.models import MusicGen

from .errors import GenerationCancelled, GenerationError
from .loading import default_device, load_model
from .models import ModelSpec, resolve_model
from .request import DEFAULT_MAX_DURATION, GenerationRequest, validate_request

log = logging.getLogger(__name__)

#: Called with (steps done, steps in all) as the model decodes.
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True, eq=False)
class GenerationResult:
    """Generated audio (``[channels, samples]`` float32) and the request that made it.

    ``request.seed`` is always set, so the result can be reproduced.
    """

    request: GenerationRequest
    audio: np.ndarray
    sample_rate: int
    generation_seconds: float

    @property
    def seconds(self) -> float:
        return self.audio.shape[-1] / self.sample_rate

    @property
    def channels(self) -> int:
        return int(self.audio.shape[0])


class MusicGenEngine:
    """Runs requests on one model at a time, loading models as requests need them.

    ``generate`` blocks for as long as the model decodes: call it from a worker thread, never
    from an event loop. audiocraft's ``set_generation_params`` mutates the model, so calls are
    serialised.

    Args:
        device: "cpu", "cuda", "cuda:1"...; the first GPU when there is one by default.
        max_duration: The longest output a request may ask for, in seconds.
    """

    def __init__(self, device: str | None = None, max_duration: float = DEFAULT_MAX_DURATION):
        self.device = device or default_device()
        self.max_duration = max_duration
        self._model: MusicGen | None = None
        self._lock = threading.Lock()

    @property
    def loaded_model(self) -> str | None:
        """The name of the model in memory, if any."""
        return self._model.name if self._model is not None else None

    def validate(self, request: GenerationRequest) -> ModelSpec:
        """Check ``request`` without running it; returns its model's spec.

        Raises:
            InvalidOption: naming the option at fault.
        """
        spec = resolve_model(request.model)
        validate_request(request, spec, max_duration=self.max_duration)
        return spec

    def generate(
        self,
        request: GenerationRequest,
        *,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> GenerationResult:
        """Generate the music ``request`` describes.

        Args:
            request: What to generate; a missing seed is picked at random.
            progress: Called after each decoding step with (done, total).
            cancel: When set, the generation stops at its next step.

        Raises:
            InvalidOption: the request does not fit its model.
            ModelLoadError: the model could not be loaded.
            GenerationCancelled: ``cancel`` was set.
            GenerationError: out of GPU memory twice, or no usable audio.
        """
        request = request.with_seed()
        spec = self.validate(request)
        with self._lock:
            model = self._load(spec)
            self._configure(model, request)
            started = time.perf_counter()
            wav = self._run_with_memory_retry(model, request, progress, cancel)
            elapsed = time.perf_counter() - started
        audio = wav[0].detach().float().cpu().numpy()
        if audio.size == 0 or not np.isfinite(audio).all():
            raise GenerationError(
                "The model produced no usable audio; try again with another seed."
            )
        log.info(
            "generated %.1f s with %s in %.1f s",
            audio.shape[-1] / model.sample_rate,
            spec.name,
            elapsed,
        )
        return GenerationResult(request, audio, model.sample_rate, elapsed)

    def _run_with_memory_retry(
        self,
        model: MusicGen,
        request: GenerationRequest,
        progress: ProgressCallback | None,
        cancel: threading.Event | None,
    ) -> torch.Tensor:
        """Run once; out of GPU memory, free what can be freed and run once more."""
        for attempt in (1, 2):
            out_of_memory = False
            try:
                return self._run_once(model, request, progress, cancel)
            except torch.cuda.OutOfMemoryError:
                out_of_memory = True
            # Freed outside the handler: the exception's frames hold the step's tensors.
            if out_of_memory:
                log.warning("out of GPU memory on attempt %d with %s", attempt, request.model)
                _free_memory()
        raise GenerationError(
            "The GPU ran out of memory for this request: try a smaller model or a shorter duration."
        )

    @staticmethod
    def _run_once(
        model: MusicGen,
        request: GenerationRequest,
        progress: ProgressCallback | None,
        cancel: threading.Event | None,
    ) -> torch.Tensor:
        steps = _StepCounter(planned_steps(model, request), progress, cancel)
        model.set_custom_progress_callback(steps)
        try:
            torch.manual_seed(request.seed)
            wav = _run(model, request)
        finally:
            model.set_custom_progress_callback(None)
        steps.finish()
        return wav

    def memory_in_use(self) -> dict[str, int]:
        """Bytes in use: the process's resident memory, and the GPU's when there is one."""
        memory = {"process": _resident_bytes()}
        if torch.cuda.is_available():
            memory["gpu"] = torch.cuda.memory_allocated()
        return memory

    def load(self, name: str) -> MusicGen:
        """Load model ``name`` now (unloading any other), e.g. to have it ready at start-up."""
        spec = resolve_model(name)
        with self._lock:
            return self._load(spec)

    def _load(self, spec: ModelSpec) -> MusicGen:
        if self._model is not None and self._model.name == spec.name:
            return self._model
        self._unload()
        self._model = load_model(spec, self.device)
        return self._model

    def _unload(self) -> None:
        if self._model is None:
            return
        log.info("unloading model %s", self._model.name)
        self._model = None
        _free_memory()

    @staticmethod
    def _configure(model: MusicGen, request: GenerationRequest) -> None:
        model.set_generation_params(
            # A temperature of 0 is greedy decoding, as in audiocraft's sampler.
            use_sampling=request.use_sampling and request.temperature > 0,
            top_k=request.top_k,
            top_p=request.top_p,
            temperature=request.temperature,
            duration=request.duration,
            cfg_coef=request.cfg_coef,
            two_step_cfg=request.two_step_cfg,
            extend_stride=request.extend_stride,
        )
        # audiocraft's two-step CFG reads the model's own coefficient, not the one passed in.
        model.lm.cfg_coef = request.cfg_coef


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _resident_bytes() -> int:
    """The process's resident set size (Linux), or 0 where it cannot be read."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def _run(model: MusicGen, request: GenerationRequest) -> torch.Tensor:
    prompt = [request.prompt.strip()]
    if request.melody is not None:
        melody = torch.from_numpy(request.melody.samples).to(model.device)
        return model.generate_with_chroma(
            prompt, melody[None], request.melody.sample_rate, progress=True
        )
    if request.continuation is not None:
        intro = torch.from_numpy(request.continuation.samples).to(model.device)
        return model.generate_continuation(
            intro[None], request.continuation.sample_rate, prompt, progress=True
        )
    return model.generate(prompt, progress=True)


def planned_steps(model: MusicGen, request: GenerationRequest) -> int:
    """How many decoding steps ``request`` takes, following audiocraft's windowing.

    audiocraft reports progress per window, so its counts restart when extended generation
    moves on; counting steps against this plan gives one steady (done, total).
    """
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


class _StepCounter:
    """audiocraft's progress callback: counts steps, reports them, and stops on cancel.

    Raising from the callback is how audiocraft's own demo interrupts a generation.
    """

    def __init__(
        self, total: int, report: ProgressCallback | None, cancel: threading.Event | None
    ) -> None:
        self.total = total
        self.done = 0
        self._report = report
        self._cancel = cancel

    def __call__(self, generated: int, to_generate: int) -> None:
        if self._cancel is not None and self._cancel.is_set():
            raise GenerationCancelled("The generation was cancelled.")
        self.done += 1
        if self._report is not None:
            self._report(min(self.done, self.total), self.total)

    def finish(self) -> None:
        if self._report is not None and self.done != self.total:
            log.debug("planned %d steps, ran %d", self.total, self.done)
            self._report(self.total, self.total)

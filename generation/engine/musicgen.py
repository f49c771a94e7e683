"""The generation engine: a request in, audio out, through audiocraft's MusicGen."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from audiocraft.models import MusicGen
from torch.nn import Module

from generation.audio.loop import make_loop
from generation.engine.decoding import optimise_for_decoding
from generation.engine.loading import default_device, load_model
from generation.engine.mbd import MbdDecoders, decoding_with
from generation.engine.models import ModelSpec, resolve_model
from generation.engine.precision import apply_precision, resolve_precision, transformer_dtype
from generation.engine.results import CancelFlag, GenerationResult, ProgressCallback
from generation.engine.sampling import seeded_rows
from generation.engine.stems import StemSeparator
from generation.errors import GenerationCancelled, GenerationError
from generation.request import (
    DEFAULT_MAX_DURATION,
    AudioClip,
    GenerationRequest,
    batch_key,
    validate_request,
)

log = logging.getLogger(__name__)

GB = 10**9


class MusicGenEngine:
    """Runs requests on audiocraft models, keeping as many loaded as ``memory_budget_gb`` allows.

    ``generate`` and ``generate_batch`` block for as long as the model decodes: call them from
    a worker thread, never from an event loop. audiocraft's ``set_generation_params`` mutates
    the model, so calls are serialised.

    Args:
        device: "cpu", "cuda", "cuda:1"...; the first GPU when there is one by default.
        max_duration: The longest output a request may ask for, in seconds.
        memory_budget_gb: Memory the loaded models may take together; the least recently used
            is unloaded to make room. The model in use always stays, whatever its size.
        precision: "auto", "fp32", "bf16" or "fp16" (see :mod:`generation.engine.precision`).

    Raises:
        ValueError: ``precision`` is not one of those.
    """

    def __init__(
        self,
        device: str | None = None,
        max_duration: float = DEFAULT_MAX_DURATION,
        memory_budget_gb: float = 0.0,
        precision: str = "auto",
    ):
        self.device = device or default_device()
        #: The precision models decode in here, ``auto`` resolved for the device.
        self.precision = resolve_precision(precision, self.device)
        self.max_duration = max_duration
        self.memory_budget_gb = memory_budget_gb
        self._models: OrderedDict[str, MusicGen] = OrderedDict()  # least recently used first
        #: A copy of the models' names other threads can read while the engine works.
        self._loaded: tuple[str, ...] = ()
        self._lock = threading.Lock()
        self.stems = StemSeparator(self.device)
        self.mbd = MbdDecoders()

    @property
    def loaded_models(self) -> tuple[str, ...]:
        """The names of the models in memory, the most recently used last."""
        return self._loaded

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
        cancel: CancelFlag | None = None,
    ) -> GenerationResult:
        """Generate the music ``request`` describes (see :meth:`generate_batch`)."""
        return self.generate_batch([request], progress=progress, cancel=cancel)[0]

    def generate_batch(
        self,
        requests: Sequence[GenerationRequest],
        *,
        progress: ProgressCallback | None = None,
        cancel: CancelFlag | None = None,
    ) -> list[GenerationResult]:
        """Generate several requests in one pass of the model, a result for each.

        The requests must share a :func:`generation.request.batch_key`. Each samples from its
        own seed, so its music does not depend on the others in the batch (see
        :mod:`generation.engine.sampling`).

        Args:
            requests: What to generate; a missing seed is picked at random.
            progress: Called after each decoding step with (done, total).
            cancel: When set, the generation stops at its next step.

        Raises:
            ValueError: the requests cannot share a batch.
            InvalidOption: a request does not fit its model.
            ModelLoadError: the model could not be loaded.
            GenerationCancelled: ``cancel`` was set.
            GenerationError: out of GPU memory even one request at a time, or no usable audio.
        """
        requests = [request.with_seed() for request in requests]
        if not requests or len({batch_key(request) for request in requests}) != 1:
            raise ValueError("A batch needs one or more requests with the same batch key.")
        spec = resolve_model(requests[0].model)  # one model for all: the batch key says so
        for request in requests:
            validate_request(request, spec, max_duration=self.max_duration)
        if requests[0].stems_of is not None:  # a stems job: demucs, not MusicGen
            return self.stems.separate_batch(requests)
        with self._lock:
            model = self._load(spec)
            self._configure(model, requests[0])
            started = time.perf_counter()
            with decoding_with(model, self.mbd.for_request(model, requests[0].decoder)):
                wavs = self._run_with_memory_retry(model, requests, progress, cancel)
            elapsed = time.perf_counter() - started
        results = []
        for request, wav in zip(requests, wavs, strict=True):
            audio = wav.detach().float().cpu().numpy()
            if audio.size == 0 or not np.isfinite(audio).all():
                raise GenerationError(
                    "The model produced no usable audio; try again with another seed."
                )
            if request.loop:
                audio = make_loop(audio, model.sample_rate, request.loop).audio
            results.append(GenerationResult(request, audio, model.sample_rate, elapsed))
        log.info(
            "generated %d x %.1f s with %s in %.1f s",
            len(results),
            results[0].seconds,
            spec.name,
            elapsed,
        )
        return results

    def _run_with_memory_retry(
        self,
        model: MusicGen,
        requests: list[GenerationRequest],
        progress: ProgressCallback | None,
        cancel: CancelFlag | None,
    ) -> list[torch.Tensor]:
        """Run once; out of GPU memory, free what can be freed and run once more, then one
        request at a time."""
        for attempt in (1, 2):
            out_of_memory = False
            try:
                return list(self._run_once(model, requests, progress, cancel))
            except torch.cuda.OutOfMemoryError:
                out_of_memory = True
            # Freed outside the handler: the exception's frames hold the step's tensors.
            if out_of_memory:
                log.warning(
                    "out of GPU memory on attempt %d with %d x %s",
                    attempt,
                    len(requests),
                    requests[0].model,
                )
                _release_cached_memory()
        if len(requests) > 1:
            return [
                wav
                for request in requests
                for wav in self._run_with_memory_retry(model, [request], progress, cancel)
            ]
        raise GenerationError(
            "The GPU ran out of memory for this request: try a smaller model or a shorter duration."
        )

    @staticmethod
    def _run_once(
        model: MusicGen,
        requests: list[GenerationRequest],
        progress: ProgressCallback | None,
        cancel: CancelFlag | None,
    ) -> torch.Tensor:
        steps = _StepCounter(planned_steps(model, requests[0]), progress, cancel)
        model.set_custom_progress_callback(steps)
        try:
            seeds = [request.seed for request in requests]
            torch.manual_seed(seeds[0])
            with seeded_rows(seeds, model.device):
                wav = _run(model, requests)
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
        """Load model ``name`` now (e.g. to have it ready at start-up)."""
        spec = resolve_model(name)
        with self._lock:
            return self._load(spec)

    def _load(self, spec: ModelSpec) -> MusicGen:
        model = self._models.get(spec.name)
        if model is not None:
            self._models.move_to_end(spec.name)
            self._loaded = tuple(self._models)
            return model
        expected = (spec.vram_gb if self.device.startswith("cuda") else spec.ram_gb) * GB
        self._make_room(expected)
        model = load_model(spec, self.device, transformer_dtype(self.precision, self.device))
        apply_precision(model, self.precision)
        optimise_for_decoding(model)
        self._models[spec.name] = model
        self._make_room(0)
        self._loaded = tuple(self._models)
        return model

    def _make_room(self, needed: float) -> None:
        """Unload the least recently used models until ``needed`` more bytes fit the budget;
        the most recently used model stays."""
        budget = self.memory_budget_gb * GB
        while len(self._models) > 1 or (needed and self._models):
            in_use = sum(model_bytes(model) for model in self._models.values())
            if in_use + needed <= budget:
                return
            name, model = self._models.popitem(last=False)
            self._loaded = tuple(self._models)
            log.info("unloading model %s to stay within %g GB", name, self.memory_budget_gb)
            release_weights(model)
            _release_cached_memory()

    @staticmethod
    def _configure(model: MusicGen, request: GenerationRequest) -> None:
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
        # audiocraft's two-step CFG reads the model's own coefficient, not the one passed in.
        model.lm.cfg_coef = request.cfg_coef


def model_bytes(model: MusicGen) -> int:
    """The memory a loaded model's weights and buffers take."""
    return sum(
        tensor.numel() * tensor.element_size()
        for module in _top_modules(model)
        for tensor in (*module.parameters(), *module.buffers())
    )


def release_weights(model: MusicGen) -> None:
    """Free the memory of ``model``'s weights now, even while something still holds it.

    Dropping the last reference is not enough: the model sits in reference cycles (its
    loaders leave exception frames behind, patched methods point back at their modules),
    which only a full ``gc.collect()`` reclaims, and that holds the GIL for 0.3-0.5 s while
    the bot waits. Moving every weight to the meta device frees the memory by reference
    counting alone; the empty module objects go with the interpreter's own collections.
    """
    for module in _top_modules(model):
        module.to("meta")


def _top_modules(model: MusicGen) -> list[Module]:
    """The modules holding ``model``'s weights: the language model, the compression model,
    and the ones audiocraft keeps out of its state dict (T5, Demucs) as plain attributes."""
    found: list[Module] = []
    pending: list[Module] = [model.lm, model.compression_model]
    seen: set[int] = set()
    while pending:
        top = pending.pop()
        if id(top) in seen:
            continue
        found.append(top)
        for module in top.modules():
            seen.add(id(module))
            pending += [value for value in vars(module).values() if isinstance(value, Module)]
    return found


def _release_cached_memory() -> None:
    """Hand the GPU memory PyTorch keeps cached back to the device (no garbage collection:
    tensors freed by reference counting are already in the cache)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _resident_bytes() -> int:
    """The process's resident set size (Linux), or 0 where it cannot be read."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def _run(model: MusicGen, requests: list[GenerationRequest]) -> torch.Tensor:
    prompts = [request.prompt.strip() for request in requests]
    first = requests[0]
    if first.melody is not None:
        melodies = _stack([request.melody for request in requests], model.device)
        return model.generate_with_chroma(
            prompts, melodies, first.melody.sample_rate, progress=True
        )
    if first.continuation is not None:
        intros = _stack([request.continuation for request in requests], model.device)
        return model.generate_continuation(
            intros, first.continuation.sample_rate, prompts, progress=True
        )
    return model.generate(prompts, progress=True)


def _stack(clips: list[AudioClip | None], device: torch.device | str) -> torch.Tensor:
    """Same-shaped clips as one ``[batch, channels, samples]`` tensor."""
    return torch.stack([torch.from_numpy(clip.samples) for clip in clips if clip]).to(device)


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
        self, total: int, report: ProgressCallback | None, cancel: CancelFlag | None
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

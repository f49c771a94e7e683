"""The generation engine: a request in, audio out, through audiocraft's MusicGen."""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from audiocraft.models import MusicGen
from torch.nn import Module

from generation.audio.loop import make_loop
from generation.engine.decoding import optimise_for_decoding
from generation.engine.loading import default_device, load_model
from generation.engine.mbd import MbdDecoders, decode_tokens
from generation.engine.models import ModelSpec, resolve_model
from generation.engine.precision import apply_precision, resolve_precision, transformer_dtype
from generation.engine.results import CancelFlag, GenerationResult, ProgressCallback
from generation.engine.scheduler import (
    NO_AUDIO,
    DecodingScheduler,
    Submission,
    release_cached_memory,
)
from generation.engine.shared_step import compile_attention, supports
from generation.engine.stems import StemSeparator
from generation.errors import GenerationError, ModelLoadError
from generation.request import DEFAULT_MAX_DURATION, GenerationRequest, validate_request

log = logging.getLogger(__name__)

GB = 10**9


class MusicGenEngine:
    """Runs requests on audiocraft models, keeping as many loaded as ``memory_budget_gb`` allows.

    Requests decode continuously (:mod:`generation.engine.scheduler`): every request on a
    model shares every decoding step, whatever its options, length or arrival, and each gets
    the music its seed gives alone. :meth:`submit` returns at once; :meth:`generate` and
    :meth:`generate_batch` block until their results are ready: call them from a worker
    thread, never from an event loop.

    Args:
        device: "cpu", "cuda", "cuda:1"...; the first GPU when there is one by default.
        max_duration: The longest output a request may ask for, in seconds.
        memory_budget_gb: Memory the loaded models may take together; the least recently used
            is unloaded to make room. Models with requests decoding always stay.
        precision: "auto", "fp32", "bf16" or "fp16" (see :mod:`generation.engine.precision`).
        max_requests: Requests decoding at once; more wait for a place. Each takes two rows
            of the model's caches (the request and its classifier-free-guidance twin).

    Raises:
        ValueError: ``precision`` is not one of those.
    """

    def __init__(
        self,
        device: str | None = None,
        max_duration: float = DEFAULT_MAX_DURATION,
        memory_budget_gb: float = 0.0,
        precision: str = "auto",
        max_requests: int = 4,
    ):
        self.device = device or default_device()
        #: The precision models decode in here, ``auto`` resolved for the device.
        self.precision = resolve_precision(precision, self.device)
        self.max_duration = max_duration
        self.memory_budget_gb = memory_budget_gb
        self._models: OrderedDict[str, MusicGen] = OrderedDict()  # least recently used first
        #: A copy of the models' names other threads can read while the engine works.
        self._loaded: tuple[str, ...] = ()
        self._scheduler = DecodingScheduler(self._load, max_requests, self._audio)
        #: Splits tracks into stems (a stems job's takes), on a thread of their own.
        self.stems = StemSeparator(self.device)
        self._splits = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stems")
        #: Decodes tokens with MultiBand Diffusion where a request asks for it.
        self.mbd = MbdDecoders()

    @property
    def loaded_models(self) -> tuple[str, ...]:
        """The names of the models in memory, the most recently used last."""
        return self._loaded

    @property
    def free_places(self) -> int:
        """How many more requests would start decoding now, rather than wait."""
        return max(self._scheduler.max_requests - self._scheduler.in_flight, 0)

    def validate(self, request: GenerationRequest) -> ModelSpec:
        """Check ``request`` without running it; returns its model's spec.

        Raises:
            InvalidOption: naming the option at fault.
        """
        spec = resolve_model(request.model)
        validate_request(request, spec, max_duration=self.max_duration)
        return spec

    def submit(
        self,
        request: GenerationRequest,
        *,
        progress: ProgressCallback | None = None,
        cancel: CancelFlag | None = None,
    ) -> Future[GenerationResult]:
        """Start generating ``request`` (a missing seed is picked at random).

        Args:
            progress: Called on the decoding thread with (steps done, steps in all).
            cancel: Once set, the request leaves at its next step.

        Returns:
            Its result to come, or its error: ``ModelLoadError``, ``GenerationCancelled``,
            ``GenerationError`` (out of GPU memory alone, or no usable audio).

        Raises:
            InvalidOption: the request does not fit its model.
        """
        request = request.with_seed()
        spec = self.validate(request)
        if request.stems_of is not None:  # a split: demucs, beside the decoding
            return self._splits.submit(self.stems.separate, request)
        return self._scheduler.submit(Submission(request, spec, progress, cancel))

    def generate(
        self,
        request: GenerationRequest,
        *,
        progress: ProgressCallback | None = None,
        cancel: CancelFlag | None = None,
    ) -> GenerationResult:
        """Generate the music ``request`` describes, and wait for it (see :meth:`submit`)."""
        return self.submit(request, progress=progress, cancel=cancel).result()

    def generate_batch(
        self,
        requests: Sequence[GenerationRequest],
        *,
        progress: ProgressCallback | None = None,
        cancel: CancelFlag | None = None,
    ) -> list[GenerationResult]:
        """Generate several requests together, and wait for all (see :meth:`submit`).

        ``progress`` gets the steps of all of them together.
        """
        counts = [(0, 0)] * len(requests)

        def reporter(index: int) -> ProgressCallback | None:
            if progress is None:
                return None

            def report(done: int, total: int) -> None:
                counts[index] = (done, total)
                progress(sum(c[0] for c in counts), sum(c[1] for c in counts))

            return report

        futures = [
            self.submit(request, progress=reporter(index), cancel=cancel)
            for index, request in enumerate(requests)
        ]
        return [future.result() for future in futures]

    def memory_in_use(self) -> dict[str, int]:
        """Bytes in use: the process's resident memory, and the GPU's when there is one."""
        memory = {"process": _resident_bytes()}
        if torch.cuda.is_available():
            memory["gpu"] = torch.cuda.memory_allocated()
        return memory

    def load(self, name: str) -> MusicGen:
        """Load model ``name`` now (e.g. to have it ready at start-up), and wait for it."""
        spec = resolve_model(name)
        return self._scheduler.call(lambda: self._load(spec)).result()

    def close(self) -> None:
        """Stop decoding; requests not finished fail as cancelled."""
        self._scheduler.close()
        self._splits.shutdown(wait=False, cancel_futures=True)

    def _audio(
        self, model: MusicGen, request: GenerationRequest, codes: torch.Tensor
    ) -> np.ndarray:
        """A finished request's audio ``[channels, samples]`` from its codes: EnCodec's or
        MultiBand Diffusion's decoding, cut to a loop if asked (on the audio thread).

        Raises:
            GenerationError: no usable audio.
        """
        mbd = self.mbd.for_request(model, request.decoder)
        if mbd is None:
            wav = model.generate_audio(codes)
        else:
            devices = [model.device] if model.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(request.seed or 0)  # the seed fixes the diffusion's noise
                wav = decode_tokens(mbd, codes, model.compression_model)
        audio = wav[0].detach().float().cpu().numpy()
        if audio.size == 0 or not np.isfinite(audio).all():
            raise GenerationError(NO_AUDIO)
        if request.loop:
            audio = make_loop(audio, model.sample_rate, request.loop).audio
        return audio

    def _load(self, spec: ModelSpec) -> MusicGen:
        """The model for ``spec``, loaded if need be (on the decoding thread)."""
        model = self._models.get(spec.name)
        if model is not None:
            self._models.move_to_end(spec.name)
            self._loaded = tuple(self._models)
            return model
        expected = (spec.vram_gb if self.device.startswith("cuda") else spec.ram_gb) * GB
        self._make_room(expected)
        model = load_model(spec, self.device, transformer_dtype(self.precision, self.device))
        if not supports(model):
            release_weights(model)
            raise ModelLoadError(
                f"{spec.name} is not a MusicGen this bot can decode: its transformer differs "
                "from the released models' (attention, positions or conditioning)."
            )
        apply_precision(model, self.precision)
        optimise_for_decoding(model)
        compile_attention(model)
        self._models[spec.name] = model
        self._make_room(0)
        self._loaded = tuple(self._models)
        return model

    def _make_room(self, needed: float) -> None:
        """Unload the least recently used idle models until ``needed`` more bytes fit the
        budget; the most recently used model and those decoding stay."""
        budget = self.memory_budget_gb * GB
        busy = self._scheduler.busy_models
        while True:
            idle = [name for name in list(self._models)[:-1] if name not in busy]
            if needed and self._models and list(self._models)[-1] not in busy:
                idle.append(list(self._models)[-1])
            in_use = sum(model_bytes(model) for model in self._models.values())
            if not idle or in_use + needed <= budget:
                return
            name = idle[0]
            model = self._models.pop(name)
            self._loaded = tuple(self._models)
            log.info("unloading model %s to stay within %g GB", name, self.memory_budget_gb)
            release_weights(model)
            release_cached_memory()


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


def _resident_bytes() -> int:
    """The process's resident set size (Linux), or 0 where it cannot be read."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")

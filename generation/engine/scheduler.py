"""The engine's decoding thread: admits requests into their model's loop and steps the loops.

One thread runs every model (a GPU runs one kernel stream at a time anyway): it takes new
requests at each step boundary, in the order they came, while there is room (at most
``max_requests`` decoding at once, across models), runs one step of each model's loop in turn,
and hands each finished request's codes to the audio decoder on a thread of its own, so the
next steps do not wait for EnCodec. Cancel is read before each step; a cancelled request
leaves at once and its place is free for the next one.

Out of GPU memory, the most recently joined request goes back to the front of the queue and
the loop's room shrinks, for good, to what it held; a request alone that does not fit twice
fails with a message saying what to change.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from audiocraft.models import MusicGen

from generation.engine.continuous import DecodingLoop
from generation.engine.models import ModelSpec
from generation.engine.request_decoding import RequestDecoding
from generation.engine.results import CancelFlag, GenerationResult, ProgressCallback
from generation.errors import GenerationCancelled, GenerationError
from generation.request import GenerationRequest

log = logging.getLogger(__name__)

OUT_OF_MEMORY = (
    "The GPU ran out of memory for this request: try a smaller model or a shorter duration."
)

CANCELLED = "The generation was cancelled."
STOPPED = "The engine stopped."
NO_AUDIO = "The model produced no usable audio; try again with another seed."


@dataclass(eq=False)
class Submission:
    """A request waiting for, or decoding in, a loop; ``future`` gets its result."""

    request: GenerationRequest
    spec: ModelSpec
    progress: ProgressCallback | None
    cancel: CancelFlag | None
    future: Future[GenerationResult] = field(default_factory=Future)
    out_of_memory_alone: bool = False

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()


class DecodingScheduler:
    """Runs submissions on one thread, sharing each model's steps between its requests.

    Args:
        load: Gives the model for a spec (loading it if need be); called on the thread.
        max_requests: Requests decoding at once, across models: the bound on the memory
            their caches take.
        audio: Turns a finished request's codes into its audio (on the audio thread).
    """

    def __init__(
        self,
        load: Callable[[ModelSpec], MusicGen],
        max_requests: int,
        audio: Callable[[MusicGen, GenerationRequest, torch.Tensor], np.ndarray],
    ) -> None:
        self.max_requests = max_requests
        self._load = load
        self._audio_of = audio
        self._inbox: queue.SimpleQueue[Submission | Callable[[], None]] = queue.SimpleQueue()
        self._waiting: deque[Submission] = deque()
        self._loops: dict[str, DecodingLoop] = {}
        self._decoding: dict[RequestDecoding, Submission] = {}
        self._audio = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audio-decoder")
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        #: Requests submitted and not yet ended, and the models of those whose audio is
        #: being decoded (read from any thread).
        self._unfinished = 0
        self._delivering: Counter[str] = Counter()

    @property
    def busy_models(self) -> set[str]:
        """Models with requests decoding, or their audio: not to be unloaded."""
        with self._lock:
            delivering = set(+self._delivering)
        return delivering | {name for name, loop in self._loops.items() if loop.active}

    @property
    def in_flight(self) -> int:
        """Requests submitted and not ended: decoding, waiting, or on their way in."""
        return self._unfinished

    def submit(self, submission: Submission) -> Future[GenerationResult]:
        with self._lock:
            self._unfinished += 1
        submission.future.add_done_callback(self._ended)
        try:
            self._post(submission)
        except RuntimeError:
            _fail(submission, GenerationCancelled(STOPPED))
            raise
        return submission.future

    def _ended(self, _: Future) -> None:
        with self._lock:
            self._unfinished -= 1

    def call(self, function: Callable[[], object]) -> Future:
        """Run ``function`` on the decoding thread, between steps."""
        future: Future = Future()

        def run() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(function())
                except BaseException as error:
                    future.set_exception(error)

        self._post(run)
        return future

    def close(self) -> None:
        """Stop after the current step; requests not finished fail as cancelled."""
        with self._lock:
            self._closed = True
            started = self._thread is not None
        if started:
            self._inbox.put(lambda: None)
        else:
            self._drain_inbox()

    def _post(self, item: Submission | Callable[[], None]) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("The engine is closed.")
            self._inbox.put(item)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="decoding", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        with torch.inference_mode():
            while not self._closed:
                self._take_inbox(block=not self._decoding and not self._waiting)
                if self._closed:
                    break
                self._drop_cancelled()
                self._admit()
                for loop in list(self._loops.values()):
                    self._leave_cancelled(loop)
                    if loop.active:
                        self._step(loop)
        for submission in [*self._waiting, *self._decoding.values()]:
            _fail(submission, GenerationCancelled(STOPPED))
        self._drain_inbox()
        self._audio.shutdown(wait=False)

    def _drain_inbox(self) -> None:
        """End what was posted and will not decode (the engine is closed): requests fail,
        calls (a model load) still run, so that no one waits for them forever."""
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, Submission):
                _fail(item, GenerationCancelled(STOPPED))
            else:
                item()

    def _take_inbox(self, *, block: bool) -> None:
        try:
            item = self._inbox.get(block=block)
            while True:
                if isinstance(item, Submission):
                    self._waiting.append(item)
                else:
                    item()
                item = self._inbox.get_nowait()
        except queue.Empty:
            return

    def _drop_cancelled(self) -> None:
        """End the waiting requests that were cancelled, wherever they wait."""
        if any(submission.cancelled for submission in self._waiting):
            for submission in [s for s in self._waiting if s.cancelled]:
                _fail(submission, GenerationCancelled(CANCELLED))
            self._waiting = deque(s for s in self._waiting if not s.cancelled)

    def _admit(self) -> None:
        """Start waiting requests, in order, while there is room."""
        while self._waiting and len(self._decoding) < self.max_requests:
            submission = self._waiting[0]
            loop = self._loop_for(submission)
            if loop is None:
                continue  # failed to load: the submission was failed
            if loop.room < 1:
                return
            self._waiting.popleft()
            self._join(loop, submission)

    def _loop_for(self, submission: Submission) -> DecodingLoop | None:
        name = submission.spec.name
        try:
            model = self._load(submission.spec)
        except Exception as error:
            self._waiting.popleft()
            _fail(submission, error)
            return None
        loop = self._loops.get(name)
        if loop is None or loop.model is not model:
            loop = self._loops[name] = DecodingLoop(model, self.max_requests)
        return loop

    def _join(self, loop: DecodingLoop, submission: Submission) -> None:
        """Start ``submission`` in ``loop`` (its first step)."""
        try:
            decoding = RequestDecoding(loop.model, submission.request, cancel=submission.cancel)
        except Exception as error:
            log.warning("a request could not start: %r", error)
            _fail(submission, error)
            return
        self._decoding[decoding] = submission
        self._enter(loop, decoding)

    def _enter(self, loop: DecodingLoop, decoding: RequestDecoding) -> None:
        """Run ``decoding``'s next window's first step in ``loop``; with no room there (the
        loop shrank), the request starts again once there is."""
        if loop.room < 1:
            self._waiting.appendleft(self._decoding.pop(decoding))
            return
        try:
            complete = loop.join(decoding)
        except torch.cuda.OutOfMemoryError:
            self._out_of_memory(loop, self._decoding.pop(decoding))
            return
        except Exception as error:
            log.warning("a request could not start: %r", error)
            _fail(self._decoding.pop(decoding), error)
            return
        self._report(decoding)
        if complete:
            self._finish(decoding)

    def _step(self, loop: DecodingLoop) -> None:
        try:
            complete, next_window = loop.step()
        except torch.cuda.OutOfMemoryError:
            newest = max(loop.active, key=lambda decoding: decoding.started)
            loop.leave(newest)
            self._out_of_memory(loop, self._decoding.pop(newest))
            return
        except Exception as error:
            log.exception("a decoding step failed: its %d requests fail", len(loop.active))
            for decoding in list(loop.active):
                _fail(self._decoding.pop(decoding), error)
            loop.clear()
            return
        for decoding in loop.active:
            self._report(decoding)
        for decoding in complete:
            self._report(decoding)
            self._finish(decoding)
        for decoding in next_window:
            self._enter(loop, decoding)

    def _out_of_memory(self, loop: DecodingLoop, submission: Submission) -> None:
        """Shrink ``loop`` to the requests it holds, and start ``submission`` again once
        there is room; alone, it starts again once more, then fails."""
        release_cached_memory()
        held = len(loop.active)
        if held == 0 and submission.out_of_memory_alone:
            _fail(submission, GenerationError(OUT_OF_MEMORY))
            return
        if held == 0:  # what PyTorch had cached may have been in the way: once more
            submission.out_of_memory_alone = True
        else:
            name = loop.model.name
            log.warning("out of GPU memory: %s decodes at most %d requests", name, held)
            loop.max_requests = held
            self.max_requests = min(self.max_requests, held)  # the places the worker sees
        self._waiting.appendleft(submission)

    def _leave_cancelled(self, loop: DecodingLoop) -> None:
        for decoding in [decoding for decoding in loop.active if decoding.cancelled]:
            loop.leave(decoding)
            _fail(self._decoding.pop(decoding), GenerationCancelled(CANCELLED))

    def _finish(self, decoding: RequestDecoding) -> None:
        """Decode the request's audio off the decoding thread, then hand it back."""
        submission = self._decoding.pop(decoding)
        elapsed = time.perf_counter() - decoding.started
        with self._lock:
            self._delivering[submission.spec.name] += 1
        self._audio.submit(self._deliver, submission, decoding, elapsed)

    def _deliver(self, submission: Submission, decoding: RequestDecoding, elapsed: float) -> None:
        try:
            with torch.inference_mode():
                audio = self._audio_of(decoding.model, submission.request, decoding.codes())
        except Exception as error:
            _fail(submission, error)
            return
        else:
            result = GenerationResult(
                submission.request, audio, decoding.model.sample_rate, elapsed, decoding.shared_with
            )
            with contextlib.suppress(InvalidStateError):  # cancelled by its waiter meanwhile
                submission.future.set_result(result)
        finally:
            with self._lock:
                self._delivering[submission.spec.name] -= 1

    def _report(self, decoding: RequestDecoding) -> None:
        progress = self._decoding[decoding].progress
        if progress is None:
            return
        try:
            progress(min(decoding.steps_done, decoding.total_steps), decoding.total_steps)
        except Exception:
            log.exception("a progress callback failed")


def _fail(submission: Submission, error: BaseException) -> None:
    with contextlib.suppress(InvalidStateError):  # ended already (or cancelled by its waiter)
        submission.future.set_exception(error)


def release_cached_memory() -> None:
    """Hand the GPU memory PyTorch keeps cached back to the device (no garbage collection:
    tensors freed by reference counting are already in the cache)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

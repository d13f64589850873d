"""Threads that read samples from the shards and decode their clips, ahead of the consumer, in order.

Each sample is read with positioned reads at the offsets its index line gives (the `.json` metadata member, then
the video member), its clips' frame indices are drawn from the metadata's frame count, and the union of those
frames is decoded once by the thread's own decoder: pretraining's repeat_aug clips and evaluation's views cost
one decode per video. A sample that is corrupt, truncated or unsupported, whose metadata member is unreadable,
or whose decoder call does not return within `timeout_s`, comes back as a `SampleFailure`; nothing is raised for
one bad sample.

Threads and memory are bounded: `num_threads` workers, each with one decoder created once (by `decoder_factory`,
inside the thread, so CUDA streams and decoder sessions belong to it) and one scratch file at a time; at most
`ahead` samples are read but not yet consumed. A worker stuck in its decoder is abandoned (its sample reported,
a new worker takes its place); `close()` stops and joins the others after each has released its decoder in its
own thread, which is what keeps the interpreter's exit clean.
"""

from __future__ import annotations

import atexit
import itertools
import json
import logging
import os
import queue
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Protocol, Sequence, Tuple, Union

import torch

from mae_st.data.format import META_EXT, VIDEO_EXTS, SampleMeta
from mae_st.data.frames import sample_members
from mae_st.data.index import SampleRef, read_member as read_tar_member

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0  # a 10 s VP9 video decodes in well under a second; a call this long is a hang
JOIN_TIMEOUT_S = 10.0


class FrameDecoder(Protocol):
    """What a reader thread decodes with (`mae_st.data.nvdec.NvdecDecoder`, `mae_st.data.pyav_decode.PyAVDecoder`)."""

    def decode(self, path: str, frame_indices: Sequence[int]) -> torch.Tensor:
        """(len(frame_indices), H, W, 3) uint8 frames; repeated indices are decoded once."""

    def close(self) -> None:
        """Releases the decoder; called once, in the thread that created it."""


@dataclass(frozen=True)
class SampleRequest:
    """One sample to read and the rule that gives its clips' frame indices from its metadata (frame count)."""

    ref: SampleRef
    clip_indices: Callable[[SampleMeta], Sequence[Sequence[int]]]


@dataclass
class DecodedSample:
    """A good sample: its clips (clips, T, H, W, 3) uint8 on the decoder's device, its metadata and frame indices."""

    ref: SampleRef
    meta: dict
    clips: torch.Tensor
    frame_indices: List[List[int]]


@dataclass(frozen=True)
class SampleFailure:
    """A sample that could not be delivered, and why (for the loader's count, log and bad-fraction stop)."""

    key: str
    tar: str
    reason: str


ReadResult = Union[DecodedSample, SampleFailure]


class SampleError(Exception):
    """A sample-specific problem (truncated member, unreadable metadata, ...): its message is the reason."""


# ---- one sample ---------------------------------------------------------------------------------------------


def read_sample(request: SampleRequest, decoder: FrameDecoder, scratch: "ScratchFiles") -> DecodedSample:
    """Reads, samples and decodes one sample; raises SampleError or the decoder's own error."""
    ref = request.ref
    members = sample_members(ref)
    if META_EXT not in members:
        raise SampleError(f"no .{META_EXT} metadata member in its index line")
    raw_meta = read_member(ref.tar, *members[META_EXT])
    try:
        meta = SampleMeta.from_json(raw_meta)
        meta_dict = json.loads(raw_meta)
    except (ValueError, TypeError) as err:  # JSONDecodeError is a ValueError; a missing field a TypeError
        raise SampleError(f"metadata member {members[META_EXT][2]} is unreadable: {err}") from err
    if meta.frames < 1:
        raise SampleError(f"metadata member {members[META_EXT][2]} says the video has {meta.frames} frames")
    clips = [list(map(int, clip)) for clip in request.clip_indices(meta)]
    video_ext = next((ext for ext in members if ext in VIDEO_EXTS), None)
    if video_ext is None:
        raise SampleError(f"no video member ({', '.join(VIDEO_EXTS)}) in its index line")
    path = scratch.write(read_member(ref.tar, *members[video_ext]), video_ext)
    flat = [i for clip in clips for i in clip]
    frames = decoder.decode(path, flat)
    if frames.ndim != 4 or frames.shape[0] != len(flat) or frames.shape[-1] != 3:
        raise SampleError(f"the decoder returned {tuple(frames.shape)} for {len(flat)} frames")
    return DecodedSample(ref=ref, meta=meta_dict, clips=frames.reshape(len(clips), -1, *frames.shape[1:]),
                         frame_indices=clips)


def read_member(tar: str, offset: int, size: int, name: str) -> bytes:
    """The bytes of one tar member (`mae_st.data.index.read_member`); a shard cut short is a SampleError."""
    with open(tar, "rb") as f:
        try:
            return read_tar_member(f, offset, size)
        except ValueError as err:
            raise SampleError(f"{name}: {err} (truncated shard)") from err


class ScratchFiles:
    """Where a thread puts the video it decodes: the NVDEC decoder wants a path. Every video gets a new name (the
    previous file is removed once the next exists), so no decoder can mistake one video for the one before."""

    def __init__(self, folder: str, prefix: str):
        self.folder, self.prefix = folder, prefix
        self._count = itertools.count()
        self._current: Optional[str] = None

    def write(self, data: bytes, ext: str) -> str:
        path = os.path.join(self.folder, f"{self.prefix}{next(self._count)}.{ext}")
        with open(path, "wb") as f:
            f.write(data)
        self._remove_current()
        self._current = path
        return path

    def close(self) -> None:
        self._remove_current()

    def _remove_current(self) -> None:
        if self._current is not None:
            try:
                os.unlink(self._current)
            except FileNotFoundError:
                pass
            self._current = None


def default_scratch_dir() -> str:
    """/dev/shm (memory) when it is writable, else the temp folder."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else tempfile.gettempdir()


# ---- the threads ------------------------------------------------------------------------------------------------


@dataclass
class _Task:
    generation: int
    seq: int
    request: SampleRequest
    started: float = 0.0


class _Worker(threading.Thread):
    """One reader thread: its decoder, its scratch file, the task it is on."""

    def __init__(self, reader: "ClipReader", number: int):
        # daemon: a thread stuck inside a decoder call must not keep the process alive; close() joins the others
        super().__init__(name=f"clip-reader-{number}", daemon=True)
        self.reader, self.number = reader, number
        self.decoder: Optional[FrameDecoder] = None
        self.error: Optional[BaseException] = None
        self.ready = threading.Event()
        self.task: Optional[_Task] = None
        self.abandoned = False

    def run(self) -> None:
        reader = self.reader
        scratch = ScratchFiles(reader.scratch_dir, f"mae_st_{os.getpid()}_{id(reader):x}_{self.number}_")
        try:
            self.decoder = reader.decoder_factory()
        except BaseException as err:  # noqa: BLE001 - reported by the reader, which cannot decode without it
            self.error = err
            self.ready.set()
            return
        self.ready.set()
        try:
            while not reader.stopping.is_set() and not self.abandoned:
                try:
                    task = reader.tasks.get(timeout=reader.poll_s)
                except queue.Empty:
                    continue
                if task.generation != reader.generation:
                    continue  # its read was closed before this task started
                task.started = time.monotonic()
                self.task = task
                reader.deliver(self, task, self._process(task.request, scratch))
        finally:
            scratch.close()
            self._close_decoder()

    def _process(self, request: SampleRequest, scratch: ScratchFiles) -> ReadResult:
        ref = request.ref
        try:
            return read_sample(request, self.decoder, scratch)
        except SampleError as err:
            return SampleFailure(ref.key, ref.tar, str(err))
        except Exception as err:  # noqa: BLE001 - any decoder error is this sample's failure, not the run's
            lines = str(err).strip().splitlines()
            return SampleFailure(ref.key, ref.tar, f"decoder: {type(err).__name__}: {lines[0] if lines else ''}")

    def _close_decoder(self) -> None:
        if self.decoder is not None and hasattr(self.decoder, "close"):
            try:
                self.decoder.close()
            except Exception:  # noqa: BLE001 - a failing release must not hide the reason the thread ends
                log.exception("closing the decoder of %s failed", self.name)
        self.decoder = None


class ClipReader:
    """`num_threads` threads reading and decoding samples ahead of the consumer; `read()` yields results in order.

    decoder_factory: builds one FrameDecoder; called once in each thread (and in a thread that replaces one
        abandoned in a hung decoder call).
    ahead: samples read but not yet consumed, at most (e.g. prefetch batches x batch size); the memory bound.
    timeout_s: a sample whose read and decode take longer is reported failed and its thread abandoned; after
        `max_abandoned` such threads the reader raises (the decoder hangs on everything, not on one sample).
    """

    def __init__(self, decoder_factory: Callable[[], FrameDecoder], num_threads: int, ahead: int,
                 timeout_s: float = DEFAULT_TIMEOUT_S, scratch_dir: Optional[str] = None,
                 max_abandoned: Optional[int] = None):
        if num_threads < 1 or ahead < 1:
            raise ValueError(f"ClipReader needs num_threads >= 1 and ahead >= 1 (got {num_threads}, {ahead})")
        self.decoder_factory, self.num_threads = decoder_factory, num_threads
        self.ahead, self.timeout_s = ahead, timeout_s
        self.scratch_dir = scratch_dir or default_scratch_dir()
        self.max_abandoned = num_threads if max_abandoned is None else max_abandoned
        self.poll_s = min(0.5, timeout_s / 4)
        self.tasks: "queue.Queue[_Task]" = queue.Queue()
        self.stopping = threading.Event()
        self.generation = 0  # bumped by every read(); tasks of a closed read are skipped
        self._cond = threading.Condition()
        self._results: Dict[Tuple[int, int], ReadResult] = {}
        self._numbers = itertools.count()
        self.workers: List[_Worker] = []
        self.abandoned: List[_Worker] = []
        self._closed = False
        for _ in range(num_threads):
            self._start_worker()
        for worker in self.workers:
            worker.ready.wait()
            if worker.error is not None:
                self.close()
                raise RuntimeError(f"could not create a decoder in a reader thread: {worker.error}") from worker.error
        _OPEN_READERS.add(self)

    @property
    def decoders(self) -> List[FrameDecoder]:
        """The live threads' decoders (their counters say how many videos and frames were decoded)."""
        return [w.decoder for w in self.workers if w.decoder is not None]

    def read(self, requests: Iterable[SampleRequest]) -> "OrderedRead":
        """Starts reading `requests` now (the first `ahead` of them) and returns an iterator over their results,
        one per request, in request order. One read at a time: starting another ends the previous one."""
        if self._closed:
            raise RuntimeError("ClipReader.read() after close()")
        return OrderedRead(self, requests)

    def close(self) -> None:
        """Stops the threads and joins them; each releases its decoder first. Threads abandoned in a hung decoder
        call cannot be joined: they are named in a warning."""
        if self._closed:
            return
        self._closed = True
        self.stopping.set()
        with self._cond:
            self.generation += 1
            self._results.clear()
        for worker in self.workers:
            worker.join(timeout=JOIN_TIMEOUT_S)
        stuck = [w.name for w in self.workers + self.abandoned if w.is_alive()]
        if stuck:
            log.warning("clip reader threads still inside a decoder call at close: %s", ", ".join(stuck))
        _OPEN_READERS.discard(self)

    def __enter__(self) -> "ClipReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- used by OrderedRead and the workers ------------------------------------------------------------------

    def new_generation(self) -> int:
        with self._cond:
            self.generation += 1
            self._results.clear()
            return self.generation

    def submit(self, task: _Task) -> None:
        self.tasks.put(task)

    def deliver(self, worker: _Worker, task: _Task, result: ReadResult) -> None:
        with self._cond:
            worker.task = None
            if worker.abandoned or task.generation != self.generation:
                return  # its sample was already reported as timed out, or its read was closed
            self._results[(task.generation, task.seq)] = result
            self._cond.notify_all()

    def wait(self, generation: int, seq: int) -> ReadResult:
        """The result of request `seq`, once a thread delivered it or its time ran out."""
        with self._cond:
            while (generation, seq) not in self._results:
                self._abandon_hung_workers()
                if not any(w.is_alive() for w in self.workers):
                    errors = [str(w.error) for w in self.workers if w.error is not None]
                    raise RuntimeError(f"every clip reader thread has ended ({errors[:1] or 'no error recorded'})")
                self._cond.wait(timeout=self.poll_s)
            return self._results.pop((generation, seq))

    def _abandon_hung_workers(self) -> None:
        now = time.monotonic()
        for worker in list(self.workers):
            task = worker.task
            if task is None or not task.started or now - task.started <= self.timeout_s:
                continue
            worker.abandoned = True
            self.workers.remove(worker)
            self.abandoned.append(worker)
            ref = task.request.ref
            self._results[(task.generation, task.seq)] = SampleFailure(
                ref.key, ref.tar, f"decoder call did not return within {self.timeout_s:g} s; its thread was "
                                  "abandoned and replaced")
            log.warning("sample %s of %s: the decoder call hangs (over %g s); replacing %s", ref.key, ref.tar,
                        self.timeout_s, worker.name)
            if len(self.abandoned) > self.max_abandoned:
                raise RuntimeError(f"{len(self.abandoned)} decoder calls hung for over {self.timeout_s:g} s; the "
                                   "decoder is not working on this machine (last: sample "
                                   f"{ref.key} of {ref.tar})")
            self._start_worker()

    def _start_worker(self) -> None:
        worker = _Worker(self, next(self._numbers))
        self.workers.append(worker)
        worker.start()


class OrderedRead:
    """Iterator over one read's results in request order, keeping up to `ahead` requests in flight."""

    def __init__(self, reader: ClipReader, requests: Iterable[SampleRequest]):
        self._reader = reader
        self._requests = iter(requests)
        self._generation = reader.new_generation()
        self._submitted = 0
        self._next = 0
        self._fill()

    def __iter__(self) -> Iterator[ReadResult]:
        return self

    def __next__(self) -> ReadResult:
        if self._next == self._submitted:
            raise StopIteration
        result = self._reader.wait(self._generation, self._next)
        self._next += 1
        self._fill()
        return result

    def close(self) -> None:
        """Ends this read: requests not yet started are skipped, results not yet taken dropped."""
        self._requests = iter(())
        self._submitted = self._next
        if self._reader.generation == self._generation:
            self._reader.new_generation()

    def _fill(self) -> None:
        while self._submitted - self._next < self._reader.ahead:
            request = next(self._requests, None)
            if request is None:
                return
            self._reader.submit(_Task(self._generation, self._submitted, request))
            self._submitted += 1


# Readers still open at interpreter exit are closed first: a decoder thread alive while the runtime tears down
# aborted a prototype ("terminate called without an active exception").
_OPEN_READERS: "weakref.WeakSet[ClipReader]" = weakref.WeakSet()


@atexit.register
def _close_open_readers() -> None:
    for reader in list(_OPEN_READERS):
        reader.close()

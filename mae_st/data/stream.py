"""One stream of a rank's epoch: a slice of its samples read pass after pass, segment by segment, by DALI reader
pipelines or by reused decoders (`ClipStream`: PyNvVideoCodec sessions or PyAV, augmented by the same DALI ops).

A pass reads the slice in an order drawn from (seed, epoch, rank, stream, pass). It is cut into segments of
DataConfig.pipeline_segment_batches batches, and every segment gets a fresh pipeline seeded by (..., pass,
segment, the batch it starts at): DALI's random draws (clip starts, crops, flips, RandAugment) then depend only on
where a batch lies in the epoch, not on how many pipelines were built before. A resumed run builds the segment
holding its step and drops at most a segment's batches to get there; an uninterrupted run pays one pipeline build
a segment (64 batches by default), overlapped with the other streams' decoding.

A sample that fails (DALI's error names it; a jpeg frame that does not decode on the CPU; a metadata member that
does not parse or names another sample; a shard that changed or vanished under the pipeline) is recorded in the
`BadSampleRegistry` and the segment's pipeline is rebuilt from the failed batch on, without it. Nothing good is
lost or repeated. Each build's index files are deleted when its pipeline is dropped.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from nvidia.dali.pipeline import Pipeline

from mae_st.config import DataConfig
from mae_st.data.bad_samples import BadSample, BadSampleRegistry
from mae_st.data.clip_stream import ClipStream, dali_batch_to_torch
from mae_st.data.epoch_plan import buffered_shuffle, group_by_tar
from mae_st.data.format import META_EXT
from mae_st.data.frames import FRAMES, undecodable_frame, with_clip_frames
from mae_st.data.index import SampleRef, write_index
from mae_st.data.pipeline import ReaderSpec, build_eval_pipeline, build_train_pipeline
from mae_st.data.verify import deep_check

_FAILED_SAMPLE = re.compile(r'"([^"]+?):(\d+):([^"]+)"')


@dataclass
class StreamContext:
    """What every stream of one loader epoch shares."""

    cfg: DataConfig  # with num_threads already divided between the streams
    training: bool
    mode: str
    seed: int
    epoch: int
    rank: int
    device_id: Optional[int]
    half: bool
    payload: str
    registry: BadSampleRegistry
    index_root: str
    # (tar paths) -> samples of them that changed or vanished since start-up (the loader's shard fingerprints)
    recheck_tars: Callable[[Sequence[str]], List[BadSample]]
    builds: List[int]  # one counter shared by the streams: pipelines built (LoaderStats)
    # reused decoders ("nvdec" | "pyav") with their threads, shared by every segment; None: DALI's reader graphs
    decoder: Optional[str] = None
    device: Optional[torch.device] = None


class NoSamplesLeft(RuntimeError):
    """Every sample of the stream's slice is bad."""


class _SegmentDone(Exception):
    """A segment's ClipStream ran out (its failed samples shortened it)."""


class Stream:
    """Slice `index` of a rank's epoch part. `reader`: the ClipReader (threads with reused decoders) its segments
    read through when ctx.decoder is set; a reader serves one read at a time, so each stream has its own."""

    def __init__(self, index: int, samples: Sequence[SampleRef], ctx: StreamContext, reader=None):
        self.index, self.samples, self.ctx, self.reader = index, list(samples), ctx, reader
        self.batch_size = ctx.cfg.batch_size_per_gpu
        self.segment_batches = max(1, ctx.cfg.pipeline_segment_batches)
        self.pass_no, self.segment = -1, 0
        self.order: List[SampleRef] = []  # the pass's samples in read order
        self.pipe: Optional[Pipeline] = None
        self.read: List[SampleRef] = []  # what the current pipeline reads, in order
        self._plain: List[SampleRef] = []  # the same before jpeg-payload samples got their clips' frames
        self._first_batch = 0  # the batch of the segment the current pipeline started at
        self._primed = False  # the build scheduled the first iteration already
        self._clips = None  # the batches of the segment's ClipStream, when decoders are reused
        self.fetched = 0  # batches the current pipeline delivered
        self._index_dir: Optional[str] = None

    # -- positions ---------------------------------------------------------------------------------------------

    def batches_per_pass(self) -> int:
        return math.ceil(len(self._good(self.samples)) / self.batch_size)

    def seek(self, pass_no: int, batch: int) -> int:
        """Starts pass `pass_no` at `batch` (a resume); returns how many batches were decoded and dropped."""
        self._start_pass(pass_no, segment=batch // self.segment_batches)
        dropped = batch - self.segment * self.segment_batches
        for _ in range(dropped):
            self.next_batch()
        return dropped

    def next_batch(self) -> Optional[Tuple[object, List[dict]]]:
        """The next batch (DALI clips, metadata of each sample), starting segments and passes as needed; None
        when an evaluation stream's one pass is done."""
        while True:
            if self.pipe is None:
                if not self.ctx.training and self.pass_done():
                    return None  # evaluation reads one pass
                self._advance()
            try:
                clips, raw_meta = self._fetch()
            except _SegmentDone:
                continue
            except RuntimeError as err:
                self._drop_failed(self._failed_samples(err), self.fetched)
                continue
            if self.ctx.decoder is not None:
                if self.fetched >= self._pipeline_batches():
                    self._close_pipeline()
                return clips, raw_meta  # parsed and checked by the reader
            metas, bad = self._parse_metas(raw_meta)
            if bad:
                self._drop_failed(bad, self.fetched - 1)
                continue
            if self.fetched >= self._pipeline_batches():
                self._close_pipeline()
            return clips, metas

    def start(self) -> None:
        """Builds the first pipeline now (it decodes ahead until the stream's first turn)."""
        self._advance()

    def pass_done(self) -> bool:
        """The current pass delivered all it holds (evaluation reads one pass)."""
        last_segment = (self.segment + 1) * self.segment_batches * self.batch_size >= len(self.order)
        return self.pass_no >= 0 and self.pipe is None and last_segment

    def close(self) -> None:
        self._close_pipeline()

    # -- passes and segments -----------------------------------------------------------------------------------

    def _advance(self) -> None:
        """Builds the next segment's pipeline (the next pass's first, after the last)."""
        if self.pass_no < 0 or (self.segment + 1) * self.segment_batches * self.batch_size >= len(self.order):
            self._start_pass(self.pass_no + 1, segment=0)
        else:
            self._start_segment(self.segment + 1)

    def _start_pass(self, pass_no: int, segment: int) -> None:
        self.pass_no = pass_no
        good = self._good(self.samples)
        if not good:
            raise NoSamplesLeft(f"every sample of stream {self.index} on rank {self.ctx.rank} is bad")
        if self.ctx.training:
            rng = np.random.default_rng([self.ctx.seed, self.ctx.epoch, self.ctx.rank, self.index, pass_no])
            good = buffered_shuffle(good, self.ctx.cfg.shuffle_buffer, rng)
        self.order = good
        self._start_segment(segment)

    def _start_segment(self, segment: int) -> None:
        self.segment = segment
        span = self.segment_batches * self.batch_size
        self._build(group_by_tar(self.order[segment * span : (segment + 1) * span]), first_batch=0)

    def _drop_failed(self, bad: List[BadSample], failed_batch: int) -> None:
        """Records `bad` and rebuilds the segment's pipeline from `failed_batch` on, without them."""
        if not bad:
            raise AssertionError("a failed batch must name a bad sample")
        for sample in bad:
            self.ctx.registry.add(sample)
        rest = self._good(self._plain[failed_batch * self.batch_size :])
        if not rest:  # the segment held nothing else: on to the next
            self._close_pipeline()
            return
        offset = self._first_batch + failed_batch
        self._build(rest, first_batch=offset)

    def _build(self, read: List[SampleRef], first_batch: int) -> None:
        self._close_pipeline()
        ctx = self.ctx
        seed = int(np.random.SeedSequence([ctx.seed, ctx.epoch, ctx.rank, self.index, self.pass_no, self.segment,
                                           first_batch]).generate_state(1)[0] % 2**31)
        self._plain, self._first_batch, self.fetched = read, first_batch, 0
        self.read = self._as_read(read, seed)
        ctx.builds[0] += 1
        if ctx.decoder is not None:
            self._build_decoded(self.read, seed)
            return
        self._index_dir = tempfile.mkdtemp(prefix=f"s{self.index}_", dir=ctx.index_root)
        tars, index_paths = _write_indexes(self.read, self._index_dir)
        spec = ReaderSpec(tars=tars, index_paths=index_paths, batch_size=self.batch_size, device_id=ctx.device_id,
                          seed=seed, shuffle=False, pad_last_batch=not ctx.training, half=ctx.half,
                          payload=ctx.payload)
        try:
            build = build_train_pipeline if ctx.training else build_eval_pipeline
            self.pipe = build(spec, ctx.cfg, ctx.mode) if ctx.training else build(spec, ctx.cfg)
        except RuntimeError:  # a tar that vanished or shrank since start-up
            bad = self.ctx.recheck_tars(tars)
            if not bad:
                raise
            self._close_pipeline()
            self._drop_failed(bad, 0)
            return
        self.pipe.schedule_run()  # decodes ahead from now on, not from the stream's first turn
        self._primed = True

    def _as_read(self, samples: List[SampleRef], seed: int) -> List[SampleRef]:
        """jpeg-payload samples name their clips' frames (random starts drawn with `seed` in training)."""
        if self.ctx.payload != FRAMES:
            return samples
        rng = np.random.default_rng(seed) if self.ctx.training else None
        return [with_clip_frames(sample, self.ctx.cfg, rng) for sample in samples]

    def _pipeline_batches(self) -> int:
        return math.ceil(len(self.read) / self.batch_size)

    def _fetch(self):
        if self._clips is not None:
            return self._fetch_decoded()
        if self._primed:
            self._primed = False
        else:
            self.pipe.schedule_run()
        clips, meta = self.pipe.outputs()
        self.fetched += 1
        return clips, meta

    def _fetch_decoded(self):
        """The next batch of the segment's ClipStream (its failures were reported to the registry already); a
        short last batch of a training pass is filled by repeating its clips, as a reader graph wraps around."""
        try:
            clips, metas = next(self._clips)
        except StopIteration:
            self._close_pipeline()
            raise _SegmentDone() from None
        self.fetched += 1
        if self.ctx.training and len(metas) < self.batch_size:
            repeat = [i % len(metas) for i in range(self.batch_size)]
            clips, metas = clips[repeat], [metas[i] for i in repeat]
        return clips, metas

    def _build_decoded(self, read: List[SampleRef], seed: int) -> None:
        ctx = self.ctx
        stream = ClipStream(read, self.batch_size, ctx.cfg, training=ctx.training, mode=ctx.mode, seed=ctx.seed,
                            epoch=ctx.epoch, pipeline_seed=seed, device=ctx.device, decoder=ctx.decoder,
                            half=ctx.half, reader=self.reader,
                            on_failure=lambda f: ctx.registry.add(BadSample(f.tar, f.key, f.reason)))
        self.pipe, self._clips = stream, iter(stream)

    def _close_pipeline(self) -> None:
        if self._clips is not None:
            self.pipe.close()
            self._clips = None
        self.pipe = None  # the old one's memory goes before a new one takes its own
        if self._index_dir is not None:
            shutil.rmtree(self._index_dir, ignore_errors=True)
            self._index_dir = None

    def _good(self, samples: Sequence[SampleRef]) -> List[SampleRef]:
        registry = self.ctx.registry
        return [s for s in samples if s not in registry]

    # -- locating what failed ----------------------------------------------------------------------------------

    def _batch_samples(self, batch: int, count: int = 1) -> List[SampleRef]:
        start = batch * self.batch_size
        return self.read[start : start + count * self.batch_size]

    def _failed_samples(self, err: RuntimeError) -> List[BadSample]:
        """The samples a failed fetch or build stands for: the one DALI's error names; else, for jpeg frames,
        the first whose frames do not decode on the CPU; else those of a shard that changed; else the first of
        the batch (and those decoded ahead of it) whose tar headers or metadata are damaged."""
        named = self._named_in(err)
        if named:
            return named
        window = self._batch_samples(self.fetched, self.ctx.cfg.prefetch_queue_depth + 1)
        if self.ctx.payload == FRAMES:
            for sample in window:
                reason = undecodable_frame(sample)
                if reason is not None:
                    return [BadSample(sample.tar, sample.key, reason)]
        changed = self.ctx.recheck_tars(sorted({s.tar for s in self.read}))
        if changed:
            return changed
        for sample in window:
            with open(sample.tar, "rb") as handle:
                reason = deep_check(sample, handle)
            if reason is not None:
                return [BadSample(sample.tar, sample.key, reason)]
        raise RuntimeError(f"DALI pipeline failed and the error names no sample of this rank's part, so it "
                           f"cannot be skipped (epoch {self.ctx.epoch}, rank {self.ctx.rank}):\n{err}") from err

    def _named_in(self, err: RuntimeError) -> List[BadSample]:
        by_id = {(os.path.abspath(s.tar), s.key): s for s in self.read}
        lines = [line.strip() for line in str(err).splitlines() if _FAILED_SAMPLE.search(line)]
        for tar, _offset, name in _FAILED_SAMPLE.findall(str(err)):
            dot = name.find(".", name.rfind("/") + 1)
            sample = by_id.get((os.path.abspath(tar), name if dot < 0 else name[:dot]))
            if sample is not None:
                return [BadSample(sample.tar, sample.key, lines[0] if lines else str(err).splitlines()[0])]
        return []

    def _parse_metas(self, raw_meta) -> Tuple[List[dict], List[BadSample]]:
        """Each sample's metadata; a member that does not parse, or describes another sample than the one this
        position of the read order holds, makes that sample bad."""
        first = (self.fetched - 1) * self.batch_size
        metas, bad = [], []
        for i in range(len(raw_meta)):
            expected = self.read[min(first + i, len(self.read) - 1) if not self.ctx.training
                                 else (first + i) % len(self.read)]
            try:
                meta = json.loads(np.asarray(raw_meta.at(i)).tobytes())
                if meta.get("key") != expected.key:
                    raise ValueError(f"it describes sample {meta.get('key')!r}")
                metas.append(meta)
            except (ValueError, UnicodeDecodeError, AttributeError) as err:
                bad.append(BadSample(expected.tar, expected.key,
                                     f"metadata member {expected.key}.{META_EXT} is unreadable: {err}"))
        if not self.ctx.training:  # evaluation pads a pipeline's last batch by repeating a sample
            metas = metas[: max(0, len(self.read) - first)]
        return metas, bad


def _write_indexes(samples: Sequence[SampleRef], folder: str) -> Tuple[List[str], List[str]]:
    """One index file per tar (samples already grouped by tar, the order DALI reads them in)."""
    by_tar: Dict[str, List[SampleRef]] = {}
    for sample in samples:
        by_tar.setdefault(sample.tar, []).append(sample)
    index_paths = []
    for i, tar_samples in enumerate(by_tar.values()):
        index_paths.append(os.path.join(folder, f"{i:06d}.idx"))
        write_index(tar_samples, index_paths[-1])
    return list(by_tar), index_paths


def to_torch(batch, device: torch.device) -> torch.Tensor:
    """A batch's clips as a torch tensor on `device`: a DALI batch is copied out, a ClipStream's is one already."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    return dali_batch_to_torch(batch, device)

"""The iterators the trainer uses: `(clips, targets)` for training, `(clips, labels, video_ids)` for evaluation.

Epochs and sharding: every epoch rebuilds the DALI pipelines with seed + epoch, after `epoch_plan` has put the
tars in that epoch's order and cut this rank's contiguous part; the loader writes index files for exactly
what each pipeline reads, so DALI reads it with num_shards=1. Training runs `len(loader)` =
(samples // world) // batch steps on every rank (the tail is dropped, as DistributedSampler's drop_last);
evaluation reads every sample of its part once (the padded tail of a pipeline's last batch is cut off).

Concurrent pipelines: DALI's video decoder works through a batch's videos one after another, so one pipeline
leaves NVDEC mostly idle. With DataConfig.pipelines_per_gpu = k > 1 the rank's part is cut again into k
contiguous sub-parts at batch boundaries, each read by its own pipeline (own seed, num_threads // k
threads); every pipeline decodes ahead asynchronously from the moment it is built, and `__iter__` takes one
batch from each in turn, so k batches are decoded at once. The turn order depends only on seed, epoch and the
bad samples met, so an epoch replays exactly; k = 1 is the single pipeline (same seeds, same batches).

Corrupt samples: DALI's video decoder raises when the batch holding one is fetched, and the whole batch is
lost. The error names the sample ("<tar>:<offset>:<name>"), so the loader counts and logs it, then rebuilds
that pipeline over the samples of its sub-part not yet delivered this epoch, minus the bad one; nothing good
is lost or repeated. DALI's image decoder (jpeg payload) names no sample, so for that payload the loader
shuffles in Python and reads in index order: it knows which samples the failed batch held and decodes their
frames on the CPU to find the bad one. In training a sub-part that runs out waits while others still hold
unseen samples; when all ran out before the epoch's step count (bad samples, uneven split), they start another
pass.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch.torch_utils import feed_ndarray, to_torch_type

from mae_st.config import DataConfig
from mae_st.data.augment import ClipMixup, ClipRandomErasing, mixup_enabled
from mae_st.data.epoch_plan import epoch_order, rank_part, train_steps_per_epoch
from mae_st.data.frames import FRAMES, VIDEO, shard_payload, undecodable_frame, with_clip_frames
from mae_st.data.index import SampleRef, read_shard_indexes, write_index
from mae_st.data.pipeline import ReaderSpec, build_eval_pipeline, build_train_pipeline
from mae_st.data.shards import list_shards

log = logging.getLogger(__name__)

MODES = ("pretrain", "finetune")
# the bad-sample share is judged only once this many samples were read (one early failure is not "most")
MIN_SAMPLES_FOR_BAD_FRACTION = 20
# pipelines per GPU by default when decoding on NVDEC: 4 (8 threads) gave 509 clips/s on an H100, 2 gave 433, 1 312
NVDEC_PIPELINES = 4
_FAILED_SAMPLE = re.compile(r'"([^"]+?):(\d+):([^"]+)"')


@dataclass
class LoaderStats:
    """What the loader did so far (across epochs): delivered and bad samples, time the trainer waited."""

    samples: int = 0
    bad_samples: int = 0
    bad_keys: List[str] = field(default_factory=list)
    wait_seconds: float = 0.0
    pipeline_builds: int = 0


@dataclass
class _Stream:
    """One of a rank's concurrent pipelines: its sub-part of the epoch and what of it is not yet delivered."""

    index: int  # j of pipelines_per_gpu: part of the seed
    part: List[SampleRef]
    remaining: "OrderedDict[str, SampleRef]" = field(default_factory=OrderedDict)
    attempt: int = -1  # its pipelines built this epoch, less one: part of the seed, so an epoch replays exactly
    pipe: Optional[Pipeline] = None
    primed: bool = False  # the build scheduled the first iterations already
    order: List[SampleRef] = field(default_factory=list)  # what the pipeline reads, in order (jpeg payload)
    fetched: int = 0  # batches the pipeline delivered

    def run(self):
        """The next batch: DALI's `run()` (schedule one iteration, fetch the oldest) with the first schedule
        done at build time, so that a pipeline decodes ahead before its first turn."""
        if self.primed:
            self.primed = False
        else:
            self.pipe.schedule_run()
        outputs = self.pipe.outputs()
        self.fetched += 1
        return outputs


def resolve_decode_device(cfg: DataConfig, device: torch.device) -> Optional[int]:
    """CUDA device id to decode on (NVDEC via DALI "mixed"), or None for DALI's CPU backend."""
    if cfg.decode_device not in ("auto", "gpu", "cpu"):
        raise ValueError(f"DataConfig.decode_device={cfg.decode_device!r}: expected auto, gpu or cpu")
    if cfg.jpeg_decode_device not in ("gpu", "cpu"):
        raise ValueError(f"DataConfig.jpeg_decode_device={cfg.jpeg_decode_device!r}: expected gpu or cpu")
    cuda = device.type == "cuda" and torch.cuda.is_available()
    if cfg.decode_device == "gpu" and not cuda:
        raise ValueError(f"DataConfig.decode_device='gpu' but the training device is {device} "
                         f"(CUDA available: {torch.cuda.is_available()}); use 'auto' or 'cpu'")
    if cfg.decode_device == "cpu" or not cuda:
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def resolve_pipelines_per_gpu(cfg: DataConfig, decode_device_id: Optional[int], payload: str = VIDEO) -> int:
    """DataConfig.pipelines_per_gpu, with 0 resolved: NVDEC_PIPELINES for video on the GPU decoder, else 1 (DALI's
    CPU decoders already decode a batch's samples in parallel; the jpeg payload's 157 clips/s on an H200 were
    measured with one pipeline)."""
    if cfg.pipelines_per_gpu < 0:
        raise ValueError(f"DataConfig.pipelines_per_gpu={cfg.pipelines_per_gpu}: must be >= 1, or 0 for the default")
    if cfg.pipelines_per_gpu:
        return cfg.pipelines_per_gpu
    return NVDEC_PIPELINES if decode_device_id is not None and payload == VIDEO else 1


class VideoLoader:
    """Runs DALI pipelines (pipelines_per_gpu, concurrently) over this rank's part of every epoch and hands
    their batches, in turn, to PyTorch on `device`."""

    def __init__(self, cfg: DataConfig, tars: Sequence[str], index_paths: Sequence[str], *, training: bool,
                 mode: str, rank: int, world_size: int, device: torch.device, seed: int,
                 dtype: torch.dtype, num_classes: int):
        self.cfg, self.training, self.mode = cfg, training, mode
        self.rank, self.world_size, self.device, self.seed, self.dtype = rank, world_size, device, seed, dtype
        self.decode_device_id = resolve_decode_device(cfg, device)
        self.per_tar = read_shard_indexes(tars, index_paths)
        self.num_samples = sum(len(samples) for samples in self.per_tar)
        if self.num_samples == 0:
            raise ValueError(f"no readable samples in {len(tars)} shards (first: {tars[0] if tars else None})")
        self.payload = shard_payload(self.per_tar)
        self._warn_if_frames_payload_is_slow_here()
        self.num_pipelines = resolve_pipelines_per_gpu(cfg, self.decode_device_id, self.payload)
        # num_threads is the budget of all of this rank's pipelines together
        self._pipe_cfg = replace(cfg, num_threads=max(1, cfg.num_threads // self.num_pipelines))
        self.epoch = 0
        self.stats = LoaderStats()
        self._bad: set = set()  # (tar, key) of samples that failed to decode
        self._index_dir = tempfile.TemporaryDirectory(prefix="mae_st_idx_")
        self._erase, self._mixup = self._batch_augmentations(num_classes)

    def _warn_if_frames_payload_is_slow_here(self) -> None:
        clips = self.cfg.repeat_aug if self.training else self.cfg.test_num_ensemble_views
        if self.payload == FRAMES and clips > 2:
            log.warning("jpeg-payload shards decode every clip's frames separately: %d clips x %d frames = %d "
                        "images a video here, where video shards decode a video once for all its clips (repeat_aug "
                        "16 pretraining on an H200: 11 clips/s with nvJPEG, 505 from VP9); pack this set as video",
                        clips, self.cfg.num_frames, clips * self.cfg.num_frames)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next `__iter__` follows (same seed + epoch -> same order)."""
        self.epoch = epoch

    def __len__(self) -> int:
        if self.training:
            return train_steps_per_epoch(self.num_samples, self.world_size, self.cfg.batch_size_per_gpu)
        return sum(math.ceil(len(sub) / self.cfg.batch_size_per_gpu) for sub in self._sub_parts(self._part()))

    def __iter__(self) -> Iterator[tuple]:
        streams = deque(self._start(_Stream(j, sub)) for j, sub in enumerate(self._sub_parts(self._part())))
        step, steps = 0, len(self)
        # training runs the fixed step count; evaluation runs until every sample of the part was delivered
        while streams and (step < steps or not self.training):
            stream = streams.popleft()  # a stream goes back to the end of the queue unless it is done
            if not stream.remaining:
                if not self.training:
                    continue  # its sub-part is evaluated
                if any(s.remaining for s in streams):
                    streams.append(stream)  # others still hold samples not seen this epoch: it waits
                    continue
                # every sub-part was read, yet steps remain (bad samples, uneven split): another pass over this one
                if not self._start(stream).remaining:
                    continue  # every sample of it is bad
            try:
                started = time.perf_counter()
                clips, meta = stream.run()
                self.stats.wait_seconds += time.perf_counter() - started
            except RuntimeError as err:
                self._record_bad_sample(err, stream)
                streams.append(self._rebuild(stream))
                continue
            streams.append(stream)
            metas = [json.loads(np.asarray(meta.at(i)).tobytes()) for i in range(len(meta))]
            # evaluation pads a pipeline's last batch by repeating a sample; the padding is cut off here
            keep = len(metas) if self.training else min(len(metas), len(stream.remaining))
            for sample in metas[:keep]:
                stream.remaining.pop(sample["key"], None)
            self.stats.samples += keep
            step += 1
            yield self._to_batch(clips, metas[:keep])
        self._check_bad_fraction(final=True)
        if self.training and step < steps:
            raise RuntimeError(f"no decodable samples left on rank {self.rank} in epoch {self.epoch} "
                               f"after {step} of {steps} steps; bad keys: {self.stats.bad_keys[:10]}")

    def close(self) -> None:
        self._index_dir.cleanup()

    # -- epoch bookkeeping -------------------------------------------------------------------------------------

    def _part(self) -> List[SampleRef]:
        order = epoch_order(self.per_tar, self.seed, self.epoch, shuffle=self.training)
        return rank_part(order, self.rank, self.world_size)

    def _sub_parts(self, part: Sequence[SampleRef]) -> List[List[SampleRef]]:
        """The contiguous slices of the part that the rank's pipelines read (the part itself for one), cut at
        batch boundaries: a pipeline fills its last batch by wrapping around its slice, so slices of other sizes
        would repeat samples while the epoch's step count leaves others unread (a pipeline may get none)."""
        batch, k = self.cfg.batch_size_per_gpu, self.num_pipelines
        batches = math.ceil(len(part) / batch)
        return [list(part[batch * (batches * j // k) : batch * (batches * (j + 1) // k)]) for j in range(k)]

    def _undelivered(self, part: Sequence[SampleRef]) -> "OrderedDict[str, SampleRef]":
        return OrderedDict((s.key, s) for s in part if (s.tar, s.key) not in self._bad)

    def _start(self, stream: _Stream) -> _Stream:
        """Starts a pass over the stream's sub-part (the first of the epoch, or another when training ran out)."""
        stream.remaining = self._undelivered(stream.part)
        return self._rebuild(stream)

    def _rebuild(self, stream: _Stream) -> _Stream:
        """A fresh pipeline for the stream's undelivered samples (none when nothing is left)."""
        stream.attempt += 1
        stream.pipe = None  # the old one's memory goes before the new one takes its own
        stream.fetched = 0
        if stream.remaining:
            stream.pipe = self._build(stream, stream.attempt * self.num_pipelines + stream.index)
            stream.pipe.schedule_run()  # starts decoding ahead now, not at the stream's first turn
            stream.primed = True
        return stream

    def _build(self, stream: _Stream, attempt: int) -> Pipeline:
        """A fresh pipeline reading exactly the stream's remaining samples, seeded by seed, epoch, rank and attempt
        (which counts builds x pipelines_per_gpu + stream, so concurrent pipelines get distinct seeds)."""
        seed = (self.seed * 1_000_003 + self.epoch * 10_007 + self.rank * 101 + attempt * 7) % 2**31
        stream.order, tars, index_paths = self._write_indexes(self._as_read(stream.remaining.values(), seed))
        spec = ReaderSpec(tars=tars, index_paths=index_paths, batch_size=self.cfg.batch_size_per_gpu,
                          device_id=self.decode_device_id, seed=seed,
                          shuffle=self.training and self.payload != FRAMES,
                          initial_fill=self.cfg.shuffle_buffer, pad_last_batch=not self.training,
                          half=self.dtype != torch.float32, payload=self.payload)
        self.stats.pipeline_builds += 1
        if self.training:
            return build_train_pipeline(spec, self._pipe_cfg, self.mode)
        return build_eval_pipeline(spec, self._pipe_cfg)

    def _as_read(self, samples, seed: int) -> List[SampleRef]:
        """The samples as the pipeline reads them; jpeg-payload ones name their clips' frames and, in training,
        are shuffled here (both drawn with `seed`)."""
        if self.payload != FRAMES:
            return list(samples)
        if not self.training:
            return [with_clip_frames(sample, self.cfg, None) for sample in samples]
        rng = np.random.default_rng(seed)
        samples = list(samples)
        return [with_clip_frames(samples[i], self.cfg, rng) for i in rng.permutation(len(samples))]

    def _write_indexes(self, samples) -> Tuple[List[SampleRef], List[str], List[str]]:
        """Index files listing `samples` grouped by tar (DALI reads tar after tar); returns the samples in the
        order they are read, the tars and the index files."""
        by_tar: Dict[str, List[SampleRef]] = OrderedDict()
        for sample in samples:
            by_tar.setdefault(sample.tar, []).append(sample)
        build_dir = os.path.join(self._index_dir.name, str(self.stats.pipeline_builds))
        os.makedirs(build_dir)
        index_paths = []
        for i, (tar, tar_samples) in enumerate(by_tar.items()):
            index_paths.append(os.path.join(build_dir, f"{i:06d}.idx"))
            write_index(tar_samples, index_paths[-1])
        return [s for group in by_tar.values() for s in group], list(by_tar), index_paths

    # -- corrupt samples ---------------------------------------------------------------------------------------

    def _record_bad_sample(self, err: RuntimeError, stream: _Stream) -> None:
        remaining = stream.remaining
        sample, reason = self._failed_sample(err, remaining), _first_line_naming(err)
        if sample is None and self.payload == FRAMES:
            sample, reason = self._undecodable_in_failed_batch(stream)
        if sample is None:
            raise RuntimeError(f"DALI pipeline failed and the error names no sample of this rank's part, so it "
                               f"cannot be skipped (epoch {self.epoch}, rank {self.rank}):\n{err}") from err
        self._bad.add((sample.tar, sample.key))
        remaining.pop(sample.key)
        self.stats.bad_samples += 1
        self.stats.bad_keys.append(sample.key)
        log.warning("skipping undecodable sample %s in %s (%d bad so far): %s", sample.key, sample.tar,
                    self.stats.bad_samples, reason)
        self._check_bad_fraction(final=False)

    @staticmethod
    def _failed_sample(err: RuntimeError, remaining: "OrderedDict[str, SampleRef]") -> Optional[SampleRef]:
        for tar, _offset, name in _FAILED_SAMPLE.findall(str(err)):
            dot = name.find(".", name.rfind("/") + 1)
            sample = remaining.get(name if dot < 0 else name[:dot])
            if sample is not None and os.path.abspath(sample.tar) == os.path.abspath(tar):
                return sample
        return None

    def _undecodable_in_failed_batch(self, stream: _Stream) -> Tuple[Optional[SampleRef], str]:
        """The first sample of the failed batch (or of those prefetched after it) whose frames do not decode on
        the CPU, and why: the image decoder's error does not say which it was."""
        batch = self.cfg.batch_size_per_gpu
        start = stream.fetched * batch
        for sample in stream.order[start : start + batch * (self.cfg.prefetch_queue_depth + 1)]:
            reason = undecodable_frame(sample) if sample.key in stream.remaining else None
            if reason is not None:
                return stream.remaining[sample.key], reason
        return None, ""

    def _check_bad_fraction(self, final: bool) -> None:
        seen = self.stats.samples + self.stats.bad_samples
        if not self.stats.bad_samples or (not final and seen < MIN_SAMPLES_FOR_BAD_FRACTION):
            return
        if self.stats.bad_samples > self.cfg.max_bad_sample_fraction * seen:
            raise RuntimeError(
                f"{self.stats.bad_samples} of {seen} samples read on rank {self.rank} could not be decoded "
                f"(more than DataConfig.max_bad_sample_fraction={self.cfg.max_bad_sample_fraction}); "
                f"first bad keys: {self.stats.bad_keys[:10]}. Check the shards (codec, truncation) and re-pack.")

    # -- hand-off ----------------------------------------------------------------------------------------------

    def _batch_augmentations(self, num_classes: int):
        if not (self.training and self.mode == "finetune"):
            return None, None
        erase = ClipRandomErasing(self.cfg.reprob, self.cfg.remode, self.cfg.recount) if self.cfg.reprob > 0 else None
        mixup = ClipMixup(self.cfg, num_classes) if mixup_enabled(self.cfg) else None
        return erase, mixup

    def _to_batch(self, clips, metas: List[dict]) -> tuple:
        videos = _to_torch(clips, self.device)[: len(metas)]  # (B, clips per video, C, T, H, W)
        per_video = videos.shape[1]
        videos = videos.flatten(0, 1)
        if self.dtype != videos.dtype:
            videos = videos.to(self.dtype)
        labels = torch.tensor([m["label"] for m in metas], dtype=torch.int64).repeat_interleave(per_video)
        labels = labels.to(self.device, non_blocking=True)
        if not self.training:
            return videos, labels, [m["key"] for m in metas for _ in range(per_video)]
        if self._erase is not None:
            videos = self._erase(videos)
        if self._mixup is not None:
            return self._mixup(videos, labels)
        return videos, labels


def _to_torch(batch, device: torch.device) -> torch.Tensor:
    """Copy a dense DALI batch into a torch tensor on DALI's device, then move it to `device` if needed."""
    dense = batch.as_tensor()
    on_gpu = hasattr(dense, "device_id")
    target = torch.device("cuda", dense.device_id()) if on_gpu else torch.device("cpu")
    out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=target)
    feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(target) if on_gpu else None)
    return out.to(device, non_blocking=True)


def _first_line_naming(err: Exception) -> str:
    lines = [line for line in str(err).splitlines() if _FAILED_SAMPLE.search(line)]
    return lines[0].strip() if lines else str(err).splitlines()[0]


def build_train_loader(cfg: DataConfig, mode: str, num_classes: int, rank: int, world_size: int,
                       device: torch.device, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> VideoLoader:
    """Training iterator over DataConfig.train_shards yielding (clips (B*repeat_aug, C, T, H, W), targets)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    shards = list_shards(cfg.train_shards)
    return VideoLoader(cfg, shards.tars, shards.index_paths, training=True, mode=mode, rank=rank, world_size=world_size,
                       device=device, seed=seed, dtype=dtype, num_classes=num_classes)


def build_eval_loader(cfg: DataConfig, rank: int, world_size: int, device: torch.device, *,
                      dtype: torch.dtype = torch.float32) -> VideoLoader:
    """Multi-view evaluation iterator over DataConfig.val_shards yielding (clips, labels, video_ids)."""
    shards = list_shards(cfg.val_shards)
    return VideoLoader(cfg, shards.tars, shards.index_paths, training=False, mode="eval", rank=rank, world_size=world_size,
                       device=device, seed=0, dtype=dtype, num_classes=0)

"""What the trainer iterates: `Batch(clips, labels)` for training, `Batch(clips, labels, video_ids)` for evaluation.

Start-up: `mae_st.data.verify` checks every shard against its index and the manifest (one `stat` a tar); damaged
samples are logged, counted and left out, and the run stops only when they are more than
DataConfig.max_bad_sample_fraction of the set. Every epoch, a shard whose size or mtime changed is checked again.

An epoch (`mae_st.data.epoch_plan`): the tars in an order drawn from (seed, epoch), cut into one contiguous part
per rank, and each part into one slice per concurrent pipeline (DataConfig.pipelines_per_gpu: DALI's video
decoder works through a batch's videos one after another, so k pipelines keep k videos decoding at once). Each
slice is a `Stream` (DALI reader graphs, or reused decoders: `--decoder`, `resolve_decoder`); the step -> stream
order is fixed by the slices' batch counts. Training runs `len(loader)`
= (samples // world) // batch steps on every rank (drop_last); evaluation reads every sample of its part once.
`set_epoch(epoch, start_step)` starts an epoch at any step without reading the steps before it.

Bad samples met while reading are skipped (`mae_st.data.stream`) and, with a `state_dir`, remembered there
for resumed runs (`mae_st.data.bad_samples`). Mixup/cutmix and random erasing are not applied here: they are the
trainer's batch transform (`mae_st.data.augment.build_batch_transform`), seeded by the step.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Iterator, List, Optional, Sequence

import torch

from mae_st.config import DataConfig
from mae_st.data.bad_samples import BadSample, BadSampleRegistry
from mae_st.data.batch import Batch
from mae_st.data.stream import NoSamplesLeft, Stream, StreamContext, to_torch
from mae_st.data.epoch_plan import (epoch_order, rank_part, stream_positions, sub_parts, train_steps_per_epoch,
                                    turn_order)
from mae_st.data.frames import FRAMES, VIDEO, shard_payload
from mae_st.data.index import SampleRef
from mae_st.data.shards import ShardSet, list_shards
from mae_st.data.verify import fingerprint, load_shard, load_shards

log = logging.getLogger(__name__)

MODES = ("pretrain", "finetune")
# pipelines per GPU by default when decoding on NVDEC: 4 (8 threads) gave 509 clips/s on an H100, 2 gave 433, 1 312
NVDEC_PIPELINES = 4


@dataclass
class LoaderStats:
    """What the loader did so far (across epochs): delivered and bad samples, time the trainer waited."""

    registry: BadSampleRegistry  # the bad samples themselves: counted and named from it when asked
    samples: int = 0
    wait_seconds: float = 0.0
    pipeline_builds: int = 0
    resume_dropped_batches: int = 0  # batches decoded only to reach a resumed run's step

    @property
    def bad_samples(self) -> int:
        return len(self.registry)

    @property
    def bad_keys(self) -> List[str]:
        return [bad.key for bad in self.registry.found]


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


DECODERS = ("auto", "nvdec", "dali", "pyav")


def resolve_decoder(cfg: DataConfig, decode_device_id: Optional[int], payload: str = VIDEO) -> Optional[str]:
    """'nvdec' or 'pyav' (reused decoders, `mae_st.data.clip_stream`), or None for DALI's reader graphs.

    DALI's video decoder sets up a demuxer, parser and frame index for every sample (~25-30 ms a video on an
    H200), so sets read one clip per video starve the GPU; PyNvVideoCodec sessions created once per thread and
    reconfigured per video do not pay that (docs/performance.md)."""
    if cfg.decoder not in DECODERS:
        raise ValueError(f"DataConfig.decoder={cfg.decoder!r}: expected one of {DECODERS}")
    if payload == FRAMES:
        if cfg.decoder in ("nvdec", "pyav"):
            raise ValueError(f"--decoder {cfg.decoder} decodes video; this set holds jpeg frames (--decoder dali)")
        return None
    if cfg.decoder in ("dali", "pyav"):
        return None if cfg.decoder == "dali" else "pyav"
    from mae_st.data.nvdec import fallback_message, nvdec_unavailable_reason

    if decode_device_id is None:
        if cfg.decoder == "nvdec":
            raise ValueError("--decoder nvdec decodes on a GPU, but this run decodes on the CPU "
                             "(no GPU, or --decode_device cpu)")
        return None
    reason = nvdec_unavailable_reason()
    if reason is not None:
        if cfg.decoder == "nvdec":
            raise ValueError(f"--decoder nvdec: {reason}")
        log.warning(fallback_message(reason))
        return None
    return "nvdec"


def resolve_pipelines_per_gpu(cfg: DataConfig, decode_device_id: Optional[int], payload: str = VIDEO,
                              decoder: Optional[str] = None) -> int:
    """DataConfig.pipelines_per_gpu, with 0 resolved: NVDEC_PIPELINES for video on the GPU decoder, else 1 (DALI's
    CPU decoders already decode a batch's samples in parallel; the jpeg payload's 157 clips/s on an H200 were
    measured with one pipeline)."""
    if cfg.pipelines_per_gpu < 0:
        raise ValueError(f"DataConfig.pipelines_per_gpu={cfg.pipelines_per_gpu}: must be >= 1, or 0 for the default")
    if cfg.pipelines_per_gpu:
        return cfg.pipelines_per_gpu
    if decoder is not None:
        return 1  # the reader's num_threads decode concurrently
    return NVDEC_PIPELINES if decode_device_id is not None and payload == VIDEO else 1


class VideoLoader:
    """This rank's part of every epoch, read by concurrent streams and handed to PyTorch on `device`."""

    def __init__(self, cfg: DataConfig, shards: ShardSet, *, training: bool, mode: str, rank: int, world_size: int,
                 device: torch.device, seed: int, dtype: torch.dtype, state_dir: Optional[str] = None):
        if cfg.pipeline_segment_batches < 1:
            raise ValueError(f"DataConfig.pipeline_segment_batches={cfg.pipeline_segment_batches}: must be >= 1")
        self.cfg, self.training, self.mode = cfg, training, mode
        self.rank, self.world_size, self.device, self.seed, self.dtype = rank, world_size, device, seed, dtype
        self.decode_device_id = resolve_decode_device(cfg, device)
        self.shards = shards
        self.registry = BadSampleRegistry(cfg.max_bad_sample_fraction, rank, state_dir)
        contents = load_shards(shards)
        self.per_tar, self._fingerprints = contents.per_tar, contents.fingerprints
        self.num_samples = sum(len(samples) for samples in self.per_tar)
        self._refuse_mostly_damaged(contents.damaged)
        for bad in contents.damaged:
            self.registry.add(bad)
        self.payload = shard_payload(self.per_tar)
        self._warn_if_frames_payload_is_slow_here()
        self.decoder = resolve_decoder(cfg, self.decode_device_id, self.payload)
        self.num_pipelines = resolve_pipelines_per_gpu(cfg, self.decode_device_id, self.payload, self.decoder)
        # num_threads is the budget of all of this rank's pipelines together
        self._pipe_cfg = replace(cfg, num_threads=max(1, cfg.num_threads // self.num_pipelines))
        # reused decoders: one reader (its threads, each with a decoder) per stream, kept for the loader's life
        self._readers = ([self._decoder_threads() for _ in range(self.num_pipelines)] if self.decoder is not None
                         else [None] * self.num_pipelines)
        log.info("decoding with %s, %d pipeline(s) of %d threads", self.decoder or "DALI's reader graph",
                 self.num_pipelines, cfg.decoder_threads if self.decoder else self._pipe_cfg.num_threads)
        self._steps = (train_steps_per_epoch(self.num_samples, world_size, cfg.batch_size_per_gpu)
                       if training else None)
        self.epoch, self.start_step = 0, 0
        self.stats = LoaderStats(self.registry)
        self._builds = [0]
        self._index_root = tempfile.TemporaryDirectory(prefix="mae_st_idx_")

    def _refuse_mostly_damaged(self, damaged: List[BadSample]) -> None:
        total = self.num_samples + len(damaged)
        if total == 0:
            raise ValueError(f"no readable samples in {len(self.shards)} shards (first: {self.shards.tars[0]})")
        if len(damaged) > self.cfg.max_bad_sample_fraction * total:
            raise ValueError(
                f"{len(damaged)} of {total} samples of the shard set are damaged (more than "
                f"DataConfig.max_bad_sample_fraction={self.cfg.max_bad_sample_fraction}); first: "
                f"{[f'{b.key} in {b.tar}: {b.reason}' for b in damaged[:3]]}. Re-copy or re-pack the shards; "
                "`python tools/shard_videos.py --verify <folder>` lists them all")

    def _warn_if_frames_payload_is_slow_here(self) -> None:
        clips = self.cfg.repeat_aug if self.training else self.cfg.test_num_ensemble_views
        if self.payload == FRAMES and clips > 2:
            log.warning("jpeg-payload shards decode every clip's frames separately: %d clips x %d frames = %d "
                        "images a video here, where video shards decode a video once for all its clips (repeat_aug "
                        "16 pretraining on an H200: 11 clips/s with nvJPEG, 505 from VP9); pack this set as video",
                        clips, self.cfg.num_frames, clips * self.cfg.num_frames)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """The epoch the next `__iter__` reads, from `start_step` on (a resumed run's position in it)."""
        if start_step and not self.training:
            raise ValueError("evaluation always reads a whole epoch")
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        if self.training:
            return self._steps
        batch = self.cfg.batch_size_per_gpu
        return sum(math.ceil(sum(s not in self.registry for s in sub) / batch) for sub in self._slices())

    def __iter__(self) -> Iterator[Batch]:
        self._recheck_changed_shards()
        ctx = self._context()
        streams = self._streams(ctx)
        try:
            yield from (self._train_batches(streams) if self.training else self._eval_batches(streams))
        finally:
            for stream in streams:
                stream.close()
            self.stats.pipeline_builds = ctx.builds[0]
        self.registry.check_fraction(self.stats.samples, final=True)

    def _decoder_threads(self):
        from mae_st.data.clip_reader import DEFAULT_TIMEOUT_S, ClipReader
        from mae_st.data.clip_stream import decoder_factory

        threads = self.cfg.decoder_threads
        ahead = max(self.cfg.prefetch_queue_depth * self.cfg.batch_size_per_gpu, threads)
        return ClipReader(decoder_factory(self.decoder, self.device), threads, ahead, DEFAULT_TIMEOUT_S)

    def close(self) -> None:
        for reader in self._readers:
            if reader is not None:
                reader.close()
        self._index_root.cleanup()

    def stats_record(self) -> dict:
        """The loader's counters for log.jsonl."""
        return {"samples": self.stats.samples, "bad_samples": len(self.registry),
                "bad_keys": [f"{b.tar}:{b.key}" for b in self.registry.found],
                "pipeline_builds": self.stats.pipeline_builds,
                "resume_dropped_batches": self.stats.resume_dropped_batches}

    # -- epochs ------------------------------------------------------------------------------------------------

    def _context(self) -> StreamContext:
        return StreamContext(cfg=self._pipe_cfg, training=self.training, mode=self.mode, seed=self.seed,
                             epoch=self.epoch, rank=self.rank, device_id=self.decode_device_id,
                             half=self.dtype != torch.float32, payload=self.payload, registry=self.registry,
                             index_root=self._index_root.name, recheck_tars=self._recheck_tars, builds=self._builds,
                             decoder=self.decoder, device=self.device)

    def _slices(self) -> List[List[SampleRef]]:
        """This epoch's part of this rank, cut into one slice per stream."""
        order = epoch_order(self.per_tar, self.seed, self.epoch, shuffle=self.training)
        part = rank_part(order, self.rank, self.world_size)
        return sub_parts(part, self.cfg.batch_size_per_gpu, self.num_pipelines)

    def _streams(self, ctx: StreamContext) -> List[Stream]:
        return [Stream(j, sub, ctx, self._readers[j]) for j, sub in enumerate(self._slices())]

    def _train_batches(self, streams: List[Stream]) -> Iterator[Batch]:
        counts = [s.batches_per_pass() for s in streams]
        turns = turn_order(counts, self._steps)
        if len(turns) < self._steps:
            raise RuntimeError(f"no readable samples left on rank {self.rank} in epoch {self.epoch}; first bad: "
                               f"{[b.key for b in self.registry.found[:10]]}")
        for stream, (pass_no, batch) in zip(streams, stream_positions(turns, counts, self.start_step)):
            if stream.batches_per_pass():
                self.stats.resume_dropped_batches += stream.seek(pass_no, batch)
        for step in range(self.start_step, self._steps):
            yield self._timed(lambda: self._next_of(streams, turns[step]))

    def _next_of(self, streams: List[Stream], j: int):
        """Stream j's next batch; another stream's when every sample of j turned out bad."""
        for k in range(len(streams)):
            try:
                return streams[(j + k) % len(streams)].next_batch()
            except NoSamplesLeft:
                continue
        raise RuntimeError(f"no readable samples left on rank {self.rank} in epoch {self.epoch}; first bad: "
                           f"{[b.key for b in self.registry.found[:10]]}")

    def _eval_batches(self, streams: List[Stream]) -> Iterator[Batch]:
        queue = deque(s for s in streams if s.batches_per_pass())
        for stream in queue:
            stream.start()
        while queue:
            stream = queue.popleft()
            batch = self._timed(stream.next_batch)
            if batch is not None:
                queue.append(stream)
                yield batch

    def _timed(self, fetch) -> Optional[Batch]:
        started = time.perf_counter()
        fetched = fetch()
        self.stats.wait_seconds += time.perf_counter() - started
        if fetched is None:
            return None
        clips, metas = fetched
        self.stats.samples += len(metas)
        self.registry.check_fraction(self.stats.samples)
        return self._to_batch(clips, metas)

    # -- shards that change during a run -----------------------------------------------------------------------

    def _recheck_changed_shards(self) -> None:
        """Every sample of a shard whose size or mtime changed since start-up and that no longer checks out is
        bad from now on (the epoch plan keeps start-up's samples, so every rank still cuts the same parts)."""
        for bad in self._recheck_tars(self.shards.tars):
            self.registry.add(bad)

    def _recheck_tars(self, tars: Sequence[str]) -> List[BadSample]:
        position = {os.path.abspath(t): i for i, t in enumerate(self.shards.tars)}
        bad: List[BadSample] = []
        for tar in tars:
            i = position.get(os.path.abspath(tar))
            if i is None or fingerprint(tar) == self._fingerprints[i]:
                continue
            now, damaged, self._fingerprints[i] = load_shard(tar, self.shards.index_paths[i])
            unchanged = {s.index_line for s in now}
            reason = next((b.reason for b in damaged), "the shard changed since start-up")
            if not os.path.exists(tar):
                reason = "the shard was deleted or moved during the run"
            bad += [BadSample(s.tar, s.key, reason) for s in self.per_tar[i]
                    if s.index_line not in unchanged and s not in self.registry]
        return bad

    # -- hand-off ----------------------------------------------------------------------------------------------

    def _to_batch(self, clips, metas: List[dict]) -> Batch:
        videos = to_torch(clips, self.device)[: len(metas)]  # (B, clips per video, C, T, H, W)
        per_video = videos.shape[1]
        videos = videos.flatten(0, 1)
        if self.dtype != videos.dtype:
            videos = videos.to(self.dtype)
        labels = torch.tensor([m["label"] for m in metas], dtype=torch.int64).repeat_interleave(per_video)
        labels = labels.to(self.device, non_blocking=True)
        if self.training:
            return Batch(videos, labels)
        return Batch(videos, labels, [m["key"] for m in metas for _ in range(per_video)])


def build_train_loader(cfg: DataConfig, mode: str, num_classes: int, rank: int, world_size: int,
                       device: torch.device, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                       state_dir: Optional[str] = None) -> VideoLoader:
    """Training iterator over DataConfig.train_shards yielding Batch(clips (B*repeat_aug, C, T, H, W), labels);
    `state_dir` (the run's output folder) keeps the bad samples met for resumed runs."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    return VideoLoader(cfg, list_shards(cfg.train_shards), training=True, mode=mode, rank=rank,
                       world_size=world_size, device=device, seed=seed, dtype=dtype, state_dir=state_dir)


def build_eval_loader(cfg: DataConfig, rank: int, world_size: int, device: torch.device, *,
                      dtype: torch.dtype = torch.float32, state_dir: Optional[str] = None) -> VideoLoader:
    """Multi-view evaluation iterator over DataConfig.val_shards yielding Batch(clips, labels, video_ids)."""
    return VideoLoader(cfg, list_shards(cfg.val_shards), training=False, mode="eval", rank=rank,
                       world_size=world_size, device=device, seed=0, dtype=dtype, state_dir=state_dir)

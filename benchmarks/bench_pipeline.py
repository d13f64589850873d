"""Sections `pipeline` and `classic`: sustained clips/s of our DALI loader and of the classic PyAV DataLoader.

`pipeline` measures `build_train_loader` (what train.py iterates) for pretraining (repeat_aug clips per decoded
video) and finetuning (one clip per video, RandAugment, random erasing, mixup/cutmix) on every shard set, then
moves one lever at a time on the default set: concurrent pipelines per GPU (both modes, same total threads),
videos per step, DALI threads, prefetch depth. Each row also has the NVDEC and SM utilisation and the device
memory the pipeline added. `classic` runs the baseline over the default set with its batches copied to the
device, and states our/classic.
"""

from __future__ import annotations

import gc
import shutil
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from benchmarks import gpu_monitor
from benchmarks.bench_data import ShardSet, mean_frames, shard_sets
from benchmarks.classic_loader import classic_loader
from benchmarks.harness import SectionContext, Sizes, Timing, resolve_device, sync, time_batches
from mae_st.config import DataConfig

NUM_CLASSES = 400  # mixup's one-hot width; the packed labels are far below it
CPU_DECODABLE = ("vp8", "vp9", "jpeg")  # DALI's CPU decoders (video: VP8/VP9/MJPEG; jpeg: one image per frame)
FRAME_PAYLOADS = ("jpeg",)  # codecs whose samples hold one image per frame: a clip decodes only its own frames
PIPELINES_PER_GPU = (2, 4, 8)  # concurrent DALI pipelines tried in both modes; they share Sizes.num_threads
FRAME_LEVERS = {  # finetuning runs on frame-payload sets besides the concurrent pipelines
    "jpeg_decode_device=gpu": {"jpeg_decode_device": "gpu"},  # nvJPEG instead of the DALI threads
    "batch_size_per_gpu=8": {"batch_size_per_gpu": 8},
    "jpeg_decode_device=gpu,batch_size_per_gpu=8": {"jpeg_decode_device": "gpu", "batch_size_per_gpu": 8},
}


@dataclass(frozen=True)
class LoaderRun:
    """One measurement: a shard set, a mode and the DataConfig fields it sets."""

    shard_set: ShardSet
    mode: str  # pretrain | finetune
    lever: str  # what this run changes from the base ("base" for none)
    fields: Dict[str, object]


def base_fields(sizes: Sizes, mode: str) -> Dict[str, object]:
    common = dict(num_frames=sizes.num_frames, img_size=sizes.img_size, num_threads=sizes.num_threads,
                  prefetch_queue_depth=2, pipelines_per_gpu=1)
    if mode == "pretrain":
        return dict(common, repeat_aug=sizes.repeat_aug, batch_size_per_gpu=sizes.pipeline_batch,
                    sampling_rate=sizes.sampling_rate)
    return dict(common, repeat_aug=1, batch_size_per_gpu=sizes.finetune_batch,
                sampling_rate=sizes.finetune_sampling_rate, rand_aug=True, reprob=0.25, mixup=0.8, cutmix=1.0,
                jitter_scales_relative=(0.08, 1.0))


def plan_runs(sets: List[ShardSet], sizes: Sizes) -> List[LoaderRun]:
    """Most telling first (the section stops at its deadline): default set, frame-payload sets, the concurrent-
    pipeline runs of those, other sets, then the sweep. Frame payloads are measured finetuning only: with
    repeat_aug 16 a pretraining pipeline decodes 256 images a video through 256 decoders (10.8 clips/s and
    19.8 GB on an H200, 2026-11-28)."""
    def modes_of(shard_set: ShardSet):
        return ("finetune",) if shard_set.codec in FRAME_PAYLOADS else ("pretrain", "finetune")

    runs = [LoaderRun(s, mode, "base", base_fields(sizes, mode)) for s in sets for mode in modes_of(s)]
    runs.sort(key=lambda r: (not r.shard_set.default, r.shard_set.codec not in FRAME_PAYLOADS, r.mode != "pretrain"))
    lever_sets = [sets[0]] + [s for s in sets[1:] if s.codec in FRAME_PAYLOADS]
    first_other = next((i for i, r in enumerate(runs) if r.shard_set not in lever_sets), len(runs))
    runs[first_other:first_other] = [  # after the base runs of the default and frame-payload sets
        LoaderRun(s, mode, f"pipelines_per_gpu={k}", dict(base_fields(sizes, mode), pipelines_per_gpu=k))
        for s in lever_sets for mode in modes_of(s) for k in PIPELINES_PER_GPU] + [
        LoaderRun(s, "finetune", lever, dict(base_fields(sizes, "finetune"), **fields))
        for s in lever_sets if s.codec in FRAME_PAYLOADS for lever, fields in FRAME_LEVERS.items()]
    if sets[0].codec in FRAME_PAYLOADS:
        return runs
    base = base_fields(sizes, "pretrain")
    levers = ([("batch_size_per_gpu", b) for b in sizes.sweep_batches]
              + [("num_threads", t) for t in sizes.sweep_threads]
              + [("prefetch_queue_depth", p) for p in sizes.sweep_prefetch]
              + [("decode_device", "cpu")])
    for name, value in levers:
        runs.append(LoaderRun(sets[0], "pretrain", f"{name}={value}", dict(base, **{name: value})))
    return runs


def run_pipeline(ctx: SectionContext) -> None:
    device = resolve_device(ctx.device)
    sizes = ctx.sizes
    for run in plan_runs(shard_sets(ctx), sizes):
        label = {"set": run.shard_set.name, "codec": run.shard_set.codec, "mode": run.mode, "lever": run.lever}
        if device.type == "cpu" and run.shard_set.codec not in CPU_DECODABLE:
            ctx.emit(dict(label, skipped=f"DALI's CPU decoder cannot read {run.shard_set.codec}"))
        elif ctx.seconds_left() < sizes.loader_seconds + 5:
            ctx.emit(dict(label, skipped="section time budget used up"))
        else:
            ctx.measure(label, lambda: measure_dali(run, device, sizes, ctx.seconds_left() - 5))


def measure_dali(run: LoaderRun, device: torch.device, sizes: Sizes, seconds_left: float) -> dict:
    """Clips/s, frames/s, NVDEC/SM utilisation and added device memory of one loader configuration."""
    cfg = DataConfig(train_shards=run.shard_set.path,
                     **{"decode_device": "gpu" if device.type == "cuda" else "cpu", **run.fields})
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # what train.py asks for
    baseline = gpu_monitor.memory_used_mib()
    loader = None
    try:
        with gpu_monitor.GpuMonitor() as monitor:
            loader = build_loader(cfg, run.mode, device, dtype)
            timing = time_batches(lambda epoch: loader_epoch(loader, epoch), lambda batch: batch[0].shape[0],
                                  warmup=warmup_batches(cfg, sizes),
                                  steps=sizes.loader_steps,
                                  max_seconds=min(sizes.loader_seconds, seconds_left), sync=lambda: sync(device))
            end = time.time()
        usage = monitor.window(end - timing.seconds, end, baseline)
        bad = loader.stats.bad_samples
    finally:
        if loader is not None:
            loader.close()
        loader = None  # drops the last reference to the pipeline before its memory is released
        release_dali_memory()
    # a frame-payload clip decodes its own frames only; a video is decoded whole
    frame_payload = run.shard_set.codec in FRAME_PAYLOADS
    frames = cfg.repeat_aug * sizes.num_frames if frame_payload else mean_frames(run.shard_set.path)
    return {**rates(timing, cfg.repeat_aug, sizes.num_frames, frames), **usage,
            "bs": cfg.batch_size_per_gpu, "repeat": cfg.repeat_aug, "threads": cfg.num_threads,
            "pipelines": cfg.pipelines_per_gpu,
            "prefetch": cfg.prefetch_queue_depth, "steps": timing.steps, "epochs": timing.epochs, "bad": bad}


def warmup_batches(cfg: DataConfig, sizes: Sizes) -> int:
    """Untimed batches per epoch: at least what DALI prefetched while the first batch was built, rounded up to
    whole rounds of the concurrent pipelines (their batches come in bursts of one per pipeline)."""
    warmup = max(sizes.loader_warmup, cfg.prefetch_queue_depth + 1)
    return -(-warmup // cfg.pipelines_per_gpu) * cfg.pipelines_per_gpu


def build_loader(cfg: DataConfig, mode: str, device: torch.device, dtype: torch.dtype):
    from mae_st.data.loader import build_train_loader  # DALI loads only in the sections that use it

    return build_train_loader(cfg, mode, NUM_CLASSES, rank=0, world_size=1, device=device, dtype=dtype)


def loader_epoch(loader, epoch: int):
    """The loader, set to iterate `epoch` (the shape `time_batches` asks for)."""
    loader.set_epoch(epoch)
    return loader


def rates(timing: Timing, clips_per_video: int, num_frames: int, frames_per_video: Optional[float]) -> dict:
    """Clips/s and the frame rates they imply: frames in the clips, and frames decoded (whole videos)."""
    clips_per_s = timing.clips_per_s or 0.0
    videos_per_s = clips_per_s / clips_per_video
    return {"clips/s": clips_per_s, "videos/s": videos_per_s, "clip frames/s": clips_per_s * num_frames,
            "decoded frames/s": videos_per_s * frames_per_video if frames_per_video else None,
            "s/step": timing.seconds_per_step}


def release_dali_memory() -> None:
    """Frees what DALI's memory pools keep after a pipeline is gone, so the next row's baseline is clean."""
    gc.collect()
    try:
        from nvidia.dali.backend import ReleaseUnusedMemory
    except ImportError:
        return
    ReleaseUnusedMemory()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- classic baseline -------------------------------------------------------------------------------------------


def run_classic(ctx: SectionContext) -> None:
    device = resolve_device(ctx.device)
    sizes = ctx.sizes
    default = shard_sets(ctx)[0]
    best = 0.0
    for workers in sizes.classic_workers:
        if ctx.seconds_left() < 10:
            ctx.emit({"workers": workers, "skipped": "section time budget used up"})
            continue
        row = ctx.measure({"set": default.name, "codec": default.codec, "workers": workers},
                          lambda: measure_classic(default, workers, device, sizes, ctx.seconds_left() - 8))
        best = max(best, row.get("clips/s") or 0.0)
    ours = _ours_pretrain_clips_per_s(ctx, default)
    if ours and best:
        ctx.emit({"comparison": "ours/classic (pretrain, default set)", "ours clips/s": ours,
                  "classic clips/s": best, "ratio": ours / best, "target": 5.0})


def measure_classic(shard_set: ShardSet, workers: int, device: torch.device, sizes: Sizes,
                    seconds_left: float) -> dict:
    """Clips/s of the classic loader with `workers` processes, each batch copied to `device` in the clock."""
    batch = classic_batch_that_fits(sizes, workers)
    if batch == 0:
        return {"skipped": f"/dev/shm ({_shm_free_gb():.1f} GB free) cannot hold {workers} workers' batches"}
    loader = classic_loader(shard_set.tars(), batch_size=batch, num_workers=workers, num_frames=sizes.num_frames,
                            sampling_rate=sizes.sampling_rate, img_size=sizes.img_size,
                            repeat_aug=sizes.repeat_aug, endless=True)
    try:
        # the warm-up drains the batches every worker prefetched while starting, which would inflate the rate
        timing = time_batches(lambda epoch: loader, lambda b: b[0].shape[0], warmup=2 * max(workers, 1),
                              steps=sizes.classic_steps,
                              max_seconds=min(sizes.classic_seconds, seconds_left), sync=lambda: sync(device),
                              consume=lambda b: b[0].to(device, non_blocking=True))
    finally:
        loader = None  # stops the worker processes
        gc.collect()
    frames = mean_frames(shard_set.path)
    return {**rates(timing, sizes.repeat_aug, sizes.num_frames, frames), "bs": batch, "repeat": sizes.repeat_aug,
            "steps": timing.steps, "shm GB free": _shm_free_gb()}


def classic_batch_that_fits(sizes: Sizes, workers: int) -> int:
    """Videos per batch: the benchmark's, or 1 when /dev/shm cannot hold every worker's 2 prefetched float32
    batches (containers often mount a small one), or 0 when not even that fits."""
    per_video = sizes.repeat_aug * 3 * sizes.num_frames * sizes.img_size**2 * 4
    room = 0.8 * _shm_free_gb() * 1e9
    for batch in (sizes.pipeline_batch, 1):
        if max(workers, 1) * 2 * batch * per_video <= room:
            return batch
    return 0


def _shm_free_gb() -> float:
    try:
        return shutil.disk_usage("/dev/shm").free / 1e9
    except OSError:
        return 0.0


def _ours_pretrain_clips_per_s(ctx: SectionContext, shard_set: ShardSet) -> Optional[float]:
    rows = [r for r in ctx.prior_rows("pipeline") if r.get("set") == shard_set.name and r.get("mode") == "pretrain"
            and r.get("lever") == "base" and r.get("clips/s")]
    return rows[0]["clips/s"] if rows else None

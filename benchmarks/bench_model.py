"""Sections `matmul`, `model` and `e2e`: the GPU's dense bf16 rate, the MAE-ST/ViT training step inside the
DeepSpeed engine train.py builds, and that step fed by the real DALI pipeline instead of resident clips.

The engine is built by train.py's builder (mae_st.engine.build.build_engine: model, packing, optimizer, the
shipped DeepSpeed JSON completed from the flags, leaves, loss), so the step measured is the step trained. A step is
forward, backward, optimizer step and one `loss.item()`, as `Trainer` does. TFLOP/s counts matmul and attention
FLOPs (benchmarks/flops.py, 3x forward); MFU divides them by the measured matmul rate.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch

from benchmarks import gpu_monitor
from benchmarks.bench_data import ShardSet, shard_sets
from benchmarks.bench_pipeline import CPU_DECODABLE, NUM_CLASSES, build_loader, loader_epoch, release_dali_memory
from benchmarks.flops import train_flops_per_clip
from benchmarks.harness import SectionContext, Sizes, Timing, resolve_device, sync, time_batches
from mae_st.config import JobConfig


@dataclass(frozen=True)
class StepVariant:
    """One engine configuration to time."""

    mode: str  # pretrain | finetune
    zero_stage: int
    grad_checkpointing: bool = False
    compile_blocks: Optional[str] = None  # --compile_blocks; None: train.py's default (auto)


VARIANTS = {
    "pretrain-z3": StepVariant("pretrain", 3),
    "pretrain-z3-ckpt": StepVariant("pretrain", 3, grad_checkpointing=True),
    "pretrain-z0": StepVariant("pretrain", 0),
    "finetune-z3": StepVariant("finetune", 3),
    "finetune-z3-ckpt": StepVariant("finetune", 3, grad_checkpointing=True),
    "pretrain-z0-nocompile": StepVariant("pretrain", 0, compile_blocks="off"),
}
MIN_VARIANT_SECONDS = 20  # building a ViT-H engine alone takes ~10 s

# ---- matmul -----------------------------------------------------------------------------------------------------


def run_matmul(ctx: SectionContext) -> None:
    ctx.emit(measure_matmul(ctx.sizes.matmul_n, resolve_device(ctx.device)))


def measure_matmul(n: int, device: torch.device, seconds: float = 2.0) -> dict:
    """Dense n^3 matmul TFLOP/s (bf16 on the GPU, fp32 on the CPU): the MFU denominator."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    started = time.perf_counter()
    iterations = 0
    while time.perf_counter() - started < seconds or iterations < 5:
        for _ in range(10):
            a @ b
        iterations += 10
        sync(device)
    elapsed = time.perf_counter() - started
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "iterations": iterations,
            "TFLOP/s": 2 * n**3 * iterations / elapsed / 1e12}


# ---- model step -------------------------------------------------------------------------------------------------


def run_model(ctx: SectionContext) -> None:
    env = start_distributed()
    denominator = _matmul_tflops(ctx, env.device)
    for name in ctx.sizes.model_variants:
        if name not in VARIANTS:
            ctx.emit({"variant": name, "error": f"unknown variant; choose from {', '.join(VARIANTS)}"})
        elif ctx.seconds_left() < MIN_VARIANT_SECONDS:
            ctx.emit({"variant": name, "skipped": "section time budget used up"})
        else:
            ctx.measure({"variant": name}, lambda: measure_variant(ctx, VARIANTS[name], env, denominator))


def measure_variant(ctx: SectionContext, variant: StepVariant, env, matmul_tflops: Optional[float]) -> dict:
    """Times the variant at its clip count, halving the clips on out-of-memory (the row says what fit)."""
    sizes = ctx.sizes
    clips = sizes.pretrain_clips if variant.mode == "pretrain" else sizes.finetune_clips
    out_of_memory = []
    while clips >= 1:
        try:
            row = measure_step(job_config(variant, sizes, clips), variant, env, sizes, deadline=ctx.deadline - 5)
        except torch.OutOfMemoryError:
            row = None
        if row is not None:
            return {**row, "MFU": _ratio(row["TFLOP/s"], matmul_tflops),
                    "OOM at": ",".join(map(str, out_of_memory)) or None}
        free_device_memory()  # after the except block, so the traceback no longer holds the engine
        out_of_memory.append(clips)
        clips //= 2
    return {"error": f"out of memory even at 1 clip per step (tried {out_of_memory})"}


def job_config(variant: StepVariant, sizes: Sizes, clips: int) -> JobConfig:
    """train.py's config for the variant: pretraining cuts `clips` clips from one video, finetuning one each."""
    cfg = JobConfig()
    cfg.run.mode, cfg.run.zero_stage = variant.mode, variant.zero_stage
    cfg.model.grad_checkpointing = variant.grad_checkpointing
    cfg.data.num_frames, cfg.data.img_size = sizes.num_frames, sizes.img_size
    if variant.mode == "pretrain":
        cfg.model.name = sizes.mae_model
        cfg.data.batch_size_per_gpu, cfg.data.repeat_aug = 1, clips
        cfg.data.sampling_rate = sizes.sampling_rate
    else:
        cfg.model.name, cfg.model.drop_path_rate = sizes.vit_model, 0.2
        cfg.data.batch_size_per_gpu, cfg.data.repeat_aug = clips, 1
        cfg.data.sampling_rate = sizes.finetune_sampling_rate
    return cfg


def measure_step(cfg: JobConfig, variant: StepVariant, env, sizes: Sizes, deadline: float) -> dict:
    """clips/s, TFLOP/s and peak memory of the engine's step on clips resident on the device; the steps stop
    at `deadline` (time.time()) whatever the engine's build took."""
    from mae_st.engine.trainer import build_loss_fn

    free_device_memory()
    engine, flops_per_clip, dtype = build_engine(cfg, env, variant.compile_blocks)
    loss_fn = build_loss_fn(cfg.run.mode, cfg.data.smoothing)
    try:
        rates = measure_resident_data(cfg, env, dtype, lambda b: train_step(engine, loss_fn, b), sizes.model_warmup,
                                      sizes.model_steps, flops_per_clip, max(deadline - time.time(), 1.0))
        optimizer = type(engine.optimizer).__name__  # DeepSpeed's wrapper: tells which precision path ran
    finally:
        close_engine(engine)
    return {"mode": cfg.run.mode, "zero": variant.zero_stage, "ckpt": variant.grad_checkpointing,
            "compile": variant.compile_blocks, "optimizer": optimizer,
            "clips/step": cfg.data.batch_size_per_gpu * cfg.data.repeat_aug, **rates,
            "peak GB": peak_memory_gb(env.device), "dtype": str(dtype).replace("torch.", "")}


def build_engine(cfg: JobConfig, env, compile_blocks: Optional[str] = None) -> Tuple[object, float, torch.dtype]:
    """(DeepSpeed engine, training FLOPs per clip, input dtype), built by train.py's own builder."""
    from mae_st.engine.build import EngineOverrides, build_engine as build_train_engine
    from mae_st.models import build_model

    with torch.device("meta"):  # FLOPs from the plain model's sizes; nothing allocated
        flops_per_clip = train_flops_per_clip(build_model(cfg.model, cfg.data.img_size, cfg.data.num_frames))

    built = build_train_engine(cfg, env, EngineOverrides(compile_blocks=compile_blocks))
    return built.engine, flops_per_clip, built.dtype


def train_step(engine, loss_fn, batch) -> float:
    clips, targets = batch
    loss = loss_fn(engine, clips, targets)
    engine.backward(loss)
    engine.step()
    return loss.item()


def step_rates(timing: Timing, flops_per_clip: float) -> dict:
    clips_per_s = timing.clips_per_s or 0.0
    return {"clips/s": clips_per_s, "s/step": timing.seconds_per_step,
            "TFLOP/s": clips_per_s * flops_per_clip / 1e12, "TFLOP/clip": flops_per_clip / 1e12}


def endless(loader) -> Iterator:
    """The loader's epochs one after another, as one stream."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


# ---- end to end -------------------------------------------------------------------------------------------------


def run_e2e(ctx: SectionContext) -> None:
    """Pretraining on resident clips, then on the DALI pipeline, with one engine: DALI / resident clips/s."""
    from mae_st.engine.trainer import build_loss_fn

    sizes = ctx.sizes
    env = start_distributed()
    shard_set = readable_set(shard_sets(ctx), env.device)
    cfg = job_config(VARIANTS["pretrain-z3"], sizes, sizes.pretrain_clips)
    cfg.data.train_shards, cfg.data.num_threads = shard_set.path, sizes.num_threads
    cfg.data.decode_device = "gpu" if env.on_gpu else "cpu"
    engine, flops_per_clip, dtype = build_engine(cfg, env)
    loss_fn = build_loss_fn("pretrain", cfg.data.smoothing)

    def step(batch) -> None:
        train_step(engine, loss_fn, batch)

    try:
        resident = ctx.measure({"data": "resident clips"}, lambda: measure_resident_data(
            cfg, env, dtype, step, sizes.model_warmup, sizes.e2e_steps, flops_per_clip,
            max((ctx.seconds_left() - 10) / 2, 1.0)))
        real = ctx.measure({"data": f"DALI ({shard_set.name}, {shard_set.codec})"}, lambda: measure_real_data(
            cfg, env, dtype, step, sizes.model_warmup, sizes.e2e_steps, flops_per_clip,
            max(ctx.seconds_left() - 10, 1.0)))
    finally:
        close_engine(engine)
    ctx.emit({"data": "DALI / resident", "ratio": _ratio(real.get("clips/s"), resident.get("clips/s")),
              "target": 0.95})


def measure_resident_data(cfg: JobConfig, env, dtype: torch.dtype, step, warmup: int, steps: int,
                          flops_per_clip: float, seconds: float) -> dict:
    """The engine fed by `synthetic:N` clips already on the device (train.py's own synthetic source)."""
    from mae_st.data.synthetic import SyntheticLoader

    loader = SyntheticLoader(cfg.data, 2 * cfg.data.batch_size_per_gpu, NUM_CLASSES, rank=0, world_size=1,
                             device=env.device, seed=0, dtype=dtype)
    timing = time_batches(lambda epoch: endless(loader), lambda b: b[0].shape[0], warmup=warmup, steps=steps,
                          max_seconds=seconds, sync=lambda: sync(env.device), consume=step)
    return {**step_rates(timing, flops_per_clip), "steps": timing.steps}


def measure_real_data(cfg: JobConfig, env, dtype: torch.dtype, step, warmup: int, steps: int,
                      flops_per_clip: float, seconds: float) -> dict:
    """The engine fed by the DALI loader train.py would build for `cfg.data`, with NVDEC/SM utilisation."""
    baseline = gpu_monitor.memory_used_mib()
    loader = None
    try:
        with gpu_monitor.GpuMonitor() as monitor:
            loader = build_loader(cfg.data, "pretrain", env.device, dtype)
            timing = time_batches(lambda epoch: loader_epoch(loader, epoch), lambda b: b[0].shape[0],
                                  warmup=warmup, steps=steps, max_seconds=seconds,
                                  sync=lambda: sync(env.device), consume=step)
            end = time.time()
        usage = monitor.window(end - timing.seconds, end, baseline)
    finally:
        if loader is not None:
            loader.close()
        loader = None  # drops the last reference to the pipeline before its memory is released
        release_dali_memory()
    return {**step_rates(timing, flops_per_clip), "steps": timing.steps, "nvdec %": usage["nvdec %"],
            "sm %": usage["sm %"]}


def readable_set(sets, device: torch.device) -> ShardSet:
    """The default set, or on the CPU the first set DALI's CPU decoder can read."""
    if device.type == "cuda":
        return sets[0]
    for shard_set in sets:
        if shard_set.codec in CPU_DECODABLE:
            return shard_set
    raise RuntimeError(f"no shard set in {CPU_DECODABLE} for DALI's CPU decoder: {[s.codec for s in sets]}")


# ---- process and memory ----------------------------------------------------------------------------------------


def start_distributed():
    """A one-process DeepSpeed group (NCCL on the GPU, gloo on the CPU), as the launcher would set it up."""
    from mae_st.engine.distributed import init_distributed

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return init_distributed()


def close_engine(engine) -> None:
    """Tears the engine down; a failure here is reported but does not discard what was measured."""
    try:
        engine.destroy()
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        print("warning: engine.destroy() failed (above); later rows may see its memory still in use")


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gb(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _matmul_tflops(ctx: SectionContext, device: torch.device) -> float:
    """The matmul section's rate, or a quick measurement when that section did not run."""
    rows = [r for r in ctx.prior_rows("matmul") if r.get("TFLOP/s")]
    return rows[0]["TFLOP/s"] if rows else measure_matmul(ctx.sizes.matmul_n, device, seconds=1.0)["TFLOP/s"]


def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    return num / den if num is not None and den else None

"""The training step train.py runs against plain PyTorch, in one table per model and batch.

On the GPU machine (one H200, about 6 minutes; the table, then $OUT/profile_step.json):

    python3 benchmarks/profile_step.py --suite issue16 --out $OUT/profile_step.json

That suite is ViT-H/14 MAE-ST pretraining at 16 and 64 clips, ViT-H/14 finetuning at 8 clips and ViT-B/16 finetuning
at 16 clips, each with the variants eager, z3 (train.py's engine), z3-layergroups, z3-unaligned, z3-autocast,
z3-nopack, z0; rows past `--budget_s` are listed as skipped rather than cut off. A single configuration:

    python3 benchmarks/profile_step.py --mode finetune --clips 8 --variants eager,z3,z3-nopack
    DS_ACCELERATOR=cpu python benchmarks/profile_step.py --tiny --suite issue16 --steps 2   # CPU check, ~1 min

Every DeepSpeed variant is built by mae_st.engine.build.build_engine, the builder train.py uses, with an
EngineOverrides naming what differs (`--list` prints them), and its step is the Trainer's own micro-step (forward,
backward, step, the ranks' SIGTERM vote; `z3-presync` checks the loss on the host before backward, as train.py did
before). `eager` is PyTorch alone: the same model init, bf16 autocast over fp32 weights, fused AdamW, no DeepSpeed;
the reference for what the model costs, and `x eager` divides each row's clips/s by it, measured in the same run.
`--clip_grad X` clips every variant's gradients as the recipes do (eager with torch's clip_grad_norm_, engines with
DeepSpeed's gradient_clipping); without it nothing is clipped, as in every figure in docs/performance.md so far.
MFU divides the matmul FLOPs (benchmarks/flops.py) by a bf16 8192^3 matmul measured at start. After the timed steps
a short torch.profiler window names the step's top GEMM kernels and counts its host syncs (cudaStreamSynchronize /
cudaDeviceSynchronize) and the aten ops it calls (the host's work, countable on a CPU too); on a GPU it also gives
the kernel time per step and the largest kernels, which tell a GPU-bound step from a host-bound one.

Host-bound steps (the 16-clip pretraining step, ViT-B/16) need care: in one process a variant slows the ones after
it (eager measured after z3 took up to 1.4x its time on an H200, docs/performance.md). `--isolate` runs each
variant in its own process; `--leaf_lists_ab N` compares the ZeRO-3 leaves' kept parameter lists with DeepSpeed's
walk on one engine (alternating blocks, so the machine's drift cancels out); `--phase_steps N` times forward,
backward and optimizer step on the host alone and synced (a phase whose two times agree is host-bound);
`--python_profile_steps N` lists the Python functions a step spends its time in (cProfile, which inflates
Python-heavy code).

    python3 benchmarks/profile_step.py --isolate --profile_steps 0 --variants eager,z3 --leaf_lists_ab 10

The `loss` column is the last timed step's loss; every variant starts from the same weights and draws the same
masks, so on a CPU (fp32) correct variants agree to ~5 digits; bf16 on a GPU rounds differently.

Process-wide state one variant must not leak into the next: ZeRO-3's `memory_efficient_linear` (off in the shipped
JSONs; on in `z3-mel`) replaces torch.nn.functional.linear for the whole process and DeepSpeed never puts it back,
so it is restored after every variant; torch.compile caches are reset after compile variants.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.flops import train_flops_per_clip  # noqa: E402
from benchmarks.gemm_alignment import gemm_kernels, start_one_rank_world  # noqa: E402
from mae_st.config import JobConfig  # noqa: E402
from mae_st.engine.build import EngineOverrides, build_engine, build_train_model  # noqa: E402
from mae_st.engine.metrics import RunLogger  # noqa: E402
from mae_st.engine.optim import build_optimizer  # noqa: E402
from mae_st.engine.schedule import apply_lr  # noqa: E402
from mae_st.engine.trainer import StopSignal, Trainer, TrainState, build_loss_fn  # noqa: E402
from mae_st.models import build_model  # noqa: E402

TORCH_LINEAR = F.linear  # before DeepSpeed's ZeRO-3 swaps in its own (see the module docstring)
# every parameter kept gathered, so fetch/release find nothing to do (ViT-H in bf16 is 1.3 GB)
PERSIST_ALL = {"stage3_param_persistence_threshold": int(1e10), "stage3_max_live_parameters": int(1e10),
               "stage3_prefetch_bucket_size": int(5e8)}


@dataclass(frozen=True)
class Variant:
    doc: str
    engine: Optional[EngineOverrides] = None  # None: PyTorch alone
    packed: bool = False  # eager only: packed blocks (DeepSpeed variants follow their EngineOverrides)
    compile_blocks: bool = False  # eager only: torch.compile each block's forward (engines: EngineOverrides)
    deepcompile: bool = False  # DeepSpeed's DeepCompile: engine.compile() (its engine needs compile.deepcompile)
    check_loss_first: bool = False  # engines: the Trainer reads the loss's finiteness on the host before backward
    # a diagnostic, not a training setting: finetuning with one lr for every layer (2 param groups, not ~2 a block)
    layer_decay: Optional[float] = None


VARIANTS: Dict[str, Variant] = {
    "eager": Variant("PyTorch alone: bf16 autocast over fp32 weights, fused AdamW, plain blocks"),
    "eager-packed": Variant("eager with packed blocks", packed=True),
    "eager-compile": Variant("eager + torch.compile of every block's forward (what train.py's --compile_blocks on "
                             "does)", compile_blocks=True),
    "z3": Variant("train.py's engine: ZeRO-3 bf16, packed block stacks, block-stack leaves, aligned views, blocks "
                  "compiled on a GPU (--compile_blocks auto: on one GPU, stacks replaying CUDA graphs)",
                  EngineOverrides()),
    "z3-presync": Variant("z3 with the loss checked for NaN/inf on the host before backward, one more sync a step "
                          "(train.py before 2026-12-01 sixth)", EngineOverrides(), check_loss_first=True),
    "z3-stackcompile": Variant("z3 with each block stack's forward compiled as one graph, no CUDA graphs "
                               "(--compile_blocks stack, auto's choice for finetuning on several GPUs)",
                               EngineOverrides(compile_blocks="stack")),
    "z3-blockcompile": Variant("z3 with each block's forward compiled (--compile_blocks on, auto's choice for "
                               "pretraining on several GPUs)", EngineOverrides(compile_blocks="on")),
    "z3-nocompile": Variant("z3 with --compile_blocks off (what train.py ran before 2026-12-01 fifth)",
                            EngineOverrides(compile_blocks="off")),
    "z3-blockpack": Variant("z3 with two flat tensors a block instead of a block stack (before 2026-12-01 fifth)",
                            EngineOverrides(pack_stacks=False)),
    "z3-unaligned": Variant("z3 with the parameter order used before 2026-12 (single-GPU views 8-byte aligned "
                            "for the MAE)", EngineOverrides(align_views=False)),
    "z3-autocast": Variant("z3 with DeepSpeed's torch_autocast (fp32 weights, bf16 autocast) instead of bf16",
                           EngineOverrides(torch_autocast=True)),
    "z3-nopack": Variant("z3 without packed blocks (--no_fuse_block_params)", EngineOverrides(fuse_block_params=False)),
    "z3-nopack-unaligned": Variant("z3-nopack in the order used before 2026-12",
                                   EngineOverrides(fuse_block_params=False, align_views=False)),
    "z3-blockleaf": Variant("z3 with each transformer block a ZeRO-3 leaf instead of each stack",
                            EngineOverrides(leaves="block")),
    "z3-noleaf": Variant("z3 with DeepSpeed's per-layer gathers (no leaf modules)", EngineOverrides(leaves="none")),
    "z3-mel": Variant("z3 with memory_efficient_linear on (DeepSpeed's Python F.linear)",
                      EngineOverrides(memory_efficient_linear=True)),
    "z3-walkleaves": Variant("z3 with DeepSpeed walking each leaf's and the root's modules at every fetch, release "
                             "and step (as before 2026-12-01 fourth)", EngineOverrides(list_params_once=False)),
    "z3-dsnorm": Variant("z3 with DeepSpeed's own gradient-norm loop (fp64 copies, a host sync a group)",
                         EngineOverrides(device_grad_norm=False)),
    "z3-persist": Variant("z3 with every parameter kept gathered", EngineOverrides(zero=PERSIST_ALL)),
    "z3-nooverlap": Variant("z3 with overlap_comm off: ZeRO-3's gathers and reductions on the compute stream (one "
                            "GPU has nothing to overlap)", EngineOverrides(zero={"overlap_comm": False})),
    "z3-bigbucket": Variant("z3 with a 10x reduce bucket (5e8 elements): fewer gradient reductions a step",
                            EngineOverrides(zero={"reduce_bucket_size": int(5e8)})),
    "z3-deepcompile": Variant("ZeRO-3 + DeepSpeed DeepCompile (CUDA only; on Hopper set TORCH_CUDA_ARCH_LIST=9.0; "
                              "its first ViT-H step compiled for over 4 minutes on an H100)",
                              EngineOverrides(ds={"compile": {"deepcompile": True}}, compile_blocks="off"),
                              deepcompile=True),
    "z3-layergroups": Variant("z3 with finetuning's layer-wise lr decay as one optimizer group per layer (torch "
                              "AdamW; shipped before 2026-12-01 later) instead of scales inside LayerScaledAdamW",
                              EngineOverrides(layer_groups=True)),
    "z3-1group": Variant("diagnostic: z3 finetuning without layer-wise lr decay (2 param groups instead of ~2 a "
                         "block): what ZeRO-3's per-group work costs", EngineOverrides(), layer_decay=1.0),
    "z2": Variant("ZeRO-2 bf16, packed blocks", EngineOverrides(zero_stage=2)),
    "z0": Variant("ZeRO-0 bf16 (DeepSpeed's bf16 optimizer), packed blocks", EngineOverrides(zero_stage=0)),
    "z0-autocast": Variant("ZeRO-0 with torch_autocast", EngineOverrides(zero_stage=0, torch_autocast=True)),
}
ISSUE16_VARIANTS = "eager,z3,z3-layergroups,z3-unaligned,z3-autocast,z3-nopack,z0"
# (label, mode, model, clips) of the issue-16 suite, most telling first (a budget cut drops the last ones)
ISSUE16_SUITE = (("ViT-H/14 pretrain, 16 clips", "pretrain", "mae_vit_huge_patch14", 16),
                 ("ViT-H/14 finetune, 8 clips", "finetune", "vit_huge_patch14", 8),
                 ("ViT-B/16 finetune, 16 clips", "finetune", "vit_base_patch16", 16),
                 ("ViT-H/14 pretrain, 64 clips", "pretrain", "mae_vit_huge_patch14", 64))
TINY_MODELS = {"pretrain": "mae_vit_tiny_patch8", "finetune": "vit_tiny_patch8"}


# Configs and steps -----------------------------------------------------------------------------------------------

def job_config(mode: str, model: str, clips: int, tiny: bool, clip_grad: Optional[float] = None) -> JobConfig:
    """train.py's config for `clips` clips a step: pretraining cuts them from one video, finetuning one each."""
    cfg = JobConfig()
    cfg.run.mode, cfg.model.name = mode, model
    cfg.optim.clip_grad = clip_grad
    if mode == "pretrain":
        cfg.data.batch_size_per_gpu, cfg.data.repeat_aug = 1, clips
    else:
        cfg.model.drop_path_rate = 0.2
        cfg.data.batch_size_per_gpu, cfg.data.repeat_aug = clips, 1
    if tiny:  # 32 px, the tiny MAE's own small decoder: a CPU runs a step in well under a second
        cfg.data.img_size = 32
        cfg.model.decoder_embed_dim, cfg.model.decoder_depth, cfg.model.decoder_num_heads = 32, 1, 4
    return cfg


def flops_per_clip(cfg: JobConfig) -> float:
    with torch.device("meta"):  # the plain model's sizes; nothing allocated
        return train_flops_per_clip(build_model(cfg.model, cfg.data.img_size, cfg.data.num_frames))


def make_step(variant: Variant, cfg: JobConfig, env, lr: float):
    """(step(clips, targets) -> loss tensor or None, engine or None, input dtype) for one variant."""
    if variant.deepcompile and env.device.type != "cuda":
        raise RuntimeError("DeepCompile needs CUDA: DeepSpeed JIT-builds its 'dc' op against CUDA and NCCL")
    loss_fn = build_loss_fn(cfg.run.mode, cfg.data.smoothing)
    if variant.engine is None:
        model = build_train_model(cfg, env, EngineOverrides(fuse_block_params=variant.packed,
                                                            compile_blocks="on" if variant.compile_blocks else "off"))
        optimizer = build_optimizer(model, cfg.optim, cfg.run.mode == "finetune", env.device)
        apply_lr(optimizer, lr)

        def eager_step(clips, targets):
            with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=env.on_gpu):
                loss = loss_fn(model, clips, targets)
            loss.backward()
            if cfg.optim.clip_grad:  # as the original's loss scaler does before its step
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

        eager_step.phases = {"forward": model, "step": optimizer}  # backward is in the rest (loss.backward())
        return eager_step, None, torch.float32

    built = build_engine(cfg, env, variant.engine)
    apply_lr(built.engine.optimizer, lr)
    if variant.deepcompile:
        built.engine.compile()
    # the Trainer's own micro-step: what train.py runs per batch (its logger is a no-op off the main rank)
    trainer = Trainer(built.engine, cfg, env, built.loss_fn, RunLogger("", is_main=False, resumed=False), lr, 1,
                      StopSignal(), check_loss_first=variant.check_loss_first or None)
    state = TrainState()

    def engine_step(clips, targets):
        return trainer._micro_step(clips, targets, state)

    engine_step.phases = {"forward": built.engine, "backward": built.engine, "step": built.engine}
    return engine_step, built.engine, built.dtype


def tear_down(engine) -> None:
    """Removes the engine's hooks and frees its memory, and undoes what it changed for the whole process."""
    if engine is not None:
        try:
            engine.destroy()
        except Exception:  # noqa: BLE001 -- a failed teardown must not cost the remaining variants
            traceback.print_exc()
    F.linear = TORCH_LINEAR
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, clips, targets, device, warmup: int, steps: int) -> Tuple[float, float, float]:
    """(seconds per step, seconds of the first step, last loss); the first step includes any compilation."""
    torch.manual_seed(1)  # the same masks / drop paths for every variant
    started = time.perf_counter()
    step(clips, targets)
    sync(device)
    first = time.perf_counter() - started
    for _ in range(warmup - 1):
        step(clips, targets)
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        loss = step(clips, targets)
    sync(device)
    seconds = (time.perf_counter() - started) / steps
    return seconds, first, float("nan") if loss is None else float(loss)


def sync_sites(step, clips, targets, device, top: int = 6) -> List[str]:
    """Where one step synchronises with the GPU: torch's sync debug mode warns at every synchronising call, and
    each warning's Python stack is reduced to its innermost frames outside torch (count x site)."""
    if device.type != "cuda":
        return []
    sites: Dict[str, int] = {}

    def record(*_args, **_kwargs):
        frames = [f for f in traceback.extract_stack()[:-1]
                  if "/torch/" not in f.filename and "warnings" not in f.filename]
        site = " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-3:]))
        sites[site] = sites.get(site, 0) + 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        previous, warnings.showwarning = warnings.showwarning, record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(clips, targets)
            sync(device)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = previous
    return [f"{count} x {site}" for site, count in sorted(sites.items(), key=lambda kv: -kv[1])[:top]]


def profile_window(step, clips, targets, device, steps: int = 2) -> dict:
    """Top GEMM kernels and host syncs per step over a short torch.profiler window, and where the syncs are."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step(clips, targets)
        sync(device)
    averages = prof.key_averages()
    syncs = sum(e.count for e in averages if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize"))
    # the host's work in ops, on any device: every aten op called a step, those an op calls inside it included
    ops = sum(e.count for e in averages if e.key.startswith("aten::"))
    row = {"gemm kernels": gemm_kernels(prof, top=3) if device.type == "cuda" else [],
           "syncs/step": round(syncs / steps, 1), "sync sites": sync_sites(step, clips, targets, device),
           "aten ops/step": round(ops / steps)}
    if device.type == "cuda":  # is the step GPU-bound, and on what: kernel time a step, its largest kernels
        kernels = [e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA
                   and getattr(e, "self_device_time_total", 0) > 0]  # an op's own entry repeats its kernels' time
        row["kernel ms/step"] = round(sum(e.self_device_time_total for e in kernels) / 1e3 / steps, 1)
        kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
        row["top kernels (ms/step, calls/step)"] = [
            f"{e.key[:60]}: {e.self_device_time_total / 1e3 / steps:.1f}, {e.count / steps:.0f}" for e in kernels[:12]]
    return row


def leaf_lists_ab(step, clips, targets, device, blocks: int, steps: int = 5) -> dict:
    """The same built ZeRO-3 step with the parameter lists of the modules DeepSpeed walks whole kept
    (mae_st.engine.zero, train.py's setting) and walked by DeepSpeed at every fetch, in alternating blocks of
    `steps` steps: medians in s/step. One engine, one process, so the machine's drift between processes (+-25 % for
    host-bound steps) cancels out."""
    import statistics

    from mae_st.engine.zero import list_parameters_once

    times: Dict[bool, List[float]] = {True: [], False: []}
    try:
        for block in range(blocks):
            for kept in ((True, False) if block % 2 == 0 else (False, True)):
                list_parameters_once(kept)
                sync(device)
                started = time.perf_counter()
                for _ in range(steps):
                    step(clips, targets)
                sync(device)
                times[kept].append((time.perf_counter() - started) / steps)
    finally:
        list_parameters_once(True)
    kept, walked = statistics.median(times[True]), statistics.median(times[False])
    return {"leaf lists kept s/step": round(kept, 4), "walked s/step": round(walked, 4),
            "kept / walked": round(kept / walked, 3)}


def phase_times(step, clips, targets, device, steps: int) -> dict:
    """ms a step in each phase (forward, backward, optimizer step; `rest`: the remainder, eager's backward included),
    timed twice: `host`, each call until it returns with its GPU work left queued, and `synced`, the GPU drained
    before and after each call. A phase whose host time is about its synced time is host-bound: the GPU waits for
    the Python that launches it. The phases are the owners' own methods (step.phases), wrapped for the window."""
    row = {}
    for synced in (False, True):
        spent = {phase: 0.0 for phase in step.phases}

        def timed(phase, call):
            def wrapper(*args, **kwargs):
                if synced:
                    sync(device)
                started = time.perf_counter()
                try:
                    return call(*args, **kwargs)
                finally:
                    if synced:
                        sync(device)
                    spent[phase] += time.perf_counter() - started
            return wrapper

        for phase, owner in step.phases.items():
            setattr(owner, phase, timed(phase, getattr(owner, phase)))  # an instance attribute over the method
        try:
            sync(device)
            started = time.perf_counter()
            for _ in range(steps):
                step(clips, targets)
            sync(device)
            whole = time.perf_counter() - started
        finally:
            for phase, owner in step.phases.items():
                delattr(owner, phase)
        times = {phase: 1e3 * seconds / steps for phase, seconds in spent.items()}
        times["rest"] = 1e3 * whole / steps - sum(times.values())
        times["whole"] = 1e3 * whole / steps
        row[f"{'synced' if synced else 'host'} ms/step"] = {k: round(v, 1) for k, v in times.items()}
    return row


def python_hot_spots(step, clips, targets, device, steps: int, top: int = 25) -> List[str]:
    """Where a host-bound step's Python time goes: cProfile over `steps` steps, functions by own time (ms/step)."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step(clips, targets)
    sync(device)
    profiler.disable()
    stats = pstats.Stats(profiler)
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    return [f"{1e3 * own / steps:.1f} ms own, {1e3 * cumulative / steps:.1f} cum, {calls / steps:.0f} calls: "
            f"{Path(file).name}:{line} {name}" for (file, line, name), (_, calls, own, cumulative, _) in rows]


def matmul_tflops(device: torch.device, seconds: float = 1.0) -> float:
    """Dense matmul rate (bf16 8192^3 on a GPU, fp32 1024^3 on a CPU): the MFU denominator."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    started, iterations = time.perf_counter(), 0
    while time.perf_counter() - started < seconds or iterations < 5:
        a @ b
        iterations += 1
        if iterations % 10 == 0:
            sync(device)
    sync(device)
    return 2 * n**3 * iterations / (time.perf_counter() - started) / 1e12


def measure(name: str, cfg: JobConfig, env, args, peak: float, flops: float) -> dict:
    cuda = env.on_gpu
    clips_per_step = cfg.data.batch_size_per_gpu * cfg.data.repeat_aug
    engine = None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        started = time.perf_counter()
        if VARIANTS[name].layer_decay is not None:
            cfg.optim.layer_decay = VARIANTS[name].layer_decay
        step, engine, dtype = make_step(VARIANTS[name], cfg, env, args.lr)
        build = time.perf_counter() - started
        torch.manual_seed(2)
        clips = torch.randn(clips_per_step, 3, cfg.data.num_frames, cfg.data.img_size, cfg.data.img_size,
                            device=env.device, dtype=dtype)
        targets = torch.zeros(clips_per_step, dtype=torch.long, device=env.device)
        # DeepCompile recompiles at its 5th step (deepspeed/compile/init_z3.py WARMUP) to add its prefetch passes
        warmup = max(args.warmup, 7) if VARIANTS[name].deepcompile else args.warmup
        seconds, first, loss = time_steps(step, clips, targets, env.device, warmup, args.steps)
        tflops = clips_per_step * flops / seconds / 1e12
        row = {"variant": name, "s/step": round(seconds, 4), "clips/s": round(clips_per_step / seconds, 1),
               "TFLOP/s": round(tflops, 1 if cuda else 4), "MFU %": round(100 * tflops / peak, 1),
               "peak GB": round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None,
               "loss": round(loss, 5), "build s": round(build, 1), "first step s": round(first, 1)}
        if args.leaf_lists_ab and VARIANTS[name].engine is not None:
            row.update(leaf_lists_ab(step, clips, targets, env.device, args.leaf_lists_ab))
        if args.phase_steps:
            row.update(phase_times(step, clips, targets, env.device, args.phase_steps))
        if args.python_profile_steps:
            row["python hot spots"] = python_hot_spots(step, clips, targets, env.device, args.python_profile_steps)
        # last: after a torch.profiler window with CUDA activity the steps of the same process ran slower (on an
        # H200, z3 pretraining 0.115 s/step timed before it, 0.136-0.158 in an A/B after it)
        if args.profile_steps:
            row.update(profile_window(step, clips, targets, env.device, args.profile_steps))
        del step
    except Exception as err:  # noqa: BLE001 -- one variant's failure must not cost the others
        traceback.print_exc()
        row = {"variant": name, "error": f"{type(err).__name__}: {err}"[:300]}
    finally:
        tear_down(engine)
        engine = None
    return row


def measure_in_child(name: str, mode: str, model: str, clips: int, args, peak: float) -> dict:
    """`measure` in a fresh process: what one variant leaves behind slows the variants after it (on an H200,
    eager after z3 ran 0.114-0.120 s/step against 0.082-0.086 before it, with 26.6 against 17.0 GB peak memory),
    and host-bound steps feel it most."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        passed = {"--mode": mode, "--model": model, "--clips": clips, "--variants": name, "--steps": args.steps,
                  "--warmup": args.warmup, "--profile_steps": args.profile_steps, "--lr": args.lr,
                  "--python_profile_steps": args.python_profile_steps, "--phase_steps": args.phase_steps,
                  "--leaf_lists_ab": args.leaf_lists_ab, "--matmul_tflops": peak, "--out": out,
                  **({"--clip_grad": args.clip_grad} if args.clip_grad is not None else {})}
        command = [sys.executable, __file__] + [str(x) for kv in passed.items() for x in kv] + \
            (["--tiny"] if args.tiny else [])
        env = {k: v for k, v in os.environ.items() if k not in WORLD_ENV}  # the child starts its own world
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not os.path.exists(out):
            return {"variant": name, "error": f"child exited {done.returncode}: {done.stderr[-300:]}"}
        return json.loads(Path(out).read_text())["configs"][0]["rows"][0]


WORLD_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


COLUMNS = ("s/step", "clips/s", "x eager", "MFU %", "peak GB", "loss", "syncs/step", "aten ops/step")


def print_config_table(title: str, rows: List[dict]) -> None:
    print(f"\n{title}")
    print(f"{'variant':<21}" + "".join(f"{c:>14}" for c in COLUMNS) + "  top GEMM kernel")
    for row in rows:
        if "error" in row or "skipped" in row:
            print(f"{row['variant']:<21}  {row.get('error') or row.get('skipped')}")
            continue
        kernels = row.get("gemm kernels") or ["-"]
        print(f"{row['variant']:<21}" + "".join(f"{str(row.get(c, '-')):>14}" for c in COLUMNS) + f"  {kernels[0]}")
    for row in rows:
        for site in row.get("sync sites") or []:
            print(f"  sync  {row['variant']:<19} {site}")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["issue16"], help="run the issue-16 configurations (see above)")
    parser.add_argument("--variants", default="", help=f"comma-separated (default {ISSUE16_VARIANTS}); --list")
    parser.add_argument("--list", action="store_true", help="print the variants and what each tests, then exit")
    parser.add_argument("--mode", default="pretrain", choices=["pretrain", "finetune"])
    parser.add_argument("--model", default="", help="default: mae_vit_huge_patch14 / vit_huge_patch14 by mode")
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--tiny", action="store_true", help="tiny models at 32 px, at most 2 clips: a CPU check")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (at least 1)")
    parser.add_argument("--profile_steps", type=int, default=2, help="steps in the profiler window (0: none)")
    parser.add_argument("--python_profile_steps", type=int, default=0,
                        help="steps under cProfile after the timed ones: the Python functions a step spends on")
    parser.add_argument("--phase_steps", type=int, default=0,
                        help="steps timed by phase, on the host alone and synced (0: none); see phase_times")
    parser.add_argument("--leaf_lists_ab", type=int, default=0,
                        help="after the timed steps of a DeepSpeed variant, this many alternating blocks of 5 steps "
                             "with ZeRO-3 leaves' parameter lists kept and walked: medians of each")
    parser.add_argument("--lr", type=float, default=1e-4, help="a small lr, so `loss` shows wrong gradients")
    parser.add_argument("--clip_grad", type=float, default=None,
                        help="clip the gradient norm, every variant (the recipes: 0.1 pretraining, 5.0 finetuning); "
                             "default none, as every figure in docs/performance.md so far")
    parser.add_argument("--matmul_tflops", type=float, default=0.0, help="MFU denominator; 0 measures it")
    parser.add_argument("--budget_s", type=float, default=540.0, help="rows that would start later are skipped")
    parser.add_argument("--isolate", action="store_true",
                        help="each variant in its own process (a variant slows the ones after it in one process)")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "profile_step.json"))
    args = parser.parse_args(argv)
    if args.clip_grad is not None and args.clip_grad <= 0:  # torch would flip the gradients, DeepSpeed not clip
        parser.error(f"--clip_grad {args.clip_grad}: must be > 0 (leave it out to not clip)")
    if args.list:
        for name, variant in VARIANTS.items():
            print(f"{name:<21}{variant.doc}")
        return
    names = [n for n in (args.variants or ISSUE16_VARIANTS).split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; --list names them")
    args.warmup = max(args.warmup, 1)
    if args.suite:
        configs = list(ISSUE16_SUITE)
    else:
        default = {"pretrain": "mae_vit_huge_patch14", "finetune": "vit_huge_patch14"}[args.mode]
        configs = [(f"{args.mode}, {args.model or default}, {args.clips} clips", args.mode, args.model or default,
                    args.clips)]
    if args.tiny:
        configs = [(f"{label} (tiny: {TINY_MODELS[mode]}, {min(clips, 2)} clips)", mode, TINY_MODELS[mode],
                    min(clips, 2)) for label, mode, _, clips in configs]

    started = time.perf_counter()
    import deepspeed

    if args.isolate:
        env = None
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    else:
        env = start_one_rank_world()
        device = env.device
    peak = args.matmul_tflops or matmul_tflops(device)
    header = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "deepspeed": deepspeed.__version__,
              "matmul TFLOP/s": round(peak, 1 if device.type == "cuda" else 4), "isolated": args.isolate,
              "clip_grad": args.clip_grad}
    print(json.dumps(header), flush=True)
    report = {**header, "configs": []}
    for label, mode, model, clips in configs:
        cfg_rows: List[dict] = []
        flops = flops_per_clip(job_config(mode, model, clips, args.tiny))
        for name in names:
            if time.perf_counter() - started > args.budget_s:
                cfg_rows.append({"variant": name, "skipped": f"--budget_s {args.budget_s:.0f} used up"})
                continue
            if args.isolate:
                row = measure_in_child(name, mode, model, clips, args, peak)
            else:
                row = measure(name, job_config(mode, model, clips, args.tiny, args.clip_grad), env, args, peak, flops)
            cfg_rows.append(row)
            print(json.dumps({"config": label, **row}), flush=True)
        eager = next((r["clips/s"] for r in cfg_rows if r["variant"] == "eager" and "clips/s" in r), None)
        for row in cfg_rows:
            if eager and "clips/s" in row:
                row["x eager"] = round(row["clips/s"] / eager, 2)
        report["configs"].append({"config": label, "mode": mode, "model": model, "clips": clips, "rows": cfg_rows})
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))  # after every config: a later crash keeps these
    print(f"\nmatmul {peak:.4g} TFLOP/s; x eager: clips/s over eager's in the same run; syncs/step and aten ops/step "
          "(nested calls counted) in the profiler window")
    for config in report["configs"]:
        print_config_table(config["config"], config["rows"])
    print(f"\nwrote {args.out} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()

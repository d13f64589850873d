"""Does the alignment of a weight's address decide which GEMM kernel cuBLAS runs, and does ZeRO-3 hand our layers
misaligned weights? (issue 16: under ZeRO-3 ViT-H's GEMMs ran on `cutlass_80_tensorop_bf16_s16816gemm` kernels
instead of Hopper's `nvjet_sm90_*`.)

On the GPU machine (one H200, about 3 minutes; writes $OUT/gemm_alignment.json):

    python3 benchmarks/gemm_alignment.py --out $OUT/gemm_alignment.json

On a CPU (no GPU needed; the layout section and a real one-rank ZeRO-3 engine check, ~20 s):

    DS_ACCELERATOR=cpu python benchmarks/gemm_alignment.py --sections layout,engine

Sections:
- `layout` (CPU arithmetic, no DeepSpeed run): where each GEMM weight of ViT-H/14 (MAE and classifier) starts when
  ZeRO-3 hands it to F.linear, from DeepSpeed 0.19.8's layout (mae_st.engine.zero.gathered_weight_offsets): on one
  rank every parameter is a view into one flat buffer of all partitions in optimizer-group order; on several ranks
  each gathered parameter is a fresh tensor. Counts the weights below 16 / 128 / 256-byte alignment for the layout
  before packing, the packed layout shipped until 2026-12 and today's (padded views, aligned order).
- `engine`: a real ZeRO-3 engine built by mae_st.engine.build on this one rank, with today's layout and the one
  before; reads each gathered weight's address and checks it against `layout`'s arithmetic. On the GPU: ViT-H/14 MAE,
  plus the GEMM kernels two training steps run; on the CPU: the tiny MAE (a check that the arithmetic is DeepSpeed's).
- `gemm` (GPU): F.linear (addmm with a bias, mm without) at ViT-H shapes (M tokens x K -> N) in bf16, the weight
  (a) a fresh tensor, (b) a view into a flat buffer at 2 ... 256-byte alignment, (c) a transposed view and a view
  with a padded row stride, (d) inside autograd forward + backward (fresh, 8-byte, 256-byte aligned); per call the
  median of CUDA-event timings after warm-up and the kernel torch.profiler saw, under each BLAS library torch offers.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from mae_st.config import JobConfig, ModelConfig  # noqa: E402
from mae_st.engine.fused_params import fuse_block_parameters  # noqa: E402
from mae_st.engine.optim import build_param_groups, weight_decay_rule  # noqa: E402
from mae_st.engine.zero import (byte_alignment, gathered_weight_offsets, linear_weight_names,  # noqa: E402
                                order_for_aligned_views)
from mae_st.models import build_model  # noqa: E402

ALIGNMENTS = (2, 4, 8, 16, 32, 64, 128, 256)  # bytes
M_TOKENS = (2048, 8192)  # 16 clips x ~160 visible tokens is ~2.6k; 64 clips or a decoder pass is ~8k
KN = ((1280, 1280), (1280, 3840), (1280, 5120), (5120, 1280))  # q/k/v/proj, fused qkv, fc1, fc2 of ViT-H


# ---- layout ------------------------------------------------------------------------------------------------------

def layout_rows(world_sizes=(1, 8)) -> List[dict]:
    """Alignment census of ViT-H/14's GEMM weights under ZeRO-3 for three layouts, one row each."""
    rows = []
    for mode, name in (("pretrain", "mae_vit_huge_patch14"), ("finetune", "vit_huge_patch14")):
        with torch.device("meta"):  # shapes only: no memory, no init time
            plain = build_model(ModelConfig(name=name, num_classes=400), 224, 16)
        packed = build_model_packed(plain)
        for layout, model, align_views in (("unpacked (before 2026-11-30)", plain, False),
                                           ("packed, unpadded order (2026-11-30)", None, False),
                                           ("packed + aligned (now)", packed, True)):
            if model is None:
                model = build_model_packed(plain, align=1)
            # the groups ZeRO-3 flattens: per weight-decay setting (finetuning's layer decay is in the optimizer)
            groups = build_param_groups(model, 0.05)
            if align_views:
                order_for_aligned_views(groups)
            for world_size in world_sizes:
                offsets = gathered_weight_offsets(model, groups, world_size)
                names = linear_weight_names(model)
                align = {n: byte_alignment(offsets[n]) for n in names}
                rows.append({"model": name, "layout": layout, "ranks": world_size, "GEMM weights": len(names),
                             "< 16 B": sum(a < 16 for a in align.values()),
                             "< 128 B": sum(a < 128 for a in align.values()),
                             "< 256 B": sum(a < 256 for a in align.values()),
                             "alignments": dict(sorted(_count(align.values()).items())),
                             "examples": [f"{n} @ {offsets[n] * 2} B" for n in names if align[n] < 256][:3]})
    return rows


def build_model_packed(plain, align: Optional[int] = None):
    """A packed copy of `plain` (meta tensors); align=1 gives the unpadded packing shipped until 2026-12."""
    import copy

    from mae_st.models.layers import Block, PackedBlock

    model = copy.deepcopy(plain)
    if align is None:
        fuse_block_parameters(model, weight_decay_rule(model))
        return model
    decays = weight_decay_rule(model)
    for name, block in [(n, m) for n, m in model.named_modules() if isinstance(m, Block)]:
        parent, _, child = name.rpartition(".")
        decayed = {k for k, p in block.named_parameters() if decays(f"{name}.{k}", p)}
        setattr(model.get_submodule(parent), child, PackedBlock(block, decayed, align))
    return model


def _count(values) -> Dict[int, int]:
    counts: Dict[int, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return counts


# ---- engine ------------------------------------------------------------------------------------------------------

def one_rank_world_env() -> Dict[str, str]:
    """The launcher variables of a one-rank world on a free local port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}


def start_one_rank_world():
    """This process as a one-rank DeepSpeed world (NCCL on the GPU, gloo on the CPU); variables already set win."""
    from mae_st.engine.distributed import init_distributed

    for key, value in one_rank_world_env().items():
        os.environ.setdefault(key, value)
    return init_distributed()


def engine_rows(env, profile_steps: int = 2) -> List[dict]:
    """Real ZeRO-3 engines (today's layout, the previous order): gathered weights' actual alignment, checked
    against the arithmetic, and on the GPU the GEMM kernels of a few training steps."""
    import deepspeed

    from mae_st.engine.build import EngineOverrides, build_engine

    cuda = env.device.type == "cuda"
    cfg = JobConfig()
    cfg.model.name = "mae_vit_huge_patch14" if cuda else "mae_vit_tiny_patch8"
    cfg.data.repeat_aug, cfg.data.batch_size_per_gpu = 16 if cuda else 2, 1
    if not cuda:
        cfg.data.img_size, cfg.data.num_frames, cfg.model.pred_t_dim = 32, 4, 4
        cfg.model.decoder_embed_dim, cfg.model.decoder_depth, cfg.model.decoder_num_heads = 32, 1, 4
    cfg.run.zero_stage = 3
    rows = []
    for label, overrides in (("packed + aligned (now)", EngineOverrides()),
                             ("packed, previous order", EngineOverrides(align_views=False))):
        built = build_engine(cfg, env, overrides)
        model, engine = built.model, built.engine
        groups = engine.optimizer.trainable_param_groups  # what DeepSpeed flattened, in its order
        predicted = gathered_weight_offsets(model, groups, world_size=1)
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            actual = actual_weight_offsets(model, engine.optimizer.lp_param_buffer)
        names = linear_weight_names(model)
        element = built.dtype if cuda else torch.float32
        alignment = {n: byte_alignment(actual[n], element) for n in names}
        row = {"engine": label, "model": cfg.model.name, "GEMM weights": len(names),
               "arithmetic matches DeepSpeed": all(predicted[n] == actual[n] for n in predicted),
               "< 16 B": sum(a < 16 for a in alignment.values()), "< 256 B": sum(a < 256 for a in alignment.values())}
        if cuda:
            row["kernels"] = step_kernels(built, cfg, profile_steps)
        rows.append(row)
        engine.destroy()
        del built, model, engine
        torch.cuda.empty_cache() if cuda else None
    return rows


def actual_weight_offsets(model, buffer: torch.Tensor) -> Dict[str, int]:
    """Element offsets from `buffer`'s start of every parameter as the model sees it now (Block names for packed
    blocks and stacks, read off the views their forward uses)."""
    from mae_st.models.layers import BlockStack, PackedBlock

    size, base = buffer.element_size(), buffer.data_ptr()
    offsets = {name: (p.data_ptr() - base) // size for name, p in model.named_parameters()}
    handed = {}  # the flat tensors a packed stack hands each of its blocks
    for stack in (m for m in model.modules() if isinstance(m, BlockStack)):
        handed.update({id(block): flats for block, flats in zip(stack, stack.block_views())})
    for name, module in model.named_modules():
        if isinstance(module, PackedBlock):
            for key, view in module.weights(handed.get(id(module))).items():
                offsets[f"{name}.{key}"] = (view.data_ptr() - base) // size
    return offsets


def step_kernels(built, cfg: JobConfig, steps: int) -> List[str]:
    """The GEMM kernels (by CUDA time) of `steps` training steps of the engine."""
    from torch.profiler import ProfilerActivity, profile

    clips = torch.randn(cfg.data.repeat_aug, 3, cfg.data.num_frames, cfg.data.img_size, cfg.data.img_size,
                        device="cuda", dtype=built.dtype)
    targets = torch.zeros(clips.shape[0], dtype=torch.long, device="cuda")

    def step():
        loss = built.loss_fn(built.engine, clips, targets)
        built.engine.backward(loss)
        built.engine.step()

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    return gemm_kernels(prof, top=4)


def gemm_kernels(prof, top: int = 3) -> List[str]:
    """`top` GEMM kernel names by total CUDA time, with their share of all GEMM time."""
    events = [e for e in prof.key_averages() if _is_gemm(e.key) and _device_time(e) > 0]
    total = sum(_device_time(e) for e in events) or 1.0
    events.sort(key=_device_time, reverse=True)
    return [f"{e.key[:70]} ({100 * _device_time(e) / total:.0f} %, {e.count} calls)" for e in events[:top]]


def _is_gemm(name: str) -> bool:
    return any(tag in name.lower() for tag in ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas"))


def _device_time(event) -> float:
    return getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)


# ---- gemm --------------------------------------------------------------------------------------------------------

def weight_at(n: int, k: int, byte_align: int) -> torch.Tensor:
    """An (n, k) bf16 weight whose address is `byte_align`-aligned and no more (a view into a flat buffer)."""
    offset = byte_align // 2 if byte_align < 512 else 0
    if offset and (offset & (offset - 1)):
        raise ValueError(byte_align)
    flat = torch.empty(n * k + 256, device="cuda", dtype=torch.bfloat16)  # allocations are 512-byte aligned
    view = flat.narrow(0, offset, n * k).view(n, k)
    view.normal_(std=0.02)
    return view


def time_call(fn: Callable[[], object], warmup: int = 5, reps: int = 30) -> float:
    """Median microseconds per call over `reps` CUDA-event timed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0)
    return statistics.median(times)


def kernels_of(fn: Callable[[], object]) -> str:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    names = gemm_kernels(prof, top=2)
    return " | ".join(name.split(" (")[0] for name in names) or "-"


def gemm_rows(blas: str) -> List[dict]:
    rows = []
    for m in M_TOKENS:
        for k, n in KN:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
            cases: Dict[str, tuple] = {"fresh": (weight_at(n, k, 512), bias)}
            for align in ALIGNMENTS:
                cases[f"view @ {align} B"] = (weight_at(n, k, align), bias)
            cases["transposed view"] = (weight_at(k, n, 512).t(), bias)  # strides (1, n)
            padded = torch.randn(n, k + 8, device="cuda", dtype=torch.bfloat16)
            cases["row stride k+8"] = (padded[:, :k], bias)
            cases["bias view @ 8 B"] = (weight_at(n, k, 512), torch.randn(n + 8, device="cuda",
                                                                          dtype=torch.bfloat16)[4:4 + n])
            flops = 2 * m * n * k
            for case, (w, b) in cases.items():
                for op, with_bias in (("addmm", True), ("mm", False)):
                    if case.startswith("bias") and not with_bias:
                        continue
                    call = (lambda w=w, b=b: F.linear(x, w, b)) if with_bias else (lambda w=w: F.linear(x, w))
                    us = time_call(call)
                    rows.append({"blas": blas, "M": m, "K": k, "N": n, "op": op, "weight": case, "us": round(us, 1),
                                 "TFLOP/s": round(flops / us / 1e6, 1), "kernel": kernels_of(call)})
            for case, align in (("autograd fresh", 512), ("autograd @ 8 B", 8), ("autograd @ 256 B", 256)):
                w = weight_at(n, k, align).requires_grad_(True)
                xg = x.clone().requires_grad_(True)
                grad = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)

                def fwd_bwd(w=w, xg=xg, grad=grad):
                    F.linear(xg, w, bias).backward(grad)
                    w.grad = xg.grad = None

                us = time_call(fwd_bwd)
                rows.append({"blas": blas, "M": m, "K": k, "N": n, "op": "fwd+bwd", "weight": case, "us": round(us, 1),
                             "TFLOP/s": round(3 * flops / us / 1e6, 1), "kernel": kernels_of(fwd_bwd)})
    return rows


# ---- main --------------------------------------------------------------------------------------------------------

def print_table(title: str, rows: List[dict], columns: List[str]) -> None:
    print(f"\n{title}")
    widths = [max(len(c), *(len(str(r.get(c, "-"))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(str(row.get(c, "-")).ljust(w) for c, w in zip(columns, widths)))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--sections", default="layout,engine,gemm" if cuda else "layout,engine",
                        help="comma-separated: layout, engine, gemm (GPU only)")
    parser.add_argument("--blas", default="cublas,cublaslt", help="torch.backends.cuda.preferred_blas_library values")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gemm_alignment.json"))
    args = parser.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    started = time.perf_counter()
    report: Dict[str, object] = {"torch": torch.__version__,
                                 "device": torch.cuda.get_device_name() if cuda else "cpu"}
    print(json.dumps(report))
    ok = True
    if "layout" in sections:
        rows = layout_rows()
        report["layout"] = rows
        print_table("ZeRO-3: GEMM weights of ViT-H/14 by the alignment of the address F.linear gets (bf16)", rows,
                    ["model", "layout", "ranks", "GEMM weights", "< 16 B", "< 128 B", "< 256 B", "examples"])
    if "engine" in sections:
        env = start_one_rank_world()
        rows = engine_rows(env)
        report["engine"] = rows
        print_table("Real one-rank ZeRO-3 engines (mae_st.engine.build): gathered weights' addresses", rows,
                    ["engine", "model", "GEMM weights", "arithmetic matches DeepSpeed", "< 16 B", "< 256 B",
                     "kernels"])
        ok = all(row["arithmetic matches DeepSpeed"] for row in rows) and rows[0]["< 256 B"] == 0
    if "gemm" in sections:
        if not cuda:
            print("gemm: needs a GPU, skipped")
        else:
            rows = []
            for blas in args.blas.split(","):
                try:
                    torch.backends.cuda.preferred_blas_library(blas)
                except Exception as err:  # noqa: BLE001 -- a library this build lacks is a row, not a crash
                    rows.append({"blas": blas, "weight": f"unavailable: {err}"})
                    continue
                rows += gemm_rows(blas)
            torch.backends.cuda.preferred_blas_library("cublas")
            report["gemm"] = rows
            print_table("bf16 F.linear at ViT-H shapes: median us per call and the kernel cuBLAS picked", rows,
                        ["blas", "M", "K", "N", "op", "weight", "us", "TFLOP/s", "kernel"])
    report["seconds"] = round(time.perf_counter() - started, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.out} ({report['seconds']} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

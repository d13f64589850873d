"""Where does a ViT-H/14 MAE-ST training step's time go? Plain PyTorch against DeepSpeed engines, one table.

    python benchmarks/profile_step.py --variants eager,z0,z2,z3,z3-persist --profile z3
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python benchmarks/profile_step.py --tiny --clips 2   # a CPU check, ~1 min

Variants (`--list` prints them): `eager` is PyTorch alone (bf16 autocast, fp32 weights, fused AdamW), the reference
for what the model itself costs; `eager-compile` adds torch.compile of every transformer block's forward (the
ceiling). The others are train.py's engine (`build_model`, `build_optimizer`, the shipped ZeRO JSON) at a ZeRO
stage with some of the shipped settings overridden; see VARIANTS. Each variant builds its own engine, times
`--warmup` + `--steps` steps (forward, backward, step, as `Trainer` does) and is torn down before the next; one
variant's failure is a row with its error. `--profile A,B` prints the top operators of those variants.

The table's `loss` is the last timed step's loss. Every variant starts from the same weights and draws the same
masks (seeded), and the steps use a nonzero lr (`--lr`), so in pretraining the column checks the gradients: on a
CPU (fp32, `--tiny --lr 1e-2`) every correct variant prints the same loss to 5 digits; on a GPU bf16 and compiled
kernels round differently, so read only large departures there. Finetuning's drop path and dropout draw
differently inside compiled graphs, so compile variants differ there (from eager; not from each other).

Not a variant: `stage3_module_granularity_threshold` (DeepSpeed choosing leaf modules by parameters per
submodule). It marks parents first, and both models' root module is finer-grained than a Block (ViT-H MAE-ST:
root 1.60M parameters per submodule, Block 1.79M; classifier 1.77M vs 1.79M), so any threshold that makes the
Blocks leaves makes the whole model one leaf instead; the root's input (the clips) needs no gradient, so its
leaf gradient hook fires when backward starts, before any gradient exists, and the step fails (checked on the
tiny model: "output with shape [1] doesn't match the broadcast shape").

Process-wide state that one variant must not leak into the next: ZeRO-3's `memory_efficient_linear` (on unless
a variant turns it off) replaces `torch.nn.functional.linear` for the whole process and DeepSpeed never puts it
back, so the script restores it after every variant; torch.compile caches are reset after compile variants.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.flops import train_flops_per_clip  # noqa: E402
from mae_st.config import JobConfig  # noqa: E402
from mae_st.engine.ds_config import default_ds_config_path, fill_ds_config, load_ds_config  # noqa: E402
from mae_st.engine.fused_params import fuse_block_parameters  # noqa: E402
from mae_st.engine.optim import build_optimizer, weight_decay_rule  # noqa: E402
from mae_st.engine.schedule import apply_lr  # noqa: E402
from mae_st.models import build_model, list_models, register_model  # noqa: E402
from mae_st.models.layers import Block, BlockStack  # noqa: E402

TORCH_LINEAR = F.linear  # before DeepSpeed's ZeRO-3 Init swaps in its own (see the module docstring)

# ZeRO JSON overrides ------------------------------------------------------------------------------------------------
PERSIST_ALL = {"stage3_param_persistence_threshold": int(1e10), "stage3_max_live_parameters": int(1e10),
               "stage3_prefetch_bucket_size": int(5e8)}
NO_OVERLAP = {"overlap_comm": False}
# nn.Linear through torch's own F.linear (cuBLAS with the bias fused) instead of DeepSpeed's Python autograd
# Function LinearFunctionForZeroStage3 (matmul, then a separate bias add; re-gathers the weight in backward)
NATIVE_LINEAR = {"memory_efficient_linear": False}
# Every parameter stays gathered (ViT-H in bf16 is 1.3 GB; the fp32 master weights and Adam moments, 12 bytes a
# parameter, stay partitioned), so fetch/release find nothing to do; one gradient bucket holds the whole model
# ("model" is replaced by its parameter count), reduced once at the end of backward; and reduce_scatter off
# all-reduces that contiguous bucket in place instead of concatenating the gradients a second time first.
FAST = {**NATIVE_LINEAR, **PERSIST_ALL, "reduce_bucket_size": "model", "reduce_scatter": False}


@dataclass(frozen=True)
class Variant:
    doc: str
    stage: Optional[int] = None  # None: PyTorch alone, no DeepSpeed
    zero: Dict[str, Any] = field(default_factory=dict)  # overrides of the shipped JSON's zero_optimization
    leaf: str = ""  # "" | "block": each transformer Block one ZeRO-3 leaf | "stack": each whole block stack
    #                 (encoder, decoder) one leaf (train.py's default)
    compile_blocks: bool = False  # torch.compile each Block's forward (DeepSpeed's hooks stay outside, eager)
    deepcompile: bool = False  # DeepSpeed's DeepCompile: engine.compile() with the "z3" pass (hooks removed)
    engine_compile: bool = False  # engine.compile() without DeepCompile: torch.compile of the whole module
    # DeepSpeed's "torch_autocast" instead of "bf16": fp32 weights, autocast in the engine's forward, no bf16
    # master-weight optimizer wrapper (gathers still move bf16: Linear weights get comm_dtype bfloat16)
    autocast: bool = False
    fused: bool = False  # each Block's parameters packed into two flat tensors (mae_st.engine.fused_params)


VARIANTS: Dict[str, Variant] = {
    "eager": Variant("PyTorch alone: bf16 autocast, fp32 weights, fused AdamW"),
    "eager-compile": Variant("PyTorch alone + torch.compile of every Block's forward: the ceiling",
                             compile_blocks=True),
    "z0": Variant("DeepSpeed ZeRO-0 (bf16)", 0),
    "z2": Variant("ZeRO-2 (bf16)", 2),
    "z2-nooverlap": Variant("ZeRO-2 without overlap_comm", 2, NO_OVERLAP),
    "z3": Variant("ZeRO-3, shipped JSON, per-module gathers", 3),
    "z3-persist": Variant("ZeRO-3, per-module gathers, every parameter kept gathered", 3, PERSIST_ALL),
    "z3-leaf": Variant("ZeRO-3, each Block a leaf (train.py until 2026-11-28)", 3, leaf="block"),
    "z3-leaf-nooverlap": Variant("z3-leaf without overlap_comm", 3, NO_OVERLAP, leaf="block"),
    "z3-leaf-nomel": Variant("z3-leaf + memory_efficient_linear off (torch's own F.linear)", 3, NATIVE_LINEAR,
                             leaf="block"),
    "z3-leaf-fast": Variant("z3-leaf-nomel + all parameters persistent + one model-sized gradient bucket, "
                            "all-reduced in place (reduce_scatter off)", 3, FAST, leaf="block"),
    "z3-stack-fast": Variant("z3-leaf-fast with the encoder's and the decoder's whole block stacks as the "
                             "two leaves (2 gathers/hook sets a step instead of 36)", 3, FAST, leaf="stack"),
    "z3-fast-compile": Variant("z3-leaf-fast + torch.compile of every Block's forward inside the leaf hooks",
                               3, FAST, leaf="block", compile_blocks=True),
    "z3-fast-engcompile": Variant("z3-leaf-fast + engine.compile() (DeepSpeed's torch.compile of the whole "
                                  "module; its ZeRO-3 hooks are compiler-disabled, so graphs break around them)",
                                  3, FAST, leaf="block", engine_compile=True),
    "z0-autocast": Variant("DeepSpeed ZeRO-0 with torch_autocast (fp32 weights, bf16 autocast) instead of bf16: "
                           "the eager recipe inside the engine", 0, autocast=True),
    "z3-leaf-nomel-autocast": Variant("z3-leaf-nomel with torch_autocast instead of bf16", 3, NATIVE_LINEAR,
                                      leaf="block", autocast=True),
    "eager-fused": Variant("eager with each Block's 16 parameter tensors packed into 2 flat ones", fused=True),
    "z0-fused": Variant("z0 with each Block's parameters packed into 2 flat tensors", 0, fused=True),
    "z3-leaf-nomel-fused": Variant("z3-leaf-nomel with each Block's parameters packed into 2 flat tensors", 3,
                                   NATIVE_LINEAR, leaf="block", fused=True),
    "z3-stack-nomel": Variant("z3-leaf-nomel with the encoder's and the decoder's whole block stacks as the two "
                              "leaves", 3, NATIVE_LINEAR, leaf="stack"),
    "z3-stack-nomel-fused": Variant("z3-stack-nomel with each Block's parameters packed into 2 flat tensors: "
                                    "what train.py runs", 3, NATIVE_LINEAR, leaf="stack", fused=True),
    "z3-deepcompile": Variant("ZeRO-3 shipped JSON + DeepSpeed DeepCompile (compile.deepcompile, "
                              "engine.compile(): gathers/reduces in the compiled graph, no hooks; CUDA only; "
                              "on Hopper set TORCH_CUDA_ARCH_LIST=9.0, its op build fails on '9.0a'; its first "
                              "ViT-H step took over 4 minutes to compile on an H100)",
                              3, deepcompile=True),
}
DEFAULT_VARIANTS = "eager,eager-fused,z0,z0-fused,z3-leaf-nomel,z3-leaf-nomel-fused,z3-stack-nomel-fused"


# Drop path that compiles once -----------------------------------------------------------------------------------
# timm's DropPath keeps its rate as a Python float, which torch.compile specialises on: the finetuning model's
# 32 blocks (rates 0 .. 0.2) would each recompile, past dynamo's recompile limit (8), after which the remaining
# blocks silently run eager. The compile variants swap in this equivalent one (a per-sample keep mask scaled by
# 1/keep, as timm's scale_by_keep) with the rate in a buffer, so every block shares one graph. Pretraining's
# blocks have no drop path (rate 0 is nn.Identity) and are left alone.

class BufferedDropPath(nn.Module):
    def __init__(self, drop_prob: float, device: torch.device):
        super().__init__()
        self.register_buffer("keep_prob", torch.tensor(1.0 - drop_prob, device=device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = self.keep_prob.float()
        mask = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device) < keep
        return x * (mask.to(x.dtype) / keep.to(x.dtype))


def compile_blocks(model: nn.Module, device: torch.device) -> None:
    """torch.compile each Block's forward alone: DeepSpeed's module hooks, outside it, stay eager."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if any(not isinstance(block.drop_path, nn.Identity) for block in blocks):
        for block in blocks:
            block.drop_path = BufferedDropPath(getattr(block.drop_path, "drop_prob", 0.0), device)
    for block in blocks:
        block.forward = torch.compile(block.forward)


# Engines ---------------------------------------------------------------------------------------------------------

def job_config(mode: str, model: str, clips: int, grad_checkpointing: bool, tiny: bool) -> JobConfig:
    cfg = JobConfig()
    cfg.run.mode = mode
    cfg.model.grad_checkpointing = grad_checkpointing
    if mode == "pretrain":
        cfg.model.name, cfg.data.repeat_aug, cfg.data.batch_size_per_gpu = model, clips, 1
    else:
        cfg.model.name, cfg.model.drop_path_rate = model, 0.2
        cfg.data.batch_size_per_gpu, cfg.data.repeat_aug = clips, 1
    if tiny:  # mae_vit_tiny_patch8's own small decoder, 32 px: a CPU runs a step in well under a second
        cfg.data.img_size = 32
        cfg.model.decoder_embed_dim, cfg.model.decoder_depth, cfg.model.decoder_num_heads = 32, 1, 4
    return cfg


def tiny_model_of_depth(mode: str, depth: int) -> str:
    """Registers (once) and names the tiny model (64 wide, patch 8) with `depth` encoder blocks and, for the MAE,
    4 decoder blocks: ViT-H's 32 + 4 blocks, so a CPU run meets as many ZeRO-3 hooks per step as the GPU does."""
    from mae_st.models.mae import _mae
    from mae_st.models.vit import _vit

    family = "mae" if mode == "pretrain" else "classifier"
    name = f"{'mae_vit' if family == 'mae' else 'vit'}_tiny_patch8_depth{depth}"
    if name not in list_models():
        def factory(**kwargs):
            if family == "mae":
                return _mae(8, 64, depth, 4, **{**kwargs, "decoder_depth": 4})
            return _vit(8, 64, depth, 4, **kwargs)

        factory.__name__ = name
        register_model(family)(factory)
    return name


def make_step(name: str, cfg: JobConfig, device: torch.device, lr: float):
    """(step function taking clips, module, engine or None) for one variant."""
    variant = VARIANTS[name]
    if variant.deepcompile and device.type != "cuda":
        raise RuntimeError("DeepCompile needs CUDA: DeepSpeed JIT-builds its 'dc' op against CUDA and NCCL")
    torch.manual_seed(0)  # the same initial weights for every variant
    with torch.device(device):
        model = build_model(cfg.model, cfg.data.img_size, cfg.data.num_frames)
    finetune = cfg.run.mode == "finetune"
    labels = torch.zeros(cfg.data.batch_size_per_gpu * cfg.data.repeat_aug, dtype=torch.long, device=device)

    def loss_of(module, clips):
        out = module(clips)
        return F.cross_entropy(out.float(), labels) if finetune else out[0]

    if variant.compile_blocks:
        compile_blocks(model, device)
    if variant.fused:
        fuse_block_parameters(model, weight_decay_rule(model, cfg.optim.bias_wd))

    if variant.stage is None:
        optimizer = build_optimizer(model, cfg.optim, finetune, device)
        apply_lr(optimizer, lr)

        def eager_step(clips):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = loss_of(model, clips)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        return eager_step, model, None

    import deepspeed
    from deepspeed.utils import set_z3_leaf_modules

    cfg.run.zero_stage = variant.stage
    ds = fill_ds_config(load_ds_config(default_ds_config_path(cfg.run.mode)), cfg, 1,
                        bf16_supported=device.type == "cuda")
    zero = dict(variant.zero)
    if zero.get("reduce_bucket_size") == "model":
        zero["reduce_bucket_size"] = sum(p.numel() for p in model.parameters()) + 1
    ds["zero_optimization"].update(zero)
    if variant.deepcompile:
        ds["compile"] = {"deepcompile": True}
    if variant.autocast:
        ds["bf16"] = {"enabled": False}
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if variant.leaf == "block":
        set_z3_leaf_modules(model, [Block])
    elif variant.leaf == "stack":
        set_z3_leaf_modules(model, [BlockStack])  # = mae_st.engine.zero.gather_block_stacks_under_zero3
    optimizer = build_optimizer(model, cfg.optim, finetune, device)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    apply_lr(engine.optimizer, lr)
    if variant.deepcompile or variant.engine_compile:
        engine.compile()

    def engine_step(clips):
        loss = loss_of(engine, clips)
        engine.backward(loss)
        engine.step()
        return loss

    return engine_step, engine.module, engine


def tear_down(engine) -> None:
    """Removes the engine's hooks and frees its memory, and undoes what it changed for the whole process."""
    if engine is not None:
        try:
            engine.destroy()
        except Exception:  # noqa: BLE001 -- a failed teardown must not cost the remaining variants
            traceback.print_exc()
    F.linear = TORCH_LINEAR
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# Measuring -------------------------------------------------------------------------------------------------------

def time_steps(step, clips: torch.Tensor, warmup: int, steps: int):
    """(seconds per step, seconds of the first step, last loss). The first step includes any compilation."""
    torch.manual_seed(1)  # the same masks / drop paths for every variant
    started = time.perf_counter()
    step(clips).item()
    first = time.perf_counter() - started
    for _ in range(warmup - 1):
        step(clips).item()
    started = time.perf_counter()
    for _ in range(steps):
        loss = step(clips)
    last = loss.item()  # waits for the device
    return (time.perf_counter() - started) / steps, first, last


def matmul_tflops(device: torch.device, seconds: float = 1.0) -> float:
    """Dense matmul rate (bf16 8192^3 on a GPU, fp32 1024^3 on a CPU): the MFU denominator."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    started, iterations = time.perf_counter(), 0
    while time.perf_counter() - started < seconds or iterations < 5:
        a @ b
        iterations += 1
        if iterations % 10 == 0:
            sync()
    sync()
    return 2 * n**3 * iterations / (time.perf_counter() - started) / 1e12


def print_profile(step, clips: torch.Tensor, rows: int = 15) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step(clips).item()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))
    if torch.cuda.is_available():
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=60))


def measure(name: str, cfg: JobConfig, device: torch.device, args, peak_tflops: float) -> dict:
    cuda = device.type == "cuda"
    engine = None
    try:
        started = time.perf_counter()
        step, module, engine = make_step(name, cfg, device, args.lr)
        build = time.perf_counter() - started
        flops = train_flops_per_clip(module)
        dtype = torch.bfloat16 if engine is not None and engine.bfloat16_enabled() else torch.float32
        torch.manual_seed(2)
        clips = torch.randn(args.clips, 3, cfg.data.num_frames, cfg.data.img_size, cfg.data.img_size,
                            device=device, dtype=dtype)
        # DeepCompile recompiles at its 5th step (deepspeed/compile/init_z3.py WARMUP) to add its prefetch passes
        warmup = max(args.warmup, 7) if VARIANTS[name].deepcompile else args.warmup
        seconds, first, loss = time_steps(step, clips, warmup, args.steps)
        tflops = args.clips * flops / seconds / 1e12
        row = {"variant": name, "mode": args.mode, "clips": args.clips, "ckpt": args.grad_checkpointing,
               "s/step": round(seconds, 4), "clips/s": round(args.clips / seconds, 1),
               "TFLOP/s": round(tflops, 1 if cuda else 4), "MFU %": round(100 * tflops / peak_tflops, 1),
               "peak GB": round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None,
               "loss": round(loss, 5), "build s": round(build, 1), "first step s": round(first, 1)}
        if VARIANTS[name].compile_blocks or VARIANTS[name].deepcompile or VARIANTS[name].engine_compile:
            from torch._dynamo.utils import counters  # a recompile per block or a graph break shows here

            row["graphs"] = counters["stats"]["unique_graphs"]
            row["graph breaks"] = sum(counters["graph_break"].values())
        if name in args.profile.split(","):
            print(f"--- profile of {name}: 3 steps ---", flush=True)
            print_profile(step, clips)
        del step, module
    except Exception as err:  # noqa: BLE001 -- one variant's failure must not cost the others
        traceback.print_exc()
        row = {"variant": name, "error": f"{type(err).__name__}: {err}"[:300]}
    finally:
        tear_down(engine)
        engine = None
        gc.collect()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated; --list names them")
    parser.add_argument("--list", action="store_true", help="print the variants and what each tests, then exit")
    parser.add_argument("--mode", default="pretrain", choices=["pretrain", "finetune"])
    parser.add_argument("--model", default="", help="default: mae_vit_huge_patch14 / vit_huge_patch14 by mode")
    parser.add_argument("--tiny", action="store_true",
                        help="mae_vit_tiny_patch8 / vit_tiny_patch8 at 32 px: checks every variant on a CPU")
    parser.add_argument("--tiny_depth", type=int, default=0,
                        help="with --tiny: that many encoder blocks (and 4 decoder blocks), e.g. 32 for ViT-H's "
                             "count of ZeRO-3 hooks")
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--grad_checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (at least 1)")
    parser.add_argument("--lr", type=float, default=1e-4, help="a small lr, so `loss` shows wrong gradients")
    parser.add_argument("--matmul_tflops", type=float, default=0.0,
                        help="MFU denominator; 0 measures it (bf16 8192^3 matmul on a GPU, ~1 s)")
    parser.add_argument("--profile", default="", help="variants (comma-separated) whose top operators to print")
    parser.add_argument("--out", default="", help="write the rows as JSON here")
    args = parser.parse_args()
    if args.list:
        for name, variant in VARIANTS.items():
            print(f"{name:<19}{variant.doc}")
        return
    names = [name for name in args.variants.split(",") if name]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; --list names them")
    args.warmup = max(args.warmup, 1)

    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(key, value)
    import deepspeed

    cuda = torch.cuda.is_available()  # the CPU path only exists to check this script on a machine without a GPU
    deepspeed.init_distributed("nccl" if cuda else "gloo")
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    default_model = {"pretrain": "mae_vit_huge_patch14", "finetune": "vit_huge_patch14"}
    if args.tiny:
        default_model = {"pretrain": "mae_vit_tiny_patch8", "finetune": "vit_tiny_patch8"}
    model = args.model or default_model[args.mode]
    if args.tiny and args.tiny_depth:
        model = tiny_model_of_depth(args.mode, args.tiny_depth)
    peak = args.matmul_tflops or matmul_tflops(device)
    print(json.dumps({"device": torch.cuda.get_device_name(device) if cuda else "cpu", "model": model,
                      "torch": torch.__version__, "deepspeed": deepspeed.__version__,
                      "matmul TFLOP/s": round(peak, 1 if cuda else 4)}), flush=True)
    rows = []
    for name in names:
        cfg = job_config(args.mode, model, args.clips, args.grad_checkpointing, args.tiny)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        row = measure(name, cfg, device, args, peak)
        rows.append(row)
        print(json.dumps(row), flush=True)
    columns = ("s/step", "clips/s", "TFLOP/s", "MFU %", "peak GB", "loss", "first step s")
    print(f"\n{args.mode}, {model}, {args.clips} clips, matmul {peak:.4g} TFLOP/s")
    print(f"{'variant':<19}" + "".join(f"{c:>13}" for c in columns))
    for row in rows:
        cells = ("".join(f"{str(row.get(c, '-')):>13}" for c in columns) if "error" not in row
                 else "  " + row["error"])
        print(f"{row['variant']:<19}{cells}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

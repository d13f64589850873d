"""Where does a ViT-H/14 MAE-ST training step's time go? Plain PyTorch against DeepSpeed engines, one table.

    python benchmarks/profile_step.py --variants eager,z0,z2,z3,z3-persist --profile z3

Variants: `eager` is PyTorch alone (bf16 autocast, fp32 weights, fused AdamW), the reference for what the model
itself costs; the others are train.py's engine (`build_model`, `build_optimizer`, the shipped ZeRO JSON) at a
ZeRO stage, and `*-persist` additionally keeps every parameter gathered (ZeRO-3's per-module fetch/release is
Python work per module; on few GPUs it can cost more than the step's math), `*-leaf` makes each transformer
block one ZeRO-3 leaf (one gather per block), `*-nooverlap` turns off overlap_comm. `--profile NAME` prints the top
operators of that variant from torch.profiler.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from benchmarks.flops import train_flops_per_clip
from mae_st.config import JobConfig
from mae_st.engine.ds_config import default_ds_config_path, fill_ds_config, load_ds_config
from mae_st.engine.optim import build_optimizer
from mae_st.engine.zero import gather_whole_blocks_under_zero3
from mae_st.models import build_model

PERSIST_ALL = {"stage3_param_persistence_threshold": int(1e10), "stage3_max_live_parameters": int(1e10),
               "stage3_prefetch_bucket_size": int(5e8)}
NO_OVERLAP = {"overlap_comm": False}
STAGES = {"z0": (0, {}), "z2": (2, {}), "z2-nooverlap": (2, NO_OVERLAP), "z3": (3, {}),
          "z3-persist": (3, PERSIST_ALL), "z3-leaf": (3, {}), "z3-leaf-nooverlap": (3, NO_OVERLAP)}


def job_config(mode: str, model: str, clips: int, grad_checkpointing: bool) -> JobConfig:
    cfg = JobConfig()
    cfg.run.mode = mode
    cfg.model.grad_checkpointing = grad_checkpointing
    if mode == "pretrain":
        cfg.model.name, cfg.data.repeat_aug, cfg.data.batch_size_per_gpu = model, clips, 1
    else:
        cfg.model.name, cfg.model.drop_path_rate = model, 0.2
        cfg.data.batch_size_per_gpu, cfg.data.repeat_aug = clips, 1
    return cfg


def make_step(variant: str, cfg: JobConfig, device: torch.device):
    """(step function taking clips, model) for one variant."""
    with torch.device(device):
        model = build_model(cfg.model, cfg.data.img_size, cfg.data.num_frames)
    finetune = cfg.run.mode == "finetune"
    labels = torch.zeros(cfg.data.batch_size_per_gpu * cfg.data.repeat_aug, dtype=torch.long, device=device)

    def loss_of(module, clips):
        out = module(clips)
        return torch.nn.functional.cross_entropy(out.float(), labels) if finetune else out[0]

    if variant == "eager":
        optimizer = build_optimizer(model, cfg.optim, finetune, device)

        def eager_step(clips):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = loss_of(model, clips)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        return eager_step, model

    import deepspeed

    stage, extra = STAGES[variant]
    if "leaf" in variant:
        gather_whole_blocks_under_zero3(model, {"zero_optimization": {"stage": stage}})
    cfg.run.zero_stage = stage
    ds = fill_ds_config(load_ds_config(default_ds_config_path(cfg.run.mode)), cfg, 1,
                        bf16_supported=device.type == "cuda")
    ds["zero_optimization"].update(extra)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg.optim, finetune, device),
                                           config=ds)

    def engine_step(clips):
        loss = loss_of(engine, clips)
        engine.backward(loss)
        engine.step()
        return loss

    return engine_step, engine


def time_steps(step, clips: torch.Tensor, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step(clips).item()
    started = time.perf_counter()
    for _ in range(steps):
        loss = step(clips)
    loss.item()  # waits for the device
    return (time.perf_counter() - started) / steps


def print_profile(step, clips: torch.Tensor, rows: int = 15) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step(clips).item()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=60))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="eager,z0,z2,z3,z3-persist")
    parser.add_argument("--mode", default="pretrain", choices=["pretrain", "finetune"])
    parser.add_argument("--model", default="", help="default: mae_vit_huge_patch14 / vit_huge_patch14 by mode")
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--grad_checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile", default="", help="variant whose operators to print")
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(key, value)
    import deepspeed

    cuda = torch.cuda.is_available()  # the CPU path only exists to check this script on a machine without a GPU
    deepspeed.init_distributed("nccl" if cuda else "gloo")
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    model = args.model or ("mae_vit_huge_patch14" if args.mode == "pretrain" else "vit_huge_patch14")
    rows = []
    for variant in args.variants.split(","):
        cfg = job_config(args.mode, model, args.clips, args.grad_checkpointing)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            step, holder = make_step(variant, cfg, device)
            flops = train_flops_per_clip(holder.module if hasattr(holder, "module") else holder)
            dtype = torch.bfloat16 if cuda and variant != "eager" else torch.float32
            clips = torch.randn(args.clips, 3, cfg.data.num_frames, cfg.data.img_size, cfg.data.img_size,
                                device=device, dtype=dtype)
            seconds = time_steps(step, clips, args.warmup, args.steps)
            row = {"variant": variant, "mode": args.mode, "clips": args.clips, "ckpt": args.grad_checkpointing,
                   "s/step": round(seconds, 4), "clips/s": round(args.clips / seconds, 1),
                   "TFLOP/s": round(args.clips * flops / seconds / 1e12, 1),
                   "peak GB": round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None}
            if variant == args.profile:
                print_profile(step, clips)
            del step, holder
        except Exception as err:  # one variant's failure must not cost the others
            row = {"variant": variant, "error": f"{type(err).__name__}: {err}"[:300]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'variant':<12}{'s/step':>9}{'clips/s':>9}{'TFLOP/s':>9}{'peak GB':>9}")
    for row in rows:
        print(f"{row['variant']:<12}" + ("".join(f"{str(row.get(k, '-')):>9}" for k in ("s/step", "clips/s", "TFLOP/s",
                                                                                    "peak GB"))
                                        if "error" not in row else "  " + row["error"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

"""Clips/s of the DALI pretrain (repeat_aug 16) and finetune pipelines at 16x224x224 over a shard set.

    python benchmarks/bench_pipeline.py --shards /data/k400/train --decode-device auto --steps 50

Prints one table row per pipeline: clips/s, videos/s, seconds the consumer waited per step, bad samples.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from mae_st.config import DataConfig
from mae_st.data.loader import build_train_loader

PIPELINES = {
    "pretrain": dict(repeat_aug=16, batch_size_per_gpu=2),
    "finetune": dict(repeat_aug=2, batch_size_per_gpu=4, rand_aug=True, reprob=0.25, mixup=0.8, cutmix=1.0),
}


def measure(cfg: DataConfig, mode: str, device: torch.device, steps: int, warmup: int) -> dict:
    """Run `warmup` then `steps` steps; the clock covers only the measured steps."""
    loader = build_train_loader(cfg, mode, num_classes=400, rank=0, world_size=1, device=device,
                                dtype=torch.bfloat16)
    batches = iter(loader)
    for _ in range(warmup):
        next(batches)
    _sync(device)
    started, wait_at_start, clips_seen = time.perf_counter(), loader.stats.wait_seconds, 0
    for _ in range(steps):
        clips, _ = next(batches)
        clips_seen += clips.shape[0]
    _sync(device)
    elapsed = time.perf_counter() - started
    return {"clips/s": clips_seen / elapsed, "videos/s": clips_seen / cfg.repeat_aug / elapsed,
            "wait s/step": (loader.stats.wait_seconds - wait_at_start) / steps, "bad": loader.stats.bad_samples}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True, help="shard folder, brace pattern or manifest")
    parser.add_argument("--decode-device", default="auto", choices=["auto", "gpu", "cpu"])
    parser.add_argument("--pipelines", default="pretrain,finetune")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--num-threads", type=int, default=8)
    parser.add_argument("--num-frames", type=int, default=16)
    parser.add_argument("--sampling-rate", type=int, default=4)
    parser.add_argument("--img-size", type=int, default=224)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = DataConfig(train_shards=args.shards, decode_device=args.decode_device, num_threads=args.num_threads,
                      num_frames=args.num_frames, sampling_rate=args.sampling_rate, img_size=args.img_size)
    print(f"device={device} decode={args.decode_device} clip={args.num_frames}x{args.img_size}x{args.img_size} "
          f"rate={args.sampling_rate}")
    print(f"{'pipeline':<10}{'repeat':>7}{'batch':>6}{'clips/s':>10}{'videos/s':>10}{'wait s/step':>13}{'bad':>5}")
    for name in args.pipelines.split(","):
        cfg = dataclasses.replace(base, **PIPELINES[name])
        row = measure(cfg, name, device, args.steps, args.warmup)
        print(f"{name:<10}{cfg.repeat_aug:>7}{cfg.batch_size_per_gpu:>6}{row['clips/s']:>10.1f}"
              f"{row['videos/s']:>10.1f}{row['wait s/step']:>13.3f}{row['bad']:>5}")


if __name__ == "__main__":
    main()

"""Run by tests/test_engine.py through the deepspeed launcher on 2 CPU ranks: finetuning steps of real ZeRO-3
engines whose layer-wise lr decay is per-layer optimizer groups (torch AdamW) or scales bound to DeepSpeed's flat
partitions (LayerScaledAdamW), the latter with DeepSpeed walking each leaf's and the root's modules instead of
the lists mae_st.engine.zero keeps, a control without layer decay, a ZeRO-0 engine (which keeps the groups), and a
pair with gradients clipped hard whose norms come from mae_st.engine.zero's norm and from DeepSpeed's loop. Rank 0
writes every variant's losses, gradient norms and number of optimizer groups to the JSON path given as the only
argument."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed.comm as dist
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mae_st.config import JobConfig  # noqa: E402
from mae_st.engine.build import EngineOverrides, build_engine  # noqa: E402
from mae_st.engine.distributed import (exit_without_native_teardown, init_distributed,  # noqa: E402
                                       shutdown_distributed)
from mae_st.engine.schedule import apply_lr  # noqa: E402

STEPS = 4


def finetune_config(layer_decay: float, clip_grad: float) -> JobConfig:
    cfg = JobConfig()
    cfg.run.mode, cfg.model.name, cfg.model.num_classes = "finetune", "vit_tiny_patch8", 4
    cfg.data.img_size, cfg.data.num_frames, cfg.data.batch_size_per_gpu = 32, 4, 2
    cfg.optim.layer_decay, cfg.optim.clip_grad = layer_decay, clip_grad
    return cfg


def losses(env, layer_decay: float, overrides: EngineOverrides, clip_grad: float = 5.0) -> dict:
    cfg = finetune_config(layer_decay, clip_grad)
    built = build_engine(cfg, env, overrides)
    apply_lr(built.engine.optimizer, 3e-3)
    generator = torch.Generator().manual_seed(100 + env.rank)  # each rank its own clips, every variant the same
    out, norms = [], []
    for _ in range(STEPS):
        clips = torch.randn(2, 3, 4, 32, 32, generator=generator)
        targets = torch.randint(0, 4, (2,), generator=generator)
        torch.manual_seed(7)  # the same drop-path draws for every variant
        loss = built.loss_fn(built.engine, clips, targets)
        built.engine.backward(loss)
        built.engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        out.append(mean.item() / env.world_size)
        norm = built.engine.get_global_grad_norm()  # None where the engine takes none (ZeRO-0 without a clip)
        norms.append(None if norm is None else float(norm))
    inner = getattr(built.engine.optimizer, "optimizer", built.engine.optimizer)  # ZeRO-3 wraps it, ZeRO-0 fp32 not
    built.engine.destroy()
    return {"losses": out, "grad norms": norms, "optimizer groups": len(inner.param_groups),
            "optimizer": type(inner).__name__}


def report_path() -> Path:
    """The JSON path given as the script's only argument (the launcher adds --local_rank=N)."""
    return Path(next(arg for arg in sys.argv[1:] if not arg.startswith("--")))


def write_rank0_report(make_report) -> None:
    """Starts the launcher's world, has every rank build `make_report(env)`, and rank 0 write it as JSON to the path
    given as the script's only argument."""
    env = init_distributed()
    report = make_report(env)
    if env.is_main:
        report_path().write_text(json.dumps(report))
    shutdown_distributed()


def layer_decay_report(env) -> dict:
    return {"world size": env.world_size,
            "layer groups": losses(env, 0.75, EngineOverrides(layer_groups=True)),
            "scales in optimizer": losses(env, 0.75, EngineOverrides()),
            "modules walked": losses(env, 0.75, EngineOverrides(list_params_once=False)),
            "no layer decay": losses(env, 1.0, EngineOverrides()),
            "zero 0": losses(env, 0.75, EngineOverrides(zero_stage=0)),
            # clipped in every step (the norms are ~5): a wrong norm would change the losses too
            "clipped": losses(env, 0.75, EngineOverrides(), clip_grad=0.01),
            "clipped, DeepSpeed's norm": losses(env, 0.75, EngineOverrides(device_grad_norm=False), clip_grad=0.01)}


if __name__ == "__main__":
    write_rank0_report(layer_decay_report)
    exit_without_native_teardown()  # as train.py ends: a rank sometimes aborted in the comm stack's teardown

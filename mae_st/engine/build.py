"""The engine train.py trains with, built in one place: job config + process environment -> model, DeepSpeed engine,
input dtype, DeepSpeed config and loss function.

Benchmarks build through here too (benchmarks/profile_step.py, benchmarks/bench_model.py), so a figure measured
is the engine trained. What they vary is an `EngineOverrides`; its defaults are exactly what train.py runs.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import deepspeed
import torch
import torch.nn as nn
from deepspeed.utils import set_z3_leaf_modules

from mae_st.config import JobConfig
from mae_st.engine.distributed import DistEnv, seed_model_init
from mae_st.engine.ds_config import default_ds_config_path, fill_ds_config, load_ds_config, uses_bf16
from mae_st.engine.fused_params import fuse_block_parameters, pack_block_stacks
from mae_st.engine.optim import LayerScaledAdamW, build_optimizer, weight_decay_rule
from mae_st.engine.trainer import LossFn, build_loss_fn
from mae_st.engine.zero import (bind_lr_scales_to_partitions, gather_block_stacks_under_zero3,
                                list_parameters_once, order_for_aligned_views, take_grad_norms_on_device)
from mae_st.models import build_model
from mae_st.models.compile import compile_blocks
from mae_st.models.layers import Block, PackedBlock

log = logging.getLogger(__name__)

LEAVES = ("stack", "block", "none")


@dataclass(frozen=True)
class EngineOverrides:
    """What a benchmark may change about the engine; every default is train.py's behaviour."""

    zero_stage: Optional[int] = None  # None: --zero_stage or the JSON's
    fuse_block_params: Optional[bool] = None  # None: RunConfig.fuse_block_params (--no_fuse_block_params)
    compile_blocks: Optional[str] = None  # None: RunConfig.compile_blocks (--compile_blocks auto|on|stack|off)
    # ZeRO-3 leaf modules, gathered whole: "stack" each block stack (train.py), "block" each transformer block,
    # "none" DeepSpeed's own per-layer gathers
    leaves: str = "stack"
    torch_autocast: bool = False  # DeepSpeed's torch_autocast (fp32 weights, bf16 autocast) instead of its bf16 engine
    memory_efficient_linear: Optional[bool] = None  # None: the JSON's (off in the shipped GPU JSONs)
    zero: Dict[str, Any] = field(default_factory=dict)  # further zero_optimization keys (persistence, buckets, ...)
    ds: Dict[str, Any] = field(default_factory=dict)  # further top-level DeepSpeed keys (e.g. "compile")
    # parameters ordered so ZeRO-3's single-GPU views start 256-byte aligned (mae_st.engine.zero); False gives the
    # order used before 2026-12, to measure what alignment pays
    align_views: bool = True
    # finetuning's layer-wise lr decay as one optimizer group per layer (torch AdamW, as before 2026-12-01) instead
    # of scales inside one group per weight-decay setting (LayerScaledAdamW); other ZeRO stages always use groups
    layer_groups: bool = False
    # the parameter lists of the modules ZeRO-3 walks whole (leaves, root) kept instead of walked at every fetch and
    # step (mae_st.engine.zero; the process's setting)
    list_params_once: bool = True
    # under ZeRO-3, each block stack's packed blocks in two tensors of the stack (False: two tensors a block, as
    # before 2026-12-01 fifth)
    pack_stacks: bool = True
    # ZeRO-3's gradient norm in one fp32-accumulated kernel, no fp64 copies or host syncs (mae_st.engine.zero); False
    # is DeepSpeed's own loop
    device_grad_norm: bool = True

    def __post_init__(self) -> None:
        if self.leaves not in LEAVES:
            raise ValueError(f"leaves={self.leaves!r}: one of {LEAVES}")


@dataclass
class BuiltEngine:
    model: nn.Module  # the module the engine wraps (engine.module)
    engine: Any  # deepspeed.DeepSpeedEngine
    ds_config: Dict[str, Any]
    dtype: torch.dtype  # what the clips are fed to the engine in
    loss_fn: LossFn  # loss_fn(engine, clips, targets) -> scalar loss, as Trainer calls it


def effective_config(cfg: JobConfig, overrides: EngineOverrides) -> JobConfig:
    """`cfg` with the overrides that are run settings applied (a copy; `cfg` is left as it is)."""
    run = cfg.run
    run = dataclasses.replace(
        run, zero_stage=run.zero_stage if overrides.zero_stage is None else overrides.zero_stage,
        fuse_block_params=run.fuse_block_params if overrides.fuse_block_params is None else overrides.fuse_block_params,
        compile_blocks=run.compile_blocks if overrides.compile_blocks is None else overrides.compile_blocks)
    return dataclasses.replace(cfg, run=run)


def compile_scope(setting: str, mode: str, env: DistEnv) -> Optional[str]:
    """RunConfig.compile_blocks for this process: None (not compiled), "block" (each block's forward), "stack"
    (each block stack's forward, one graph) or "graphs" (stacks whose compiled forward and backward replay CUDA
    graphs: one launch a stack instead of one a kernel).

    "auto" compiles on CUDA GPUs only. On one GPU, graphs: the 16-clip ViT-H/14 pretraining step is host-bound, and
    graphs ran it at 1.31x plain stacks, 1.63x eager PyTorch; finetuning 1.01x (docs/performance.md, 2026-12-02).
    On several GPUs ZeRO-3 gathers each stack's weights into buffers it allocates at every fetch, and a graph
    re-records when a weight's address changes (not measured), so auto keeps plain compiles there: whole stacks for
    finetuning, each block for pretraining (2026-12-01 sixth: stacks 1.01-1.10x finetuning, 0.91x pretraining)."""
    if setting == "auto":
        if not env.on_gpu:
            return None
        if env.world_size == 1:
            return "graphs"
        return "stack" if mode == "finetune" else "block"
    return {"on": "block", "stack": "stack", "graphs": "graphs", "off": None}[setting]


def build_ds_config(cfg: JobConfig, env: DistEnv, overrides: EngineOverrides = EngineOverrides()) -> Dict[str, Any]:
    """The mode's shipped ZeRO-3 bf16 config (or --ds_config) completed from the flags, fp32 on the CPU, with the
    overrides' DeepSpeed settings applied."""
    cfg = effective_config(cfg, overrides)
    path = cfg.run.ds_config or default_ds_config_path(cfg.run.mode)
    ds = fill_ds_config(load_ds_config(path), cfg, env.world_size, bf16_supported=env.on_gpu,
                        source=f"--ds_config {path}")
    zero = ds.setdefault("zero_optimization", {})
    zero.update(overrides.zero)
    if overrides.memory_efficient_linear is not None:
        zero["memory_efficient_linear"] = overrides.memory_efficient_linear
    if overrides.torch_autocast:
        ds["bf16"] = {"enabled": False}
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    ds.update(overrides.ds)
    return ds


def build_train_model(cfg: JobConfig, env: DistEnv, overrides: EngineOverrides = EngineOverrides(),
                      load_weights: Optional[Callable[[nn.Module], None]] = None,
                      pack_stacks: bool = False) -> nn.Module:
    """The model as the engine gets it: seeded init on the rank's device, `load_weights` (pretrained weights)
    applied, blocks packed unless turned off (with `pack_stacks`, each block stack's blocks into two tensors of
    the stack), then the blocks compiled where RunConfig.compile_blocks says so."""
    cfg = effective_config(cfg, overrides)
    seed_model_init(cfg.run.seed)
    with torch.device(env.device):  # initialising ViT-H on the GPU takes seconds, on the CPU minutes
        model = build_model(cfg.model, cfg.data.img_size, cfg.data.num_frames)
    if load_weights is not None:
        load_weights(model)
    if cfg.run.fuse_block_params:
        packed = fuse_block_parameters(model, weight_decay_rule(model, cfg.optim.bias_wd))
        log.info("packed the parameters of %d transformer blocks into 2 tensors each", packed)
        if pack_stacks:
            log.info("packed the blocks of %d block stacks into 2 tensors each", pack_block_stacks(model))
    scope = compile_scope(cfg.run.compile_blocks, cfg.run.mode, env)
    if scope is not None:
        log.info("compiling the forward of %d transformer blocks (torch.compile, %s; --compile_blocks off turns it "
                 "off)", compile_blocks(model, whole_stacks=scope != "block", cuda_graphs=scope == "graphs"),
                 {"block": "one graph shared by the blocks", "stack": "each block stack as one graph",
                  "graphs": "each block stack as one graph, replayed as a CUDA graph"}[scope])
    return model


def build_engine(cfg: JobConfig, env: DistEnv, overrides: EngineOverrides = EngineOverrides(),
                 load_weights: Optional[Callable[[nn.Module], None]] = None) -> BuiltEngine:
    """Model, optimizer and DeepSpeed engine for `cfg` on this rank."""
    ds_config = build_ds_config(cfg, env, overrides)
    dtype = torch.bfloat16 if uses_bf16(ds_config) else torch.float32
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    log.info("precision: %s%s on %s, world size %d, ZeRO stage %d", dtype,
             " (torch_autocast bf16)" if overrides.torch_autocast else "", env.device, env.world_size, stage)
    # ZeRO-3 keeps layer-wise decay as scales inside the optimizer, which can scale ranges of one tensor: so only
    # there are stacks packed; the other stages put each layer in its own optimizer group, a tensor per block
    scales_in_optimizer = stage == 3 and not overrides.layer_groups
    model = build_train_model(cfg, env, overrides, load_weights,
                              pack_stacks=scales_in_optimizer and overrides.pack_stacks)
    cfg = effective_config(cfg, overrides)
    optimizer = build_optimizer(model, cfg.optim, cfg.run.mode == "finetune", env.device,
                                scales_in_optimizer=scales_in_optimizer)
    if isinstance(optimizer, LayerScaledAdamW):  # DeepSpeed asks for this with any optimizer it does not know
        ds_config["zero_allow_untested_optimizer"] = True
    if overrides.align_views:
        order_for_aligned_views(optimizer.param_groups)
    if overrides.leaves == "stack":
        gather_block_stacks_under_zero3(model, ds_config)
    elif overrides.leaves == "block" and stage == 3:
        set_z3_leaf_modules(model, [Block, PackedBlock])
    if stage == 3 and not list_parameters_once(overrides.list_params_once) and overrides.list_params_once:
        log.warning("DeepSpeed %s has no iter_params to wrap: ZeRO-3 walks each leaf's modules at every fetch",
                    deepspeed.__version__)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    bind_lr_scales_to_partitions(engine.optimizer)
    if stage == 3 and overrides.device_grad_norm and not take_grad_norms_on_device(engine.optimizer):
        log.info("ZeRO-3 takes its gradient norm with DeepSpeed's own loop (offload, Muon or model parallelism)")
    return BuiltEngine(model=engine.module, engine=engine, ds_config=ds_config, dtype=dtype,
                       loss_fn=build_loss_fn(cfg.run.mode, cfg.data.smoothing))


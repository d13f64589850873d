"""Typed configuration: one dataclass per concern, all defaults live here.

`JobConfig` is built from the command line in exactly one place (`parse_job_config`); every other module
receives only the part it needs (a `ModelConfig`, a `DataConfig`, ...), never an argparse namespace.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple


@dataclass
class ModelConfig:
    """Which network and its architecture knobs (clip geometry lives in `DataConfig`)."""

    name: str = "mae_vit_large_patch16"
    t_patch_size: int = 2
    # MAE-ST pretraining
    decoder_embed_dim: int = 512
    decoder_depth: int = 4
    decoder_num_heads: int = 16
    mask_ratio: float = 0.9
    pred_t_dim: int = 8
    norm_pix_loss: bool = True
    # shared by both model families; the original's released checkpoints use sep_pos_embed + cls_embed
    sep_pos_embed: bool = True
    cls_embed: bool = True
    trunc_init: bool = False
    no_qkv_bias: bool = False
    grad_checkpointing: bool = False
    # classifier (finetuning)
    num_classes: int = 400
    drop_path_rate: float = 0.1
    dropout: float = 0.5
    global_pool: bool = True
    head_init_scale: float = 2e-5


@dataclass
class DataConfig:
    """Where the shards are and how clips are sampled, decoded and augmented."""

    train_shards: str = ""  # shard dir, brace pattern ("data/train-{000000..000009}.tar") or manifest.csv
    val_shards: str = ""
    # clip geometry, shared with the model factory
    num_frames: int = 16
    sampling_rate: int = 4
    img_size: int = 224
    # clips cut from every decoded video (decode once, sample `repeat_aug` times)
    repeat_aug: int = 1
    batch_size_per_gpu: int = 2  # videos per GPU micro-step; clips per step = batch_size_per_gpu * repeat_aug
    decode_device: str = "auto"  # auto | gpu | cpu
    num_threads: int = 4  # DALI CPU threads per pipeline
    prefetch_queue_depth: int = 2
    shuffle_buffer: int = 256  # DALI reader initial_fill
    # spatial augmentation (pretraining defaults; finetuning overrides scales to (0.08, 1.0))
    jitter_scales_relative: Tuple[float, float] = (0.5, 1.0)
    jitter_aspect_relative: Tuple[float, float] = (0.75, 1.3333)
    mean: Tuple[float, float, float] = (0.45, 0.45, 0.45)
    std: Tuple[float, float, float] = (0.225, 0.225, 0.225)
    # finetuning augmentation
    rand_aug: bool = False
    aa: str = "rand-m7-mstd0.5-inc1"
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    mixup: float = 0.0
    cutmix: float = 0.0
    cutmix_minmax: Optional[Tuple[float, float]] = None
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    smoothing: float = 0.1
    # multi-view evaluation: temporal clips x spatial crops per video
    test_num_ensemble_views: int = 10
    test_num_spatial_crops: int = 3
    # a run stops when more than this share of the samples read so far could not be decoded
    max_bad_sample_fraction: float = 0.1


@dataclass
class OptimConfig:
    """Optimiser, schedule and step shaping."""

    epochs: int = 100
    warmup_epochs: float = 5.0
    lr: Optional[float] = None  # absolute lr; when None, lr = blr * effective_batch / 256
    blr: float = 1.6e-3
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: Tuple[float, float] = (0.9, 0.95)
    layer_decay: float = 0.75  # finetuning only
    bias_wd: bool = False
    clip_grad: Optional[float] = None
    accum_iter: int = 1


@dataclass
class RunConfig:
    """Everything about the run itself: mode, outputs, checkpoints, engine."""

    mode: str = "pretrain"  # pretrain | finetune
    output_dir: str = "./output_dir"
    save_prefix: str = ""
    seed: int = 0
    resume: str = ""  # "", "auto", or a checkpoint directory
    finetune: str = ""  # pretrained weights to start finetuning from
    eval_only: bool = False
    ds_config: str = ""  # DeepSpeed JSON; default picked from mode
    zero_stage: Optional[int] = None
    checkpoint_period: int = 1  # epochs
    save_every_steps: int = 0  # 0: only at epoch ends
    keep_checkpoints: int = 2
    log_interval: int = 10
    max_steps_per_epoch: int = 0  # 0: a full pass over the shards; >0 caps it (smoke runs, benchmarks)
    max_nonfinite_steps: int = 10  # consecutive NaN/inf losses tolerated before the run stops
    local_rank: int = -1


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

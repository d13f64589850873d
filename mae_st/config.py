"""Typed configuration: one dataclass per concern, all defaults live here.

`JobConfig` is built from the command line in exactly one place (`parse_job_config`); every other module
receives only the part it needs (a `ModelConfig`, a `DataConfig`, ...), never an argparse namespace.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

log = logging.getLogger(__name__)


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
    # auto: reused NVDEC sessions (PyNvVideoCodec) when decoding video on a GPU and the library loads, else DALI's
    # decoder; nvdec | dali force one; pyav decodes on CPU threads (any codec) and augments like the others
    decoder: str = "auto"
    # reused decoders: batches whose DALI augmentation runs ahead on a thread while the step runs; 0: inline
    augment_ahead: int = 2
    # reused decoders: reader threads per GPU, each with its own decoder. 4, not 8: 8 decode a little faster alone
    # (~210 against ~190 finetuning clips/s on an H200) but inside train.py they slowed the step they feed (ViT-B/16,
    # one run: 97 / 297 clips/s finetuning / pretraining with 8, 105 / 339 with 4; docs/performance.md)
    decoder_threads: int = 4
    # jpeg-payload shards with decode on the GPU: decode the frames with libjpeg-turbo on the DALI threads ("cpu")
    # and move the clips to the GPU, or with nvJPEG ("gpu"); docs/performance.md compares them
    jpeg_decode_device: str = "cpu"
    num_threads: int = 8  # DALI CPU threads per GPU in total, shared by its pipelines
    # concurrent DALI pipelines, each over a disjoint slice of the rank's part; 0: 4 when decoding on NVDEC (4 with
    # 8 threads fed 509 clips/s on an H100, 1 pipeline 312: docs/performance.md), 1 on DALI's CPU decoder
    pipelines_per_gpu: int = 0
    prefetch_queue_depth: int = 2
    shuffle_buffer: int = 256  # samples a training pass's shuffle draws each next sample from (reads stay local)
    # a pipeline is rebuilt every this many batches, seeded by where the segment lies in the epoch, so a resumed
    # run decodes at most this many batches a stream to reach its step, and repeats the same augmentations
    pipeline_segment_batches: int = 64
    # spatial augmentation (pretraining defaults; finetuning overrides scales to (0.08, 1.0))
    jitter_scales_relative: Tuple[float, float] = (0.5, 1.0)
    jitter_aspect_relative: Tuple[float, float] = (0.75, 1.3333)
    flip_prob: float = 0.5  # horizontal flip per training clip; 0 for direction-sensitive sets (SSv2)
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


COMPILE_BLOCKS = ("auto", "on", "stack", "graphs", "off")  # RunConfig.compile_blocks


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
    export: bool = False  # only write the consolidated weights of `resume` (or the last checkpoint) and exit
    # each transformer block's parameters as two flat tensors inside the engine (mae_st/engine/fused_params.py):
    # fewer tensors for DeepSpeed's per-parameter work (ViT-H MAE: 595 -> 91); exports keep the usual names
    fuse_block_params: bool = True
    # how long a Python thread may hold the interpreter before another waiting one gets it (sys.setswitchinterval;
    # Python's default is 5 ms). The training loop is the thread that matters, and the decoder and augmentation
    # threads beside it otherwise keep it waiting up to 5 ms at a time (ViT-B/16 finetuning with 4 decoder threads
    # on an H200: data wait 1.7 % against 3.0 %, clips/s a few % higher; docs/performance.md)
    gil_switch_interval_ms: float = 0.5
    # torch.compile of each transformer block's forward (mae_st/models/compile.py): "auto" on CUDA GPUs, where the
    # compiled ZeRO-3 step ran 1.03-1.12x the uncompiled one in five measurements on an H200 (docs/performance.md),
    # not on CPUs, where compiling only adds start-up time; "on" / "off" force it
    compile_blocks: str = "auto"


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


# ---- command line -> JobConfig ------------------------------------------------------------------------------------

# Finetuning departs from the (pretraining) dataclass defaults above in these fields, as the original's
# main_finetune.py does; a flag given on the command line always wins.
FINETUNE_DEFAULTS = {
    "model.name": "vit_large_patch16",
    "optim.blr": 1e-3,
    "optim.min_lr": 1e-6,
    "data.jitter_scales_relative": (0.08, 1.0),
}

# The original's flags that have no job in this design (DeepSpeed's launcher owns processes and devices, DALI
# owns decoding threads); they are accepted so existing command lines keep working, and ignored with a note.
IGNORED_FLAGS = {
    "--pin_mem": "DALI hands batches over on the device",
    "--no_pin_mem": "DALI hands batches over on the device",
    "--num_workers": "decoding threads are DataConfig.num_threads (DALI)",
    "--dist_on_itp": "the DeepSpeed launcher sets up processes",
    "--no_env": "the DeepSpeed launcher sets up processes",
    "--distributed": "the DeepSpeed launcher sets up processes",
    "--world_size": "the DeepSpeed launcher sets the world size (--num_gpus/--num_nodes/hostfile)",
    "--dist_url": "the DeepSpeed launcher sets up processes",
    "--device": "each rank uses its DeepSpeed accelerator device",
    "--log_dir": "logs go to --output_dir (log.jsonl, tensorboard/)",
    "--start_epoch": "--resume restores the epoch",
    "--dist_eval": "evaluation is always distributed",
    "--cpu_mix": "mixup runs on the training device",
    "--color_jitter": "not used by the video augmentation",
    "--resplit": "not used by the video augmentation",
}
_TAKES_VALUE = {"--num_workers", "--world_size", "--dist_url", "--device", "--log_dir", "--start_epoch",
                "--color_jitter"}


class ConfigError(ValueError):
    """A flag value (or combination) that cannot run; the message names the flag and what to do."""


def build_arg_parser() -> argparse.ArgumentParser:
    """The train.py command line: the original's flag names (and aliases) plus DeepSpeed/shard-specific ones."""
    p = argparse.ArgumentParser(
        prog="train.py",
        usage="python train.py --mode {pretrain,finetune} [options]   (one process: one GPU, or the CPU)\n"
              "       deepspeed [--num_gpus N] train.py --mode {pretrain,finetune} [options]   (several GPUs/nodes)",
        description="MAE-ST pretraining and finetuning on DeepSpeed. Every flag's default is shown; finetuning "
                    "changes a few of them (shown as 'finetune: ...'). A given flag always wins.",
    )
    p.add_argument("--mode", dest="run.mode", choices=("pretrain", "finetune"), required=True,
                   help="pretrain: MAE-ST masked-video pretraining (no labels); finetune: train and evaluate a "
                        "video classifier (required)")
    _add_model_flags(p.add_argument_group("model"))
    _add_data_flags(p.add_argument_group("data"))
    _add_optim_flags(p.add_argument_group("optimisation"))
    _add_run_flags(p.add_argument_group("run"))
    _add_ignored_flags(p.add_argument_group(
        "accepted for compatibility, ignored",
        "the original's flags " + " ".join(IGNORED_FLAGS) + " are accepted, so its command lines keep working, "
        "and ignored with a one-line note (the DALI pipeline and the DeepSpeed launcher do their jobs)"))
    return p


def _add_model_flags(m) -> None:
    _value(m, "--model", "model.name", str, "network to build by name: an mae_vit_* model to pretrain, a vit_* "
           "classifier to finetune")
    _value(m, "--decoder_embed_dim", "model.decoder_embed_dim", int, "width of the MAE decoder, in channels")
    _value(m, "--decoder_depth", "model.decoder_depth", int, "transformer blocks in the MAE decoder")
    _value(m, "--decoder_num_heads", "model.decoder_num_heads", int, "attention heads of the MAE decoder")
    _value(m, "--t_patch_size", "model.t_patch_size", int, "frames per patch in time (temporal patch size)")
    _value(m, "--pred_t_dim", "model.pred_t_dim", int, "frames per clip the MAE decoder predicts (evenly spaced; "
           "<= --num_frames)")
    _value(m, "--num_classes", "model.num_classes", int, "classes of the classifier head (finetune)")
    _value(m, "--mask_ratio", "model.mask_ratio", float, "share of patches hidden from the MAE encoder, in (0, 1)")
    _value(m, "--drop_path_rate", "model.drop_path_rate", float, "stochastic-depth rate of the classifier's "
           "blocks, 0-1 (finetune)")
    _value(m, "--dropout", "model.dropout", float, "dropout rate before the classifier head, 0-1 (finetune)")
    _switch(m, "norm_pix_loss", "model.norm_pix_loss", "MAE loss on per-patch normalised pixels instead of raw "
            "pixels")
    _switch(m, "sep_pos_embed", "model.sep_pos_embed", "separate space and time position embeddings (the released "
            "checkpoints' layout) instead of one joint table")
    _switch(m, "cls_embed", "model.cls_embed", "a cls token in the encoder (the released checkpoints have one)")
    _switch(m, "trunc_init", "model.trunc_init", "truncated-normal (std 0.02) instead of Xavier-uniform init of "
            "the linear layers")
    _switch(m, "grad_checkpointing", "model.grad_checkpointing", "recompute each block's activations during "
            "backward: less GPU memory (ViT-H), more compute per step")
    _flag(m, "--no_qkv_bias", "model.no_qkv_bias", True, "no bias in the attention qkv projections", "off")
    _flag(m, "--global_pool", "model.global_pool", True, "classify from the mean of the patch tokens", "on")
    _flag(m, "--cls_token", "model.global_pool", False, "classify from the cls token instead of --global_pool",
          "off")


def _add_data_flags(d) -> None:
    _value(d, "--train_shards", "data.train_shards", str, "training data: a packed shard folder, a brace pattern "
           "(train-{000000..000009}.tar) or a manifest.csv; synthetic:N for N generated clips", metavar="SHARDS")
    _value(d, "--val_shards", "data.val_shards", str, "validation data, the same forms; finetuning evaluates on "
           "it after every epoch", metavar="SHARDS")
    _value(d, "--batch_size_per_gpu", "data.batch_size_per_gpu", int, "videos per GPU and micro-step; clips per "
           "step = this x --repeat_aug", aliases=("--batch_size",))
    _value(d, "--img_size", "data.img_size", int, "side of the square clips, in pixels", aliases=("--input_size",))
    _value(d, "--num_frames", "data.num_frames", int, "frames per clip")
    _value(d, "--sampling_rate", "data.sampling_rate", int, "stride between a clip's frames, in source frames")
    _value(d, "--repeat_aug", "data.repeat_aug", int, "clips cut from every decoded video (decoded once, sampled "
           "this many times)")
    _value(d, "--decoder", "data.decoder", str, "what decodes video: auto (reused NVDEC sessions through "
           "PyNvVideoCodec on a GPU when it loads, else DALI's decoder), nvdec, dali, or pyav (CPU threads)",
           choices=("auto", "nvdec", "dali", "pyav"))
    _value(d, "--augment_ahead", "data.augment_ahead", int, "with reused decoders (--decoder nvdec/pyav): batches "
           "augmented ahead on a thread while the step runs; 0 augments inside the step's wait for data")
    _value(d, "--decoder_threads", "data.decoder_threads", int, "with reused decoders (--decoder nvdec/pyav): "
           "reader threads per GPU, each with its own decoder")
    _value(d, "--num_threads", "data.num_threads", int, "DALI CPU threads per GPU in total: each of the "
           "--pipelines_per_gpu pipelines gets max(1, num_threads // pipelines_per_gpu)")
    _value(d, "--max_bad_sample_fraction", "data.max_bad_sample_fraction", float, "the run stops when more than "
           "this share of the samples is damaged at start-up, or of those read so far could not be read, 0-1")
    _value(d, "--pipeline_segment_batches", "data.pipeline_segment_batches", int, "batches a DALI pipeline reads "
           "before it is rebuilt with a seed of its place in the epoch: the most a resume decodes per pipeline to "
           "reach its step")
    _value(d, "--pipelines_per_gpu", "data.pipelines_per_gpu", int, "DALI pipelines per GPU, run concurrently "
           "(round-robin) over disjoint slices of the rank's samples; more keep the video decoder busy. 0: 4 on "
           "NVDEC, 1 on the CPU decoder")
    _value(d, "--decode_device", "data.decode_device", str, "where videos decode: gpu (NVDEC), cpu (DALI's CPU "
           "decoder: VP8/VP9/MJPEG), auto (gpu when there is one)", choices=("auto", "gpu", "cpu"))
    _value(d, "--jpeg_decode_device", "data.jpeg_decode_device", str, "jpeg-payload shards on a GPU: decode the "
           "frames on the DALI CPU threads or with nvJPEG", choices=("cpu", "gpu"))
    _value(d, "--jitter_scales_relative", "data.jitter_scales_relative", float, "random-resized-crop area range, "
           "as shares of the frame (min max)", nargs=2, metavar=("MIN", "MAX"))
    _value(d, "--jitter_aspect_relative", "data.jitter_aspect_relative", float, "random-resized-crop aspect-ratio "
           "range, width/height (min max)", nargs=2, metavar=("MIN", "MAX"))
    _value(d, "--flip_prob", "data.flip_prob", float, "probability of flipping a training clip horizontally; use 0 "
           "for direction-sensitive sets such as Something-Something v2")
    _switch(d, "rand_aug", "data.rand_aug", "RandAugment (--aa) on the training clips (finetune)")
    _value(d, "--aa", "data.aa", str, "RandAugment policy, timm syntax rand-m<magnitude>-n<ops>-... (with "
           "--rand_aug)", metavar="POLICY")
    _value(d, "--reprob", "data.reprob", float, "probability of random erasing per training clip, 0-1 (finetune)")
    _value(d, "--remode", "data.remode", str, "random-erasing fill: pixel (per-pixel noise), rand (per-channel "
           "noise) or const (zeros)", metavar="MODE")
    _value(d, "--recount", "data.recount", int, "random-erasing boxes per erased clip")
    _value(d, "--mixup", "data.mixup", float, "mixup alpha; 0 turns mixup off (finetune)")
    _value(d, "--cutmix", "data.cutmix", float, "cutmix alpha; 0 turns cutmix off (finetune)")
    _value(d, "--cutmix_minmax", "data.cutmix_minmax", float, "cutmix box size range as shares of the frame "
           "(min max), used instead of the --cutmix alpha", nargs=2, metavar=("MIN", "MAX"))
    _value(d, "--mixup_prob", "data.mixup_prob", float, "probability of mixing a batch (mixup or cutmix), 0-1")
    _value(d, "--mixup_switch_prob", "data.mixup_switch_prob", float, "probability of cutmix instead of mixup "
           "when both are on, 0-1")
    _value(d, "--mixup_mode", "data.mixup_mode", str, "mixup/cutmix parameters drawn per batch, pair or elem "
           "(timm's Mixup)", metavar="MODE")
    _value(d, "--smoothing", "data.smoothing", float, "label smoothing of the classification targets, 0-1")
    _value(d, "--test_num_ensemble_views", "data.test_num_ensemble_views", int, "evaluation: clips per video, "
           "evenly spaced in time; their predictions are averaged")
    _value(d, "--test_num_spatial_crops", "data.test_num_spatial_crops", int, "evaluation: square crops per clip "
           "along the longer side (1: centre, 3: both ends and centre)")


def _add_optim_flags(o) -> None:
    _value(o, "--epochs", "optim.epochs", int, "passes over the training shards")
    _value(o, "--accum_iter", "optim.accum_iter", int, "micro-steps per optimizer step (gradient accumulation)")
    _value(o, "--warmup_epochs", "optim.warmup_epochs", float, "epochs of linear lr warmup before the cosine decay")
    _value(o, "--lr", "optim.lr", float, "peak learning rate, absolute; overrides --blr",
           default_text="from --blr")
    _value(o, "--blr", "optim.blr", float, "base learning rate: peak lr = blr x effective batch / 256, the batch "
           "in clips (x --repeat_aug, --accum_iter and the world size)")
    _value(o, "--min_lr", "optim.min_lr", float, "learning rate at the end of the cosine decay")
    _value(o, "--weight_decay", "optim.weight_decay", float, "AdamW weight decay")
    _value(o, "--layer_decay", "optim.layer_decay", float, "layer-wise lr decay per block from the head down, in "
           "(0, 1]; 1 turns it off (finetune)")
    _value(o, "--clip_grad", "optim.clip_grad", float, "clip the global gradient norm to this value",
           default_text="no clipping")
    _value(o, "--beta", "optim.betas", float, "AdamW betas (beta1 beta2)", nargs=2, metavar=("B1", "B2"))
    _switch(o, "bias_wd", "optim.bias_wd", "weight decay on biases and norm weights too")


def _add_run_flags(r) -> None:
    _value(r, "--output_dir", "run.output_dir", str, "checkpoints, log.jsonl, config.json and the exported weights "
           "go here", metavar="DIR")
    _value(r, "--save_prefix", "run.save_prefix", str, "prefix of the exported files' names "
           "(<prefix>model.safetensors, <prefix>best.safetensors)", metavar="PREFIX")
    _value(r, "--resume", "run.resume", str, "auto: continue from the newest complete checkpoint in --output_dir "
           "(a fresh start when there is none); or a checkpoint folder <output_dir>/checkpoints/<tag>",
           metavar="auto|DIR")
    _value(r, "--finetune", "run.finetune", str, "pretrained weights to start the classifier from: our "
           ".safetensors export or the original's .pth", metavar="WEIGHTS")
    _value(r, "--ds_config", "run.ds_config", str, "DeepSpeed JSON", metavar="JSON",
           default_text="ds_configs/pretrain_zero3_bf16.json, finetune: ds_configs/finetune_zero3_bf16.json")
    _value(r, "--zero_stage", "run.zero_stage", int, "DeepSpeed ZeRO stage 0-3, overriding the JSON's",
           default_text="the JSON's")
    _value(r, "--seed", "run.seed", int, "seed of the model init, masks, augmentation and epoch order")
    _value(r, "--checkpoint_period", "run.checkpoint_period", int, "save a checkpoint every this many epochs")
    _value(r, "--save_every_steps", "run.save_every_steps", int, "also save every this many steps; 0: only at "
           "epoch ends")
    _value(r, "--num_checkpoint_del", "run.keep_checkpoints", int, "keep only the newest N checkpoints")
    _value(r, "--log_interval", "run.log_interval", int, "steps between log.jsonl records (and the bar's clips/s)")
    _value(r, "--max_steps_per_epoch", "run.max_steps_per_epoch", int, "cap on the micro-steps of an epoch; 0: a "
           "full pass over the shards")
    _value(r, "--gil_switch_interval_ms", "run.gil_switch_interval_ms", float, "longest a Python thread holds the "
           "interpreter while others wait (sys.setswitchinterval; Python's default 5): short keeps the training "
           "loop from waiting on the data threads")
    _value(r, "--max_nonfinite_steps", "run.max_nonfinite_steps", int, "consecutive NaN/inf-loss steps skipped "
           "before the run stops with an error")
    _value(r, "--local_rank", "run.local_rank", int, "the process's GPU on its node; the DeepSpeed launcher passes "
           "it, never needed by hand")
    _value(r, "--compile_blocks", "run.compile_blocks", str, "torch.compile the transformer blocks: on (each "
           "block's forward), stack (each block stack's forward as one graph), graphs (stack, replaying CUDA graphs), "
           "off, or auto (on one CUDA GPU: graphs; on several: stack for finetuning, on for pretraining); the first "
           "step takes seconds to a minute and a half longer while it compiles", choices=COMPILE_BLOCKS)
    _switch(r, "fuse_block_params", "run.fuse_block_params", "pack each transformer block's parameters into two "
            "flat tensors inside the engine (fewer tensors for DeepSpeed); exports keep the usual names")
    _flag(r, "--eval", "run.eval_only", True, "only evaluate (--finetune weights or --resume checkpoint) on "
          "--val_shards", "off")
    _flag(r, "--export", "run.export", True, "only write the consolidated fp32 weights of --resume (default: the "
          "latest checkpoint) and exit", "off")
    r.add_argument("--path_to_data_dir", dest="path_to_data_dir", default=None, help=argparse.SUPPRESS)


def _add_ignored_flags(group) -> None:
    for flag in IGNORED_FLAGS:
        if flag in _TAKES_VALUE:
            group.add_argument(flag, dest=f"ignored{flag}", default=None, help=argparse.SUPPRESS)
        else:
            group.add_argument(flag, dest=f"ignored{flag}", action="store_const", const=True, default=None,
                               help=argparse.SUPPRESS)


def parse_job_config(argv: Optional[Sequence[str]] = None) -> JobConfig:
    """The one place the command line becomes a `JobConfig`; a bad flag or combination exits with one error line."""
    parser = build_arg_parser()
    args = vars(parser.parse_args(argv))
    if args.pop("path_to_data_dir") is not None:
        parser.error("--path_to_data_dir: this trainer reads packed shards; pack the videos with "
                     "tools/shard_videos.py and pass --train_shards/--val_shards")
    for flag in IGNORED_FLAGS:
        if args.pop(f"ignored{flag}") is not None:
            log.warning("%s is accepted for compatibility and ignored: %s", flag, IGNORED_FLAGS[flag])
    cfg = JobConfig()
    given = {k: v for k, v in args.items() if v is not None}
    values = {**(FINETUNE_DEFAULTS if given["run.mode"] == "finetune" else {}), **given}
    for dotted, value in values.items():
        section, name = dotted.split(".")
        setattr(getattr(cfg, section), name, tuple(value) if isinstance(value, list) else value)
    try:
        validate_job_config(cfg)
    except ConfigError as err:
        parser.error(str(err))
    return cfg


def validate_job_config(cfg: JobConfig) -> None:
    """Raises ConfigError, naming the flag, for values and combinations that cannot run."""
    from mae_st.models import list_models, model_family  # lazy: the model registry imports this module

    run, model, data, optim = cfg.run, cfg.model, cfg.data, cfg.optim
    if model.name not in list_models():
        raise ConfigError(f"--model {model.name}: unknown; choose one of {', '.join(list_models())}")
    family = model_family(model.name)
    if run.mode == "pretrain" and family != "mae":
        raise ConfigError(f"--model {model.name} is a classifier; --mode pretrain needs an MAE model "
                          f"({', '.join(list_models('mae'))})")
    if run.mode == "finetune" and family != "classifier":
        raise ConfigError(f"--model {model.name} is an MAE model; --mode finetune needs a classifier "
                          f"({', '.join(list_models('classifier'))})")
    if not 0.0 < model.mask_ratio < 1.0:
        raise ConfigError(f"--mask_ratio {model.mask_ratio}: must be strictly between 0 and 1")
    if data.num_frames % model.t_patch_size:
        raise ConfigError(f"--num_frames {data.num_frames} is not divisible by --t_patch_size {model.t_patch_size}")
    if run.mode == "pretrain" and (model.pred_t_dim > data.num_frames
                                   or (model.t_patch_size * model.pred_t_dim) % data.num_frames):
        raise ConfigError(f"--pred_t_dim {model.pred_t_dim}: must be <= --num_frames {data.num_frames} and "
                          "--t_patch_size x --pred_t_dim a multiple of --num_frames "
                          "(e.g. --pred_t_dim = num_frames / 2)")
    for flag, value in (("--batch_size_per_gpu", data.batch_size_per_gpu), ("--repeat_aug", data.repeat_aug),
                        ("--accum_iter", optim.accum_iter), ("--epochs", optim.epochs),
                        ("--num_frames", data.num_frames), ("--img_size", data.img_size),
                        ("--log_interval", run.log_interval), ("--num_checkpoint_del", run.keep_checkpoints),
                        ("--checkpoint_period", run.checkpoint_period),
                        ("--pipeline_segment_batches", data.pipeline_segment_batches),
                        ("--decoder_threads", data.decoder_threads)):
        if value < 1:
            raise ConfigError(f"{flag} {value}: must be >= 1")
    if not 0.0 <= data.flip_prob <= 1.0:
        raise ConfigError(f"--flip_prob {data.flip_prob}: must be in [0, 1]")
    if not 0.0 <= data.max_bad_sample_fraction <= 1.0:
        raise ConfigError(f"--max_bad_sample_fraction {data.max_bad_sample_fraction}: must be in [0, 1]")
    if run.compile_blocks not in COMPILE_BLOCKS:
        raise ConfigError(f"--compile_blocks {run.compile_blocks!r}: one of {', '.join(COMPILE_BLOCKS)}")
    if run.gil_switch_interval_ms <= 0:
        raise ConfigError(f"--gil_switch_interval_ms {run.gil_switch_interval_ms}: must be > 0")
    if data.augment_ahead < 0:
        raise ConfigError(f"--augment_ahead {data.augment_ahead}: must be >= 0 (0 augments inline)")
    if data.pipelines_per_gpu < 0:
        raise ConfigError(f"--pipelines_per_gpu {data.pipelines_per_gpu}: must be >= 1, or 0 for the default")
    if optim.warmup_epochs < 0 or optim.warmup_epochs > optim.epochs:
        raise ConfigError(f"--warmup_epochs {optim.warmup_epochs}: must be in [0, --epochs {optim.epochs}]")
    if not 0.0 < optim.layer_decay <= 1.0:
        raise ConfigError(f"--layer_decay {optim.layer_decay}: must be in (0, 1]")
    if optim.clip_grad is not None and optim.clip_grad <= 0:
        raise ConfigError(f"--clip_grad {optim.clip_grad}: must be > 0 (leave it out to not clip)")
    if run.zero_stage is not None and run.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"--zero_stage {run.zero_stage}: must be 0, 1, 2 or 3")
    if run.eval_only and run.mode != "finetune":
        raise ConfigError("--eval evaluates a classifier: use it with --mode finetune")
    if run.eval_only and not (run.finetune or run.resume):
        raise ConfigError("--eval needs weights: pass --finetune <weights> or --resume <checkpoint|auto>")
    if not (run.eval_only or run.export) and not data.train_shards:
        raise ConfigError("--train_shards is missing: pass the packed training shards (or synthetic:N)")
    if run.mode == "finetune" and not run.export and not data.val_shards:
        raise ConfigError("--val_shards is missing: finetuning evaluates on it every epoch")
    if run.mode == "pretrain" and (data.mixup > 0 or data.cutmix > 0):
        raise ConfigError("--mixup/--cutmix apply to finetuning only (--mode finetune)")


def _value(group, flag: str, dest: str, type_, help: str, aliases: Tuple[str, ...] = (),
           default_text: Optional[str] = None, **kwargs) -> None:
    """A flag with a value; its help ends with the default, read from the dataclasses (defaults live there)."""
    kwargs.setdefault("metavar", None if "choices" in kwargs else _METAVARS[type_])
    group.add_argument(flag, *aliases, dest=dest, type=type_, default=None,
                       help=f"{help} (default: {default_text or _default_text(dest)})", **kwargs)


def _switch(group, name: str, dest: str, help: str) -> None:
    """--name / --no_name for a boolean whose default lives in the dataclass."""
    default = _default_text(dest)
    turn_off = f"; --no_{name} turns it off" if default == "on" else ""
    group.add_argument(f"--{name}", dest=dest, action="store_const", const=True, default=None,
                       help=f"{help} (default: {default}{turn_off})")
    group.add_argument(f"--no_{name}", dest=dest, action="store_const", const=False, default=None,
                       help=argparse.SUPPRESS)


def _flag(group, flag: str, dest: str, const: bool, help: str, default_text: str) -> None:
    group.add_argument(flag, dest=dest, action="store_const", const=const, default=None,
                       help=f"{help} (default: {default_text})")


_METAVARS = {int: "N", float: "X", str: "NAME"}


def _default_text(dest: str) -> str:
    """The dataclass default of `dest` ("section.field") as --help prints it, with finetuning's own if it has one."""
    section, name = dest.split(".")
    text = _format_default(getattr(getattr(JobConfig(), section), name))
    if dest in FINETUNE_DEFAULTS:
        text += f"; finetune: {_format_default(FINETUNE_DEFAULTS[dest])}"
    return text


def _format_default(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    if value is None or value == "":
        return "none"
    return str(value)

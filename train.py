"""MAE-ST pretraining and finetuning on DeepSpeed: `deepspeed train.py --mode {pretrain,finetune} ...`.

Reads top to bottom: config -> distributed -> model + engine (mae_st/engine/build.py) + resume -> data -> epochs
-> export.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

import torch

from mae_st.config import ConfigError, JobConfig, parse_job_config
from mae_st.engine.build import build_engine
from mae_st.data.augment import build_batch_transform
from mae_st.engine.checkpoint import check_resume_layout, export_weights, load_checkpoint, resolve_resume
from mae_st.engine.data import build_eval_data, build_train_data
from mae_st.engine.distributed import DistEnv, exit_without_native_teardown, init_distributed, shutdown_distributed
from mae_st.engine.metrics import RunLogger
from mae_st.engine.schedule import base_lr, effective_batch
from mae_st.engine.trainer import StopSignal, Trainer, TrainState, evaluate
from mae_st.models import load_checkpoint_file, load_encoder_into_classifier

log = logging.getLogger("train")


def main(argv: Optional[List[str]] = None) -> None:
    cfg = parse_job_config(argv)
    sys.setswitchinterval(cfg.run.gil_switch_interval_ms / 1000)  # before any data thread starts
    env = init_distributed()
    setup_logging(env)
    run_job(cfg, env)
    shutdown_distributed()


def run_job(cfg: JobConfig, env: DistEnv) -> None:
    """Pretraining, finetuning, --eval or --export, as the config says."""
    run = cfg.run
    finetune = run.mode == "finetune"

    resume = checked(lambda: resolve_resume(run.resume, run.output_dir), "--resume")
    if resume is not None:
        checked(lambda: check_resume_layout(resume[0] / resume[1], cfg), "--resume")
    pretrained = run.finetune if finetune and run.finetune and resume is None else ""
    load_weights = (lambda model: load_pretrained(model, pretrained)) if pretrained else None
    built = build_engine(cfg, env, load_weights=load_weights)
    engine, dtype = built.engine, built.dtype

    state = TrainState()
    if resume is not None:
        state = TrainState.from_dict(load_checkpoint(engine, *resume))
        log.info("resuming at epoch %d, step %d (global step %d)", state.epoch, state.step_in_epoch,
                 state.global_step)
    elif run.resume == "auto":
        log.info("--resume auto: no complete checkpoint in %s yet, starting fresh", run.output_dir)

    exported = Path(run.output_dir) / f"{run.save_prefix}model.safetensors"
    if run.export:
        export_weights(engine.module, exported, env.is_main, export_metadata(cfg, state))
        return

    logger = RunLogger(run.output_dir, env.is_main, resumed=resume is not None)
    save_run_config(cfg, env)
    eval_data = (checked(lambda: build_eval_data(cfg.data, cfg.model.num_classes, env, dtype, run.output_dir),
                         "--val_shards")
                 if finetune else None)
    if run.eval_only:
        metrics = evaluate_only(engine, eval_data, cfg, env, dtype)
        logger.write({"kind": "eval", "global_step": state.global_step, **metrics})
        logger.close()
        return

    train_data = checked(lambda: build_train_data(cfg.data, run.mode, cfg.model.num_classes, env, run.seed, dtype,
                                                    run.output_dir),
                         "--train_shards")
    steps_per_epoch = optimizer_aligned_steps(len(train_data), run.max_steps_per_epoch, cfg.optim.accum_iter)
    eff_batch = effective_batch(cfg.data.batch_size_per_gpu, cfg.data.repeat_aug, cfg.optim.accum_iter,
                                env.world_size)
    peak_lr = base_lr(cfg.optim, eff_batch)
    log.info("effective batch %d clips, peak lr %.3g, %d steps per epoch", eff_batch, peak_lr, steps_per_epoch)
    trainer = Trainer(engine, cfg, env, built.loss_fn, logger, peak_lr, steps_per_epoch, StopSignal(),
                      batch_transform=build_batch_transform(cfg.data, run.mode, cfg.model.num_classes))

    while state.epoch < cfg.optim.epochs:
        trainer.train_epoch(train_data, state)
        if finetune:
            metrics = trainer.evaluate(eval_data, cfg.model.num_classes)
            improved = metrics["acc1"] > state.best_acc1
            state.best_acc1 = max(state.best_acc1, metrics["acc1"])
            logger.write({"kind": "eval", "epoch": state.epoch - 1, "global_step": state.global_step,
                          "best_acc1": state.best_acc1, **metrics})
            log.info("epoch %d: top-1 %.2f%%, top-5 %.2f%% (best %.2f%%)", state.epoch - 1, metrics["acc1"],
                     metrics["acc5"], state.best_acc1)
            if improved:
                export_weights(engine.module, Path(run.output_dir) / f"{run.save_prefix}best.safetensors", env.is_main,
                               export_metadata(cfg, state))
        trainer.save_at_epoch_end(state)

    export_weights(engine.module, exported, env.is_main, export_metadata(cfg, state))
    logger.close()


def setup_logging(env: DistEnv) -> None:
    logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING,
                        format=f"[rank{env.rank}] %(asctime)s %(levelname)s %(name)s: %(message)s", force=True)


def load_pretrained(model: torch.nn.Module, path: str) -> None:
    """Pretrained MAE-ST encoder (ours or the original's release) into the classifier, before ZeRO partitions it."""
    weights = checked(lambda: load_checkpoint_file(path), f"--finetune {path}")
    report = checked(lambda: load_encoder_into_classifier(model, weights), f"--finetune {path}")
    log.info("loaded %s: %d unused keys (decoder), new: %s, resized: %s", path, len(report.unused_keys),
             report.missing_keys, report.interpolated_keys)


def optimizer_aligned_steps(loader_steps: int, cap: int, accum_iter: int) -> int:
    """Micro-steps per epoch: the loader's (capped by --max_steps_per_epoch), cut to whole optimizer steps."""
    steps = min(loader_steps, cap) if cap > 0 else loader_steps
    if steps < accum_iter:
        raise ConfigError(f"--accum_iter {accum_iter} is more than the {steps} steps an epoch has")
    return steps - steps % accum_iter


def evaluate_only(engine, eval_data, cfg: JobConfig, env: DistEnv, dtype: torch.dtype) -> dict:
    """--eval: multi-view top-1/top-5 of the loaded weights."""
    metrics = evaluate(engine, eval_data, cfg.model.num_classes, env.device, dtype)
    log.info("eval: top-1 %.2f%%, top-5 %.2f%% over %d videos", metrics["acc1"], metrics["acc5"], metrics["videos"])
    return metrics


def save_run_config(cfg: JobConfig, env: DistEnv) -> None:
    """<output_dir>/config.json: the whole JobConfig, so tools (tools/visualize.py) rebuild the run's model."""
    if env.is_main:
        Path(cfg.run.output_dir, "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")


def export_metadata(cfg: JobConfig, state: TrainState) -> dict:
    return {"model": cfg.model.name, "mode": cfg.run.mode, "epoch": str(state.epoch),
            "global_step": str(state.global_step), "num_frames": str(cfg.data.num_frames),
            "img_size": str(cfg.data.img_size), "t_patch_size": str(cfg.model.t_patch_size)}


def checked(action, flag: str):
    """Runs `action`; a missing or unfitting file becomes a ConfigError naming the flag it came from."""
    try:
        return action()
    except ConfigError:
        raise
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"{flag}: {err}") from err


if __name__ == "__main__":
    try:
        main()
    except ConfigError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        sys.exit(2)
    exit_without_native_teardown()

"""Run by tests/test_engine.py through the deepspeed launcher on 2 CPU ranks: the Trainer's micro-steps on real
ZeRO-3 engines when one rank's loss is NaN, and when one rank is SIGTERMed, with the skip decided by the engine's
own gradient-norm check (train.py's ZeRO-3 default) and by the host check before backward; and one rank SIGTERMed
after an epoch's last step. Rank 0 writes, for each, every rank's step results and when each rank agreed to stop
(or whether it stopped and what it saved), to the JSON path given as the only argument."""

from __future__ import annotations

import sys
from pathlib import Path

import deepspeed.comm as dist
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mae_st.config import JobConfig  # noqa: E402
from mae_st.engine.build import build_engine  # noqa: E402
from mae_st.engine.distributed import exit_without_native_teardown  # noqa: E402
from mae_st.engine.metrics import RunLogger  # noqa: E402
from mae_st.engine.schedule import apply_lr  # noqa: E402
from mae_st.engine.checkpoint import checkpoint_root, complete_tags  # noqa: E402
from mae_st.engine.trainer import RunStopped, StopSignal, Trainer, TrainState  # noqa: E402
from tests.zero3_layer_decay import report_path, write_rank0_report  # noqa: E402

NAN_STEP, STOP_STEP = 1, 2  # rank 1's batch at NAN_STEP is NaN; rank 1 is signalled before STOP_STEP


def finetune_config() -> JobConfig:
    cfg = JobConfig()
    cfg.run.mode, cfg.model.name, cfg.model.num_classes = "finetune", "vit_tiny_patch8", 4
    cfg.data.img_size, cfg.data.num_frames, cfg.data.batch_size_per_gpu = 32, 4, 2
    cfg.model.drop_path_rate, cfg.model.dropout = 0.0, 0.0  # no random draws: the runs differ in their forwards
    return cfg


def run(env, check_loss_first, with_nan: bool) -> dict:
    cfg = finetune_config()
    built = build_engine(cfg, env)
    apply_lr(built.engine.optimizer, 3e-3)
    stop = StopSignal()
    trainer = Trainer(built.engine, cfg, env, built.loss_fn, RunLogger("", is_main=False, resumed=False), 3e-3, 1,
                      stop, check_loss_first=check_loss_first)
    state = TrainState()
    generator = torch.Generator().manual_seed(100 + env.rank)
    losses, stopping = [], []
    for step in range(4):
        clips = torch.randn(2, 3, 4, 32, 32, generator=generator)
        targets = torch.randint(0, 4, (2,), generator=generator)
        if step == NAN_STEP:
            if not with_nan:
                continue  # the run without the bad batch: what the skipped step must leave behind
            if env.rank == 1:
                clips[0, 0, 0, 0, 0] = float("nan")
        if step == STOP_STEP and env.rank == 1:
            stop.requested = True  # what StopSignal's SIGTERM handler does
        loss = trainer._micro_step(clips, targets, state)
        mean = torch.tensor([float("nan") if loss is None else float(loss)])
        dist.all_reduce(mean)  # NaN if any rank skipped
        losses.append(mean.item() / env.world_size)
        stopping.append(trainer.stopping)
    result = {"check_loss_first": trainer.check_loss_first, "losses": losses, "skipped": state.skipped_steps,
              "stopping": stopping}
    built.engine.destroy()
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, result)
    return {"ranks": gathered}


def stop_at_epoch_end(env, output_dir: str) -> dict:
    """Rank 1 SIGTERMed after an epoch's last step (during its evaluation): both ranks save at once and stop, though
    no checkpoint was due that epoch."""
    cfg = finetune_config()
    cfg.run.output_dir, cfg.run.checkpoint_period, cfg.optim.epochs = output_dir, 10, 3
    built = build_engine(cfg, env)
    stop = StopSignal()
    trainer = Trainer(built.engine, cfg, env, built.loss_fn, RunLogger("", is_main=False, resumed=False), 3e-3, 1,
                      stop)
    state = TrainState()
    trainer._micro_step(torch.randn(2, 3, 4, 32, 32), torch.zeros(2, dtype=torch.long), state)
    state.epoch, state.global_step = 1, 1  # where train_epoch leaves the first epoch
    stop.requested = env.rank == 1
    try:
        trainer.save_at_epoch_end(state)
        stopped = False
    except RunStopped:
        stopped = True
    built.engine.destroy()
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, {"stopped": stopped, "tags": complete_tags(checkpoint_root(output_dir))})
    return {"ranks": gathered}


def skip_and_stop_report(env) -> dict:
    return {"world size": env.world_size,
            "engine check": run(env, None, with_nan=True),
            "host check": run(env, True, with_nan=True),
            "without the bad batch": run(env, None, with_nan=False),
            "stopped at the epoch's end": stop_at_epoch_end(env, str(report_path().parent / "run"))}


if __name__ == "__main__":
    write_rank0_report(skip_and_stop_report)
    exit_without_native_teardown()

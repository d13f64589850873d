"""The training loop on a DeepSpeed engine: steps, lr schedule, non-finite loss skipping, checkpoints on schedule
or SIGTERM, and multi-view evaluation for finetuning.

Position bookkeeping counts micro-batches (what the data iterator delivered); DeepSpeed counts optimizer steps.
A run resumes at (epoch, step_in_epoch): the loader starts that epoch at that step (`set_epoch(epoch, step)`),
and every random draw of a step (the batch transform's mixup/cutmix and erasing, masks, drop path) comes from
generators seeded by (seed, rank, step), so the resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, Optional

import torch
import torch.nn.functional as F

from mae_st.config import JobConfig
from mae_st.data.augment import BatchTransform
from mae_st.data.views import MultiViewAggregator
from mae_st.engine.checkpoint import save_checkpoint
from mae_st.engine.distributed import DeferredAnyRank, DistEnv, any_rank, any_rank_now, seed_step
from mae_st.engine.metrics import IntervalMeter, RunLogger
from mae_st.engine.schedule import apply_lr, lr_at

log = logging.getLogger(__name__)

LossFn = Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]


class NonFiniteLossError(RuntimeError):
    """The loss stayed NaN/inf for too many consecutive steps."""


class RunStopped(SystemExit):
    """Raised after the checkpoint a SIGTERM asked for is written; exits with 128 + SIGTERM."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


@dataclass
class TrainState:
    """Where the run is; saved with every checkpoint as DeepSpeed client state."""

    epoch: int = 0
    step_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    global_step: int = 0  # micro-batches consumed since the start of the run
    skipped_steps: int = 0  # micro-batches dropped for a non-finite loss
    best_acc1: float = -1.0

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: Dict[str, Any]) -> "TrainState":
        return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved})


class StopSignal:
    """Remembers a SIGTERM so the loop can checkpoint at the next optimizer step instead of dying mid-save. This is
    the rank's own request; the Trainer stops when the ranks have agreed on it (`Trainer.stopping`)."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        log.warning("SIGTERM received: saving a checkpoint at the next optimizer step, then stopping")
        self.requested = True


def engine_skips_nonfinite_steps(engine) -> bool:
    """Whether `engine.step()` itself skips, on every rank, a step whose gradients are not finite. ZeRO-3's step
    checks the global gradient norm (all-reduced) and skips the update when it is NaN/inf (deepspeed stage3.py
    `step`: `is_invalid_grad_norm`); with one micro-step an optimizer step, that is the skip of one non-finite
    loss. Other stages (stage 1/2 with bf16 does not check) and gradient accumulation (a skip would drop the
    other micro-steps' gradients too) keep the check before backward."""
    return engine.zero_optimization_stage() == 3 and engine.gradient_accumulation_steps() == 1


def nan_unless_finite(loss: torch.Tensor) -> torch.Tensor:
    """`loss` unchanged if finite, else with NaN gradients for every parameter it reaches (NaN * 0 is NaN), so the
    engine's gradient-norm check is sure to skip the step. Computed on the device: no host sync."""
    return loss * torch.where(torch.isfinite(loss.detach()), 1.0, float("nan"))


def build_loss_fn(mode: str, smoothing: float) -> LossFn:
    """pretrain: the MAE's own reconstruction loss; finetune: cross-entropy on hard (smoothed) or mixed targets."""
    if mode == "pretrain":
        return lambda engine, clips, targets: engine(clips)[0]

    def classification_loss(engine, clips: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = engine(clips).float()
        if targets.ndim == 2:  # mixup/cutmix soft targets already carry the smoothing
            return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, targets, label_smoothing=smoothing)

    return classification_loss


class Trainer:
    """Runs epochs of micro-steps on `engine`; owns the schedule, skipping and save policy."""

    def __init__(self, engine, cfg: JobConfig, env: DistEnv, loss_fn: LossFn, logger: RunLogger,
                 peak_lr: float, steps_per_epoch: int, stop: StopSignal,
                 batch_transform: Optional[BatchTransform] = None, check_loss_first: Optional[bool] = None):
        self.engine, self.cfg, self.env, self.loss_fn, self.logger = engine, cfg, env, loss_fn, logger
        self.batch_transform = batch_transform
        self.peak_lr, self.steps_per_epoch, self.stop = peak_lr, steps_per_epoch, stop
        # None: check the loss on the host before backward only where the engine does not skip non-finite steps
        # itself; True is the check everywhere (a benchmark's A/B: it costs a host sync a step)
        self.check_loss_first = (not engine_skips_nonfinite_steps(engine) if check_loss_first is None
                                 else check_loss_first)
        self.stop_votes = DeferredAnyRank(env.device)
        self.stopping = False  # all ranks agreed to stop: some rank was SIGTERMed
        self.dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
        self.nonfinite_streak = 0
        self.save_pending = False
        self.shown_loss = float("nan")  # the progress bar's loss: the last logging interval's mean

    # ---- training ----------------------------------------------------------------------------------------------

    def train_epoch(self, loader: Iterable, state: TrainState) -> None:
        """Runs the rest of `state.epoch` (from state.step_in_epoch) and leaves state at the next epoch's start."""
        run, total = self.cfg.run, self.steps_per_epoch
        self.engine.train()
        batches = self._batches_from(loader, state)
        meter = IntervalMeter()
        self.logger.start_epoch(state.epoch, total, state.step_in_epoch)
        while state.step_in_epoch < total:
            started = time.perf_counter()
            batch = next(batches)
            data_wait = time.perf_counter() - started
            lr = self._set_lr(state)
            seed_step(self.cfg.run.seed, self.env.rank, state.global_step)
            clips, targets = batch.clips, batch.labels
            if self.batch_transform is not None:
                clips, targets = self.batch_transform(clips, targets)
            loss = self._micro_step(clips, targets, state)
            meter.add(loss, clips.shape[0], data_wait)
            state.step_in_epoch += 1
            state.global_step += 1
            self.logger.advance({"loss": self.shown_loss, "lr": lr})
            if state.global_step % run.log_interval == 0 or state.step_in_epoch == total:
                self._log_interval(meter, state, lr)
            if run.save_every_steps and state.global_step % run.save_every_steps == 0:
                self.save_pending = True
            if state.step_in_epoch < total:  # the epoch's last step is saved by `save_at_epoch_end`
                self._save_if_due(state)
        # the epoch may end before the loader's (--max_steps_per_epoch): closing it now frees its pipelines and
        # decoder memory before evaluation, and settles its counters for the data record
        getattr(batches, "close", lambda: None)()
        self._log_data(loader, state)
        state.epoch, state.step_in_epoch = state.epoch + 1, 0
        self.logger.end_epoch()

    def save_at_epoch_end(self, state: TrainState) -> None:
        """Call after the epoch's evaluation, so the saved state includes its result. A SIGTERM since the last step
        (during evaluation, say) is agreed on here at once, so the run saves and stops now rather than two steps
        into the next epoch (the step votes are read a step late); after the last epoch the run ends anyway."""
        if state.epoch < self.cfg.optim.epochs:  # one host sync an epoch
            self.stopping = self.stopping or any_rank_now(self.stop.requested, self.env.device)
        epoch_due = state.epoch % self.cfg.run.checkpoint_period == 0 or state.epoch == self.cfg.optim.epochs
        self.save_pending = self.save_pending or epoch_due
        self._save_if_due(state)

    def _batches_from(self, loader: Iterable, state: TrainState) -> Iterator:
        """This epoch's batches from state.step_in_epoch on (a resumed run's position)."""
        loader.set_epoch(state.epoch, state.step_in_epoch)
        return iter(loader)

    def _log_data(self, loader, state: TrainState) -> None:
        """The data source's counters (samples, bad samples and their keys) as a log.jsonl record."""
        self.logger.write({"kind": "data", "epoch": state.epoch, "global_step": state.global_step,
                           **loader.stats_record()})

    def _set_lr(self, state: TrainState) -> float:
        lr = lr_at(state.epoch + state.step_in_epoch / self.steps_per_epoch, self.peak_lr, self.cfg.optim)
        apply_lr(self.engine.optimizer, lr)
        return lr

    def _micro_step(self, clips: torch.Tensor, targets: torch.Tensor, state: TrainState) -> Optional[torch.Tensor]:
        """Forward, backward and step unless any rank's loss is non-finite; returns the detached loss where the
        step was taken (None if skipped). The loss is read on the host only at log intervals (IntervalMeter): a
        `.item()` per step would make the host wait for the GPU to finish the step before launching the next one.
        Where the engine skips non-finite steps itself (ZeRO-3), nothing here waits for the GPU: whether the step
        was skipped comes from the engine's own norm check, and the ranks' stop votes arrive a step late."""
        begin_graph_step()
        loss = self.loss_fn(self.engine, clips.to(self.dtype), targets)
        if self.check_loss_first:
            return self._step_if_finite(loss, state)
        self.engine.backward(nan_unless_finite(loss))
        self.engine.step()
        self.stopping = self.stop_votes(self.stop.requested) or self.stopping
        if not self.engine.was_step_applied():
            self._count_nonfinite(state)
            return None
        self.nonfinite_streak = 0
        return loss.detach()

    def _step_if_finite(self, loss: torch.Tensor, state: TrainState) -> Optional[torch.Tensor]:
        """Backward and step after every rank's loss was found finite on the host: one sync a step. The flags are
        written on the device (a host tensor copied there would sync once more), reduced in one all-reduce and
        read in one go."""
        flags = loss.new_zeros(2, dtype=torch.float32)
        flags[0] = ~torch.isfinite(loss.detach())
        if self.stop.requested:
            flags[1] = 1.0
        nonfinite, stop = any_rank(flags).tolist()
        self.stopping = self.stopping or bool(stop)  # one rank was signalled: all of them stop together
        if nonfinite:
            # with ZeRO the step is collective: skipping backward and step on every rank keeps them in lockstep
            self._count_nonfinite(state)
            return None
        self.nonfinite_streak = 0
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach()

    def _count_nonfinite(self, state: TrainState) -> None:
        state.skipped_steps += 1
        self.nonfinite_streak += 1
        log.warning("non-finite loss or gradients at step %d (epoch %d): skipped (%d in a row, %d in total)",
                    state.global_step, state.epoch, self.nonfinite_streak, state.skipped_steps)
        if self.nonfinite_streak > self.cfg.run.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"the loss was NaN/inf for {self.nonfinite_streak} consecutive steps (limit "
                f"RunConfig.max_nonfinite_steps={self.cfg.run.max_nonfinite_steps}) at step {state.global_step}; "
                "stopping. The last good checkpoint is kept; lower --blr/--lr, set --clip_grad, or check the data.")

    def _log_interval(self, meter: IntervalMeter, state: TrainState, lr: float) -> None:
        record = {"kind": "train", "epoch": state.epoch, "step": state.step_in_epoch,
                  "global_step": state.global_step, "lr": lr, **meter.summary(self.env.world_size),
                  "grad_norm": _finite_or_none(self.engine.get_global_grad_norm()),
                  "skipped_steps": state.skipped_steps}
        self.logger.write(record)
        self.shown_loss = record["loss"]
        meter.reset()

    def _save_if_due(self, state: TrainState) -> None:
        """Saves when a save is due or SIGTERM arrived, but only between optimizer steps: DeepSpeed does not
        checkpoint a half-accumulated gradient."""
        if not (self.save_pending or self.stopping) or not self._at_optimizer_boundary():
            return
        save_checkpoint(self.engine, self.cfg.run.output_dir, state.global_step, self.client_state(state),
                        self.cfg.run.keep_checkpoints, self.env.is_main)
        self.save_pending = False
        if self.stopping:
            log.warning("stopped by SIGTERM after saving step %d; continue with --resume auto", state.global_step)
            raise RunStopped()

    def _at_optimizer_boundary(self) -> bool:
        return self.engine.micro_steps % self.engine.gradient_accumulation_steps() == 0

    def client_state(self, state: TrainState) -> Dict[str, Any]:
        return {**state.to_dict(), "config": dataclasses.asdict(self.cfg)}

    # ---- evaluation --------------------------------------------------------------------------------------------

    def evaluate(self, loader: Iterable, num_classes: int) -> Dict[str, float]:
        metrics = evaluate(self.engine, loader, num_classes, self.env.device, self.dtype)
        self.engine.train()
        return metrics


@torch.no_grad()
def evaluate(engine, loader: Iterable, num_classes: int, device: torch.device, dtype: torch.dtype) -> Dict[str, float]:
    """Multi-view top-1/top-5 over all ranks' videos. With ZeRO-3 every forward is collective, so ranks that ran
    out of batches keep forwarding their last one (discarded) until every rank is done."""
    engine.eval()
    aggregator = MultiViewAggregator(num_classes)
    batches, last = iter(loader), None
    while True:
        batch = next(batches, None)
        if not any_rank_now(batch is not None, device):
            break
        if batch is None and last is None:
            raise RuntimeError("this rank has no evaluation videos while others do; use fewer ranks or more videos")
        clips = (batch or last).clips
        begin_graph_step()
        logits = engine(clips.to(dtype))
        if batch is not None:
            aggregator.update(logits, batch.labels, batch.video_ids)
            last = batch
    aggregator.all_gather()
    return aggregator.accuracy()


def begin_graph_step() -> None:
    """Tells CUDA graph trees (compiled blocks replaying CUDA graphs, --compile_blocks graphs) that a new step
    begins: the previous step's graph outputs are dead, so their memory may be reused. Without it, a replay while an
    output the trees think alive is pending re-records or fails. Nothing happens where no graph is recorded."""
    torch.compiler.cudagraph_mark_step_begin()


def _finite_or_none(value) -> Optional[float]:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None

"""Run observability on rank 0: a tqdm bar, `<output_dir>/log.jsonl` records, TensorBoard when installed."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from tqdm import tqdm

log = logging.getLogger(__name__)

LOG_NAME = "log.jsonl"


class IntervalMeter:
    """Accumulates one logging interval: mean loss, clips/s and the share of wall time spent waiting for data.

    Losses are summed where they were computed (the GPU) and read once per interval, in `summary`."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.started = time.perf_counter()
        self.loss_sum: Union[float, torch.Tensor] = 0.0
        self.losses, self.clips, self.data_wait = 0, 0, 0.0

    def add(self, loss: Optional[torch.Tensor], clips: int, data_wait: float) -> None:
        """`loss`: the step's loss tensor, None for a step skipped for a non-finite loss."""
        if loss is not None:
            self.loss_sum, self.losses = loss.detach().float() + self.loss_sum, self.losses + 1
        self.clips += clips
        self.data_wait += data_wait

    def summary(self, world_size: int) -> Dict[str, float]:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        return {
            "loss": float(self.loss_sum) / self.losses if self.losses else float("nan"),
            "clips_per_s": self.clips * world_size / elapsed,  # every rank runs the same step count
            "data_wait_frac": min(self.data_wait / elapsed, 1.0),
        }


def bar_rates(record: Dict[str, Any]) -> Dict[str, str]:
    """The throughput part of a train record as the bar shows it: clips/s over all ranks, % of time waiting
    for data (high: the input pipeline, not the model, sets the pace)."""
    return {"clips/s": f"{record['clips_per_s']:.1f}", "data_wait": f"{100 * record['data_wait_frac']:.0f}%"}


class RunLogger:
    """Writes records only on the main rank; other ranks hold a no-op logger."""

    def __init__(self, output_dir: str, is_main: bool, resumed: bool):
        self.is_main = is_main
        self.bar: Optional[tqdm] = None
        self._step_values: Dict[str, str] = {}  # loss and lr of the last step
        self._rates: Dict[str, str] = {}  # the last logging interval's throughput, shown until the next one
        self._file = None
        self._tb = None
        if not is_main:
            return
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        self._file = open(Path(output_dir) / LOG_NAME, "a" if resumed else "w")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            log.info("tensorboard is not installed; logging to %s only", LOG_NAME)
        else:
            self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def start_epoch(self, epoch: int, total: int, done: int) -> None:
        if self.is_main:
            self.bar = tqdm(total=total, initial=done, desc=f"epoch {epoch}", dynamic_ncols=True, mininterval=1.0)

    def advance(self, postfix: Dict[str, float]) -> None:
        """One step done; `postfix` (loss, lr) goes on the bar beside the last interval's clips/s and data wait."""
        if self.bar is not None:
            self.bar.update(1)
            self._step_values = {k: f"{v:.4g}" for k, v in postfix.items()}
            self._show()

    def _show(self) -> None:
        # no refresh here: tqdm redraws at its next update, at most once per mininterval
        self.bar.set_postfix({**self._step_values, **self._rates}, refresh=False)

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def write(self, record: Dict[str, Any]) -> None:
        """One JSON line (and TensorBoard scalars under `kind/name`, x = global step)."""
        if not self.is_main:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if record.get("kind", "train") == "train" and "clips_per_s" in record:
            self._rates = bar_rates(record)
            if self.bar is not None:
                self._show()
        if self._tb is not None:
            kind, step = record.get("kind", "train"), record.get("global_step", 0)
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("global_step", "kind"):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        self.end_epoch()
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()

"""What every benchmark section shares: the size profile, the section context (deadline, prior results, rows
written as they are measured) and the timed loop that turns a batch stream into a rate.

Sections run in child processes of `bench.py`; a child reads its `SectionContext` from a JSON file and appends
each result row to a JSON-lines file at once, so a crash or a kill keeps everything measured before it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Sizes:
    """Every size and step count of a run; `gpu_profile()` is the H100 run, `tiny_profile()` the CPU check."""

    # footage
    videos: int = 48
    seconds: float = 10.0
    width: int = 342
    height: int = 256
    fps: int = 30
    # clips
    num_frames: int = 16
    img_size: int = 224
    sampling_rate: int = 8  # pretraining
    finetune_sampling_rate: int = 4
    repeat_aug: int = 16
    # DALI pipeline throughput
    pipeline_batch: int = 2  # videos per step (pretraining)
    finetune_batch: int = 4
    num_threads: int = 8
    sweep_batches: Tuple[int, ...] = (4, 8)
    sweep_threads: Tuple[int, ...] = (4,)
    sweep_prefetch: Tuple[int, ...] = (3,)
    loader_warmup: int = 3  # untimed batches at the start of every epoch
    loader_steps: int = 20
    loader_seconds: float = 8.0  # cap per measurement, warm-up included
    # classic loader
    classic_workers: Tuple[int, ...] = (8, 16)
    classic_steps: int = 1000  # in effect, until classic_seconds
    classic_seconds: float = 12.0
    # model
    matmul_n: int = 8192
    mae_model: str = "mae_vit_huge_patch14"
    vit_model: str = "vit_huge_patch14"
    pretrain_clips: int = 16
    finetune_clips: int = 16  # halved until it fits
    model_variants: Tuple[str, ...] = ("pretrain-z3", "pretrain-z3-ckpt", "pretrain-z0", "finetune-z3")
    model_warmup: int = 3
    model_steps: int = 10
    e2e_steps: int = 20


def gpu_profile() -> Sizes:
    return Sizes()


def tiny_profile() -> Sizes:
    """Everything shrunk so that every code path runs in a few minutes on a 2-core CPU."""
    return Sizes(
        videos=12, seconds=2.0, width=128, height=96, fps=15,
        num_frames=8, img_size=32, sampling_rate=2, finetune_sampling_rate=2, repeat_aug=4,
        pipeline_batch=2, finetune_batch=2, num_threads=2, sweep_batches=(1,), sweep_threads=(1,),
        sweep_prefetch=(3,), loader_warmup=1, loader_steps=3, loader_seconds=60.0,
        classic_workers=(1, 2), classic_steps=2, classic_seconds=60.0,
        matmul_n=256, mae_model="mae_vit_tiny_patch8", vit_model="vit_tiny_patch8",
        pretrain_clips=4, finetune_clips=2, model_warmup=1, model_steps=2, e2e_steps=2,
    )


def sizes_from_dict(raw: Dict[str, Any]) -> Sizes:
    """Inverse of dataclasses.asdict for `Sizes` (JSON turns tuples into lists)."""
    return Sizes(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


@dataclass
class SectionContext:
    """What a section child knows: sizes, device request, folders, its deadline and earlier sections' rows."""

    sizes: Sizes
    device: str  # "auto", "cuda" or "cpu"
    work_dir: str  # scratch space (footage, shards)
    out_dir: str  # what comes back to the user (logs, JSON)
    deadline: float  # time.time() by which the section must have finished
    rows_path: str
    prior: Dict[str, List[dict]] = field(default_factory=dict)  # section -> its rows
    photos: Optional[str] = None
    shards: List[str] = field(default_factory=list)  # user-given shard sets ("name=path" or "path")

    def emit(self, row: dict) -> dict:
        """Appends one result row to the section's rows file (flushed now) and prints it."""
        with open(self.rows_path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        print("  " + "  ".join(f"{k}={_short(v)}" for k, v in row.items()), flush=True)
        return row

    def measure(self, label: dict, measurement: Callable[[], dict]) -> dict:
        """Emits `label` with what `measurement()` returns, or with its traceback when it fails, so one failing
        configuration costs its own row, not the rest of the section."""
        try:
            result = measurement()
        except Exception:  # noqa: BLE001 - reported in the row; the section goes on
            traceback.print_exc()
            result = {"error": traceback.format_exc()}
        return self.emit({**label, **result})

    def seconds_left(self) -> float:
        return self.deadline - time.time()

    def prior_rows(self, section: str) -> List[dict]:
        return self.prior.get(section, [])

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> "SectionContext":
        raw = json.loads(path.read_text())
        raw["sizes"] = sizes_from_dict(raw["sizes"])
        return cls(**raw)


def child_env() -> dict:
    """The environment for a subprocess that imports the project (mae_st, benchmarks, tests) from the repo root."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def resolve_device(request: str):
    """The torch device a section runs on: "auto" takes the GPU when there is one."""
    import torch  # the orchestrating parent never imports torch (nor initialises CUDA)

    if request == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but torch sees no GPU (torch.cuda.is_available() is False)")
    if request == "auto":
        request = "cuda" if torch.cuda.is_available() else "cpu"
    if request == "cuda":
        torch.cuda.set_device(0)
        torch.zeros(1, device="cuda")  # create the CUDA context now, so memory baselines already include it
        return torch.device("cuda", 0)
    return torch.device("cpu")


def sync(device) -> None:
    """Waits for the device's queued work, so a clock reading covers it."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---- timing ---------------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Steps, clips and seconds of the timed part of a run (warm-up batches excluded)."""

    steps: int = 0
    clips: int = 0
    seconds: float = 0.0
    epochs: int = 0

    @property
    def clips_per_s(self) -> Optional[float]:
        return self.clips / self.seconds if self.seconds > 0 else None

    @property
    def seconds_per_step(self) -> Optional[float]:
        return self.seconds / self.steps if self.steps else None


MIN_TIMED_STEPS = 3  # fewer timed batches than this give no usable rate


def time_batches(epoch_batches: Callable[[int], Iterable], clips_in: Callable[[Any], int], *, warmup: int,
                 steps: int, max_seconds: float, sync: Callable[[], None],
                 consume: Callable[[Any], None] = lambda batch: None) -> Timing:
    """Times `steps` batches of an endless stream of epochs, stopping early after `max_seconds`.

    The first `warmup` batches of every epoch are not timed: the stream (re)builds its pipeline or workers and
    fills its prefetch queue there, which a real epoch of hundreds of thousands of videos amortises away but
    the benchmark's few dozen videos would not. A warm-up still running after half of `max_seconds` is cut
    short, so the clock always gets the other half. `consume(batch)` runs inside the clock (a training step).
    """
    timing = Timing()
    started = time.perf_counter()
    for epoch in itertools.count():
        batches = iter(epoch_batches(epoch))
        for _ in itertools.islice(batches, warmup):
            if time.perf_counter() - started > max_seconds / 2:
                break
        sync()
        clock, steps_before = time.perf_counter(), timing.steps
        for batch in batches:
            consume(batch)
            timing.steps += 1
            timing.clips += clips_in(batch)
            if timing.steps >= steps or time.perf_counter() - started > max_seconds:
                break
        sync()
        timing.seconds += time.perf_counter() - clock
        timing.epochs = epoch + 1
        if timing.steps == steps_before:
            raise RuntimeError(f"an epoch ended within its {warmup} warm-up batches, so nothing could be timed: "
                               "make more footage (--videos) or use a smaller batch")
        if timing.steps >= steps or time.perf_counter() - started > max_seconds:
            if timing.steps < min(steps, MIN_TIMED_STEPS):
                # one batch is what the pipeline had prefetched during the warm-up, not a rate
                raise RuntimeError(f"only {timing.steps} batch(es) timed within the {max_seconds:.0f} s cap (the "
                                   "warm-up, e.g. pipeline builds, took the rest): raise --loader-seconds")
            return timing

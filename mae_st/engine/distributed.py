"""Process setup under the DeepSpeed launcher: ranks, the device of this rank, collective helpers."""

from __future__ import annotations

import logging
import os
import random
import sys
from dataclasses import dataclass

import deepspeed
import numpy as np
import torch
from deepspeed.accelerator import get_accelerator


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: its rank, the world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


def init_distributed() -> DistEnv:
    """Joins the process group the DeepSpeed launcher set up (RANK/WORLD_SIZE/LOCAL_RANK in the environment).

    DeepSpeed picks its accelerator itself: CUDA when there is a GPU, its CPU accelerator (gloo/shm) otherwise.
    """
    accelerator = get_accelerator()
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(accelerator.device_name(local_rank))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return DistEnv(rank=deepspeed.comm.get_rank(), world_size=deepspeed.comm.get_world_size(),
                   local_rank=local_rank, device=device)


def shutdown_distributed() -> None:
    """Leaves the process group together, once every rank's work is done (torch asks for this before exit)."""
    barrier()
    deepspeed.comm.destroy_process_group()


def exit_without_native_teardown(code: int = 0) -> None:
    """Ends a finished run with `code`, skipping the C++ static destructors of the comm stack.

    About one CPU launch in 10-20 had a rank abort after all its work, even after `shutdown_distributed`:
    "terminate called without an active exception" (a joinable native thread destroyed at interpreter exit),
    exit -6, so the launcher and any scheduler saw a finished run as failed. Everything the run writes is closed by
    now (checkpoints, exports, log.jsonl), so only the streams need flushing first.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def seed_model_init(seed: int) -> None:
    """The same seed on every rank before the model is built: ZeRO partitions each rank's own copy, so the
    initial weights must agree."""
    _seed_all(seed)


def seed_step(seed: int, rank: int, global_step: int) -> None:
    """Seeds every RNG from (seed, rank, step): masks and dropout then replay exactly after a resume."""
    _seed_all((seed * 1_000_003 + rank * 7_919 + global_step + 1) % 2**32)


def _seed_all(value: int) -> None:
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)  # also seeds every CUDA device


def any_rank(flags: torch.Tensor) -> torch.Tensor:
    """Element-wise logical OR of a small 0/1 flag tensor over all ranks (so all ranks take the same branch)."""
    flags = flags.float()
    deepspeed.comm.all_reduce(flags, op=deepspeed.comm.ReduceOp.MAX)
    return flags > 0


def barrier() -> None:
    deepspeed.comm.barrier()

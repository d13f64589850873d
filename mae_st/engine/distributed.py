"""Process setup: ranks (from the DeepSpeed launcher, or one process without it), the device of this rank,
collective helpers."""

from __future__ import annotations

import logging
import os
import random
import socket
import sys
from dataclasses import dataclass
from typing import Optional, Tuple

import deepspeed
import numpy as np
import torch
from deepspeed.accelerator import get_accelerator

log = logging.getLogger(__name__)

# Set by the DeepSpeed launcher, torchrun or an MPI launcher; with none of them this process is the whole world.
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


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
    """Joins the process group the launcher set up (RANK/WORLD_SIZE/LOCAL_RANK in the environment), or makes
    this process a world of one when it was started without a launcher (`python train.py ...`).

    DeepSpeed picks its accelerator itself: CUDA when there is a GPU, its CPU accelerator (gloo/shm) otherwise.
    """
    if not any(name in os.environ for name in LAUNCHER_ENV):
        set_single_process_env()
    accelerator = get_accelerator()
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(accelerator.device_name(local_rank))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return DistEnv(rank=deepspeed.comm.get_rank(), world_size=deepspeed.comm.get_world_size(),
                   local_rank=local_rank, device=device)


def set_single_process_env() -> None:
    """The environment a launcher would give rank 0 of a world of one.

    Without it DeepSpeed looks for an MPI job (and fails on `import mpi4py` where that is not installed). A
    MASTER_ADDR/MASTER_PORT already set is kept.
    """
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    # a warning, not info: logging is configured only after this, and on a machine with several GPUs the user
    # may have meant to use them all
    log.warning("no launcher environment (RANK/WORLD_SIZE unset): running as a single process on one device, "
                "world size 1 (rendezvous %s:%s); `deepspeed train.py ...` uses several GPUs or nodes",
                os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"])


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it), for a single process's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def any_rank_now(flag: bool, device: torch.device) -> bool:
    """`any_rank` of one host flag, read at once: a host sync (fine once an epoch or an evaluation batch)."""
    return bool(any_rank(device_flag(flag, device))[0])


def device_flag(flag: bool, device: torch.device) -> torch.Tensor:
    """A 0/1 float on `device`, written by a kernel: a tensor made from the host value would be a synchronous copy."""
    local = torch.zeros(1, device=device)
    if flag:
        local.fill_(1.0)
    return local


class DeferredAnyRank:
    """`any_rank` of one flag a call, without the host waiting for the GPU: each call reduces its flag on the device
    and copies the result to host memory behind an event, and returns the previous call's result (False at the
    first). All ranks must call it at the same steps; they then agree at the same step, one late."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pending: Optional[Tuple[torch.Tensor, Optional[torch.cuda.Event]]] = None

    def __call__(self, flag: bool) -> bool:
        previous = self._collect()
        agreed = any_rank(device_flag(flag, self.device))
        if self.device.type == "cuda":
            host = torch.empty(1, dtype=torch.bool, pin_memory=True)
            host.copy_(agreed, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending = (host, event)
        else:
            self.pending = (agreed, None)
        return previous

    def _collect(self) -> bool:
        if self.pending is None:
            return False
        host, event = self.pending
        if event is not None:
            event.synchronize()  # the previous step's end: the GPU has the current step queued behind it
        return bool(host[0])


def barrier() -> None:
    deepspeed.comm.barrier()

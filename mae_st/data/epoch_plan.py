"""Which samples each rank reads in an epoch, and how many steps an epoch has.

Every rank derives the same global order from (seed, epoch): the tars are permuted (samples keep their stored
order inside a tar, so reads stay sequential) and the resulting list is cut into `world_size` contiguous parts.
The parts are disjoint and together cover every sample, so an epoch sees each sample once across ranks.

Inside a rank, the part is cut into one slice per concurrent pipeline ("stream"). Each pass of a stream reads its
slice in a shuffle-buffer order drawn from (seed, epoch, rank, stream, pass); the step -> stream turn order is a
pure function of the slices' batch counts. Everything a step reads thus follows from (seed, epoch, step), and a
resumed run computes where every stream stands instead of reading its way there.
"""

from __future__ import annotations

import random
from typing import Dict, List, Sequence, Tuple

import numpy as np

from mae_st.data.index import SampleRef


def epoch_order(per_tar: Sequence[Sequence[SampleRef]], seed: int, epoch: int, shuffle: bool) -> List[SampleRef]:
    """All samples in this epoch's global order (the same on every rank)."""
    tar_order = list(range(len(per_tar)))
    if shuffle:
        random.Random(f"{seed}:{epoch}").shuffle(tar_order)
    return [sample for t in tar_order for sample in per_tar[t]]


def rank_part(samples: Sequence[SampleRef], rank: int, world_size: int) -> List[SampleRef]:
    """The contiguous part of `samples` that `rank` reads; part sizes differ by at most one."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    n = len(samples)
    return list(samples[n * rank // world_size : n * (rank + 1) // world_size])


def train_steps_per_epoch(num_samples: int, world_size: int, batch_size: int) -> int:
    """Steps every rank runs: the smallest part holds n // world samples; the tail is dropped (drop_last)."""
    steps = (num_samples // world_size) // batch_size
    if steps == 0:
        raise ValueError(f"{num_samples} samples cannot fill one batch of {batch_size} on each of {world_size} "
                         "ranks; use more data, fewer ranks or a smaller DataConfig.batch_size_per_gpu")
    return steps


def sub_parts(part: Sequence[SampleRef], batch_size: int, count: int) -> List[List[SampleRef]]:
    """`count` contiguous slices of a rank's part, cut at batch boundaries (the last may hold a partial batch): one
    per concurrent pipeline. A slice of another size would end in a partial batch mid-epoch."""
    batches = -(-len(part) // batch_size)
    return [list(part[batch_size * (batches * j // count) : batch_size * (batches * (j + 1) // count)])
            for j in range(count)]


def buffered_shuffle(samples: Sequence[SampleRef], buffer: int, rng: np.random.Generator) -> List[SampleRef]:
    """A shuffle-buffer permutation (as streaming readers shuffle): each output is drawn from the next `buffer`
    samples, so reads stay local to a few tars while the order is random and a pure function of `rng`."""
    out: List[SampleRef] = []
    pool = list(samples[:buffer])
    for sample in samples[buffer:]:
        i = int(rng.integers(len(pool)))
        out.append(pool[i])
        pool[i] = sample
    return out + [pool[i] for i in rng.permutation(len(pool))]


def turn_order(batches_per_stream: Sequence[int], steps: int) -> List[int]:
    """Which stream delivers each of `steps` training steps: round robin over the streams with batches left in
    their pass; once every pass is done, all streams start another (bad samples or an uneven split)."""
    if not any(batches_per_stream):
        return []
    left, order, j = list(batches_per_stream), [], 0
    while len(order) < steps:
        if not any(left):
            left = list(batches_per_stream)
        while not left[j]:
            j = (j + 1) % len(left)
        order.append(j)
        left[j] -= 1
        j = (j + 1) % len(left)
    return order


def stream_positions(turns: Sequence[int], batches_per_stream: Sequence[int], step: int) -> List[Tuple[int, int]]:
    """(pass, batch within the pass) each stream is at after `step` steps of `turns`: where a resumed run starts."""
    done = [0] * len(batches_per_stream)
    for j in turns[:step]:
        done[j] += 1
    return [divmod(d, n) if n else (0, 0) for d, n in zip(done, batches_per_stream)]


def group_by_tar(samples: Sequence[SampleRef]) -> List[SampleRef]:
    """`samples` in the order DALI reads them from per-tar index files: tar by tar in order of first appearance,
    each tar's samples in their given order."""
    by_tar: Dict[str, List[SampleRef]] = {}
    for sample in samples:
        by_tar.setdefault(sample.tar, []).append(sample)
    return [s for group in by_tar.values() for s in group]

"""The loader our users run today, rebuilt as the benchmark's baseline.

PyTorch DataLoader workers decode each video with PyAV on the CPU, cut `repeat_aug` clips of `num_frames` frames
every `sampling_rate` frames, random-resized-crop, flip and normalise them with torch on the CPU, and the main
process copies the batch to the GPU: what facebookresearch/mae_st's Kinetics dataset does, reading our shards.
"""

from __future__ import annotations

import io
import itertools
import math
import random
from typing import Iterator, List, Sequence, Tuple

import av
import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds

from mae_st.data.format import META_EXT, VIDEO_EXTS, SampleMeta


def decode_all_frames(video: bytes) -> torch.Tensor:
    """Every frame of an encoded video as a (T, H, W, 3) uint8 tensor."""
    with av.open(io.BytesIO(video)) as container:
        container.streams.video[0].thread_type = "AUTO"
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return torch.from_numpy(np.stack(frames))


def sample_clip(frames: torch.Tensor, num_frames: int, sampling_rate: int) -> torch.Tensor:
    """`num_frames` frames `sampling_rate` apart from a random start; the last frame repeats past the end."""
    span = num_frames * sampling_rate
    start = random.uniform(0, max(frames.shape[0] - span, 0))
    index = torch.linspace(start, start + span - 1, num_frames).clamp(0, frames.shape[0] - 1).long()
    return frames.index_select(0, index)


def random_resized_crop(clip: torch.Tensor, size: int, scale: Sequence[float], ratio: Sequence[float]) -> torch.Tensor:
    """Crop one random box (area share `scale`, aspect `ratio`) shared by all frames of a (T, C, H, W) clip."""
    _, _, height, width = clip.shape
    area = height * width
    for _ in range(10):
        target = area * random.uniform(*scale)
        aspect = math.exp(random.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            y, x = random.randint(0, height - h), random.randint(0, width - w)
            break
    else:
        h = w = min(height, width)
        y, x = (height - h) // 2, (width - w) // 2
    return F.interpolate(clip[:, :, y : y + h, x : x + w], size=(size, size), mode="bilinear", align_corners=False)


class ClassicVideoDataset(torch.utils.data.IterableDataset):
    """Shards in, `(clips (R, C, T, H, W) float, labels (R,))` per video out, decoded in the worker.

    `endless` repeats the shards without end: a benchmark over a few dozen videos then measures the workers'
    steady state, as an epoch of a real data set does, instead of their start-up at every epoch.
    """

    def __init__(self, shard_paths: List[str], num_frames: int, sampling_rate: int, img_size: int,
                 repeat_aug: int, scale=(0.5, 1.0), ratio=(0.75, 1.3333), mean=0.45, std=0.225,
                 endless: bool = False):
        super().__init__()
        self.shard_paths, self.endless = shard_paths, endless
        self.num_frames, self.sampling_rate, self.img_size = num_frames, sampling_rate, img_size
        self.repeat_aug, self.scale, self.ratio, self.mean, self.std = repeat_aug, scale, ratio, mean, std

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        # Every worker reads every shard and decodes every num_workers-th video, as the original's workers split
        # one file list: all workers get work whatever the shard count (reading bytes it skips costs little).
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for _ in itertools.count() if self.endless else range(1):
            samples = wds.WebDataset(self.shard_paths, shardshuffle=False, workersplitter=None, nodesplitter=None,
                                     empty_check=False)
            for sample in itertools.islice(samples, worker, None, workers):
                yield self.augmented_clips(sample)

    def augmented_clips(self, sample: dict) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decode one sample's video and cut `repeat_aug` augmented clips from it."""
        video = next(sample[ext] for ext in VIDEO_EXTS if ext in sample)
        label = SampleMeta.from_json(sample[META_EXT]).label
        frames = decode_all_frames(video)
        clips = []
        for _ in range(self.repeat_aug):
            clip = sample_clip(frames, self.num_frames, self.sampling_rate).permute(0, 3, 1, 2).float() / 255
            clip = random_resized_crop(clip, self.img_size, self.scale, self.ratio)
            if random.random() < 0.5:
                clip = clip.flip(-1)
            clips.append(((clip - self.mean) / self.std).permute(1, 0, 2, 3))
        return torch.stack(clips), torch.full((self.repeat_aug,), label)


def classic_loader(shard_paths: List[str], batch_size: int, num_workers: int, **dataset_kwargs):
    """A DataLoader over `ClassicVideoDataset` that yields `(B * R, C, T, H, W)` batches on the CPU."""
    dataset = ClassicVideoDataset(shard_paths, **dataset_kwargs)

    def collate(items):
        clips, labels = zip(*items)
        return torch.cat(clips), torch.cat(labels)

    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                                       pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0,
                                       prefetch_factor=2 if num_workers > 0 else None)

"""Clips from jpeg-payload shards: the loader picks each clip's frames when it writes a pipeline's index.

A video sample is decoded whole and cut into clips inside the DALI graph. A jpeg-payload sample (`--codec jpeg`
in the packer) stores frame i as the member `<key>.<i:06d>.jpg`, so a clip needs only its own frames. The loader
chooses every clip's start here, with the video graph's temporal sampling (uniform random start for training,
evenly spaced views for evaluation, the last frame repeated past the end), and writes an index line whose
components are named by slot, `f<clip * num_frames + k>`, each pointing at the member of that frame. The
pipeline reads the slots and decodes exactly num_frames images per clip (`mae_st.data.pipeline`).
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torchvision.io import decode_jpeg

from mae_st.config import DataConfig
from mae_st.data.format import META_EXT, is_frame_ext
from mae_st.data.index import SampleRef, member_line, members_of, read_member

VIDEO, FRAMES = "video", "frames"  # the two payloads a shard sample can carry
_SLOT_PREFIX = "f"



def slot_names(num_slots: int) -> List[str]:
    """The component names a frames pipeline reads, clip-major: f0..f(T-1) are clip 0's frames."""
    return [f"{_SLOT_PREFIX}{i}" for i in range(num_slots)]


def payload_of(ref: SampleRef) -> str:
    """FRAMES or VIDEO, from the first member that is not the metadata: a sample holds one kind of media, and
    the loader asks this of every sample at start-up, so it does not parse a frame sample's hundreds of members."""
    first_two_exts = ref.index_line.split(maxsplit=8)[0:5:4]  # ext offset size name ext ...
    media = next((ext for ext in first_two_exts if ext != META_EXT), "")
    return FRAMES if is_frame_ext(media) else VIDEO


def shard_payload(per_tar: Sequence[Sequence[SampleRef]]) -> str:
    """The one payload all samples carry; a set mixing both is an error naming one sample of each."""
    first = {}
    for samples in per_tar:
        for ref in samples:
            first.setdefault(payload_of(ref), ref)
    if len(first) > 1:
        video, frames = first[VIDEO], first[FRAMES]
        raise ValueError(f"the shard set mixes video samples ({video.key} in {video.tar}) with jpeg-frame samples "
                         f"({frames.key} in {frames.tar}); pack each set with one --codec")
    return next(iter(first), VIDEO)


def clip_frame_indices(start: int, count: int, cfg: DataConfig) -> List[int]:
    """Frames start, start + rate, ...; past the end the last frame repeats (as the video graph's)."""
    return [min(start + k * cfg.sampling_rate, count - 1) for k in range(cfg.num_frames)]


def random_starts(count: int, cfg: DataConfig, clips: int, rng: np.random.Generator) -> List[int]:
    """`clips` uniform integer starts in [0, max(count - span, 0)]: the original's random temporal jitter."""
    return [int(s) for s in rng.integers(0, _last_start(count, cfg) + 1, size=clips)]


def uniform_starts(count: int, cfg: DataConfig) -> List[int]:
    """Starts of the test_num_ensemble_views evaluation views, evenly spaced, ends included (use_offset)."""
    last_start, views = _last_start(count, cfg), cfg.test_num_ensemble_views
    if views == 1:
        return [last_start // 2]
    return [(last_start // (views - 1)) * v for v in range(views)]


def clip_starts(count: int, cfg: DataConfig, rng: Optional[np.random.Generator]) -> List[int]:
    """First frames of a sample's clips: repeat_aug random starts drawn from `rng` (training), or the evaluation
    views when `rng` is None."""
    return uniform_starts(count, cfg) if rng is None else random_starts(count, cfg, cfg.repeat_aug, rng)


def sample_clip_indices(count: int, cfg: DataConfig, rng: Optional[np.random.Generator]) -> List[List[int]]:
    """Every clip's frame indices for a sample of `count` frames (`clip_starts`, then `clip_frame_indices`)."""
    return [clip_frame_indices(start, count, cfg) for start in clip_starts(count, cfg, rng)]


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """A generator that depends only on (seed, epoch, sample key): a sample's clips do not change with the order
    in which threads happen to read it, nor with the bad samples around it."""
    key_hash = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng([seed, epoch, key_hash])


def sample_members(ref: SampleRef) -> Dict[str, Tuple[int, int, str]]:
    """ext -> (offset, size, member name) of each member the sample's index line lists."""
    return {ext: (offset, size, name) for ext, offset, size, name in members_of(ref.index_line)}


def with_clip_frames(ref: SampleRef, cfg: DataConfig, rng: Optional[np.random.Generator]) -> SampleRef:
    """`ref` with an index line that makes the pipeline read clip j's k-th frame as slot j * num_frames + k, plus
    the sample's metadata: repeat_aug clips at random starts drawn from `rng` (training), or the evaluation views
    when `rng` is None. The members stay where the packer wrote them."""
    components = members_of(ref.index_line)
    frames = sorted(c for c in components if is_frame_ext(c[0]))  # ext '000012.jpg' sorts as the index
    meta = [c for c in components if c[0] == META_EXT]
    if not frames or not meta:
        raise ValueError(f"sample {ref.key} of {ref.tar} has no frames or no {META_EXT} member; re-pack it")
    indices = [i for clip in sample_clip_indices(len(frames), cfg, rng) for i in clip]
    slots = [(name, *frames[i][1:]) for name, i in zip(slot_names(len(indices)), indices)]
    return replace(ref, index_line=member_line([*slots, meta[0]]))


def undecodable_frame(ref: SampleRef) -> Optional[str]:
    """'<member>: <error>' for the first JPEG of `ref`'s index line that does not decode on the CPU, else None."""
    frames = {name: (offset, size) for ext, offset, size, name in members_of(ref.index_line) if ext != META_EXT}
    with open(ref.tar, "rb") as tar:
        for name, (offset, size) in frames.items():
            try:
                decode_jpeg(torch.frombuffer(bytearray(read_member(tar, offset, size)), dtype=torch.uint8))
            except (RuntimeError, ValueError) as err:
                return f"{name}: {err}"
    return None


def _last_start(count: int, cfg: DataConfig) -> int:
    return max(count - ((cfg.num_frames - 1) * cfg.sampling_rate + 1), 0)

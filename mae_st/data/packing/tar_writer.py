"""Byte-reproducible WebDataset tars and their DALI index files.

Members carry fixed metadata (mtime 0, uid/gid 0, mode 0644) in the POSIX ustar layout, so a tar's bytes and
the offset of every member follow from the member sizes alone: the index is computed, not scanned, and a
finished shard can be recognised on resume by comparing its index and size with the plan.
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from typing import List, Optional, Sequence

from mae_st.data.index import index_text

BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE
MAX_NAME = 100  # ustar name field; our keys are far shorter
TMP_SUFFIX = ".tmp"


@dataclass(frozen=True)
class Member:
    """One file of a sample: its bytes come from `data` or from the file at `path`."""

    name: str  # "<key>.<ext>"
    size: int
    path: Optional[str] = None
    data: Optional[bytes] = None

    @property
    def ext(self) -> str:
        base = self.name[self.name.rfind("/") + 1:]
        return base[base.find(".") + 1:]


def shard_index_text(samples: Sequence[Sequence[Member]]) -> str:
    """The DALI index (`wds2idx` format v1.2) of a tar holding `samples` in this order."""
    lines, offset = [], 0
    for members in samples:
        fields = []
        for member in members:
            fields.append(f"{member.ext} {offset + BLOCK} {member.size} {member.name}")
            offset += BLOCK + _padded(member.size)
        lines.append(" ".join(fields))
    return index_text(lines)


def tar_size(samples: Sequence[Sequence[Member]]) -> int:
    body = sum(BLOCK + _padded(m.size) for members in samples for m in members) + 2 * BLOCK
    return -(-body // RECORD) * RECORD


def shard_is_complete(samples: Sequence[Sequence[Member]], tar_path: str, index_path: str) -> bool:
    """A shard is done when its index (written last) matches the plan and the tar has the planned size."""
    try:
        with open(index_path) as f:
            if f.read() != shard_index_text(samples):
                return False
        return os.path.getsize(tar_path) == tar_size(samples)
    except OSError:
        return False


def write_shard(samples: Sequence[Sequence[Member]], tar_path: str, index_path: str) -> None:
    """Write the tar, then its index, each under a `.tmp` name renamed when complete (never a truncated shard)."""
    too_long = [m.name for members in samples for m in members if len(m.name.encode()) > MAX_NAME]
    if too_long:
        raise ValueError(f"member name {too_long[0]!r} is longer than the ustar limit of {MAX_NAME} bytes")
    tmp = tar_path + TMP_SUFFIX
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for members in samples:
            for member in members:
                with _open(member) as data:
                    tar.addfile(_tar_info(member), data)
    if os.path.getsize(tmp) != tar_size(samples):
        raise RuntimeError(f"{tmp}: size differs from the plan (a source file changed while packing?)")
    os.replace(tmp, tar_path)
    with open(index_path + TMP_SUFFIX, "w") as f:
        f.write(shard_index_text(samples))
    os.replace(index_path + TMP_SUFFIX, index_path)


def _tar_info(member: Member) -> tarfile.TarInfo:
    info = tarfile.TarInfo(member.name)
    info.size, info.mtime, info.mode = member.size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _open(member: Member):
    return io.BytesIO(member.data) if member.data is not None else open(member.path, "rb")


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def sample_members(key: str, video_path: str, video_ext: str, meta_json: bytes) -> List[Member]:
    """The members of a packed sample: the video file (or, for a folder of frames, each frame file in name
    order), then its SampleMeta JSON."""
    if os.path.isdir(video_path):
        files = sorted(os.listdir(video_path))
        media = [Member(f"{key}.{name}", os.path.getsize(os.path.join(video_path, name)),
                        path=os.path.join(video_path, name)) for name in files]
    else:
        media = [Member(f"{key}.{video_ext}", os.path.getsize(video_path), path=video_path)]
    return media + [Member(f"{key}.json", len(meta_json), data=meta_json)]

"""Checks of a shard set against its index files and manifest, at a run's start-up and as a command.

A copy to a cluster file system can stop half-way, a disk can overwrite a block, an index can go missing.
`load_shards` (start-up, and again for a shard whose size or mtime changed since) costs one `stat` a tar: it
reads each index, rebuilds a missing or unreadable one by scanning its tar, and lists as damaged every sample
whose members reach past the end of the tar or that the manifest lists but the shard lacks. `deep_check`
(`python tools/shard_videos.py --verify DIR [--decode]`) also reads every member's tar header and metadata, and
optionally decodes every video.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from mae_st.data.bad_samples import BadSample
from mae_st.data.format import META_EXT
from mae_st.data.index import Member, SampleRef, member_line, members_of, read_index, read_member
from mae_st.data.shards import ShardSet

log = logging.getLogger(__name__)

@dataclass
class ShardContents:
    """The readable samples of every tar (in stored order), the damaged ones, and each tar's (size, mtime)."""

    per_tar: List[List[SampleRef]]
    damaged: List[BadSample] = field(default_factory=list)
    fingerprints: List[Optional[Tuple[int, int]]] = field(default_factory=list)


def load_shards(shards: ShardSet) -> ShardContents:
    contents = ShardContents([])
    for tar, index_path in zip(shards.tars, shards.index_paths):
        samples, damaged, fingerprint = load_shard(tar, index_path, shards.listed_keys.get(tar))
        contents.per_tar.append(samples)
        contents.damaged.extend(damaged)
        contents.fingerprints.append(fingerprint)
    return contents


def load_shard(tar: str, index_path: str, listed_keys: Optional[Sequence[str]] = None):
    """(readable samples, damaged samples, (size, mtime_ns) or None if the tar is gone) of one shard."""
    stamp = fingerprint(tar)
    if stamp is None:
        return [], [BadSample(tar, key, "shard unreadable or missing") for key in listed_keys or []], None
    tar_size = stamp[0]
    samples = _indexed_or_scanned(tar, index_path)
    good, damaged = [], []
    for sample in samples:
        end = max(offset + size for _, offset, size, _ in members_of(sample.index_line))
        if end > tar_size:
            damaged.append(BadSample(tar, sample.key, f"the shard ends at byte {tar_size} but this sample's "
                                                      f"members end at {end} (truncated copy?)"))
        else:
            good.append(sample)
    found = {s.key for s in samples}
    damaged += [BadSample(tar, key, "listed in manifest.csv but not in the shard") for key in listed_keys or []
                if key not in found]
    return good, damaged, stamp


def fingerprint(tar: str) -> Optional[Tuple[int, int]]:
    """(size, mtime_ns) of a tar, None when it cannot be stat'ed: what tells a run that a shard changed."""
    try:
        stat = os.stat(tar)
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def _indexed_or_scanned(tar: str, index_path: str) -> List[SampleRef]:
    try:
        return read_index(tar, index_path)
    except (OSError, ValueError) as err:
        samples = scan_tar(tar)
        log.warning("index of %s unreadable (%s): rebuilt from the tar's headers (%d samples); `python "
                    "tools/shard_videos.py --verify` lists what else is damaged", tar, err, len(samples))
        return samples


def scan_tar(tar: str) -> List[SampleRef]:
    """The samples of a tar from its headers, as `wds2idx` would index them; stops at the first damaged header
    (what follows it cannot be located)."""
    groups: Dict[str, List[Member]] = {}
    try:
        with tarfile.open(tar, "r:") as archive:
            for info in archive:
                if info.isfile():
                    base = info.name[info.name.rfind("/") + 1:]
                    dot = base.find(".")
                    if dot > 0:
                        key = info.name[: len(info.name) - len(base) + dot]
                        groups.setdefault(key, []).append((base[dot + 1:], info.offset_data, info.size, info.name))
    except (tarfile.TarError, OSError, EOFError) as err:
        log.warning("%s: scanning stopped at a damaged header (%s)", tar, err)
    return [SampleRef(tar, key, member_line(members)) for key, members in groups.items()]


def deep_check(sample: SampleRef, handle, decode: bool = False) -> Optional[str]:
    """Why `sample` cannot be read (its tar headers, its metadata, optionally its video), or None."""
    try:
        for ext, offset, size, name in members_of(sample.index_line):
            header = tarfile.TarInfo.frombuf(read_member(handle, offset - tarfile.BLOCKSIZE, tarfile.BLOCKSIZE),
                                             tarfile.ENCODING, "surrogateescape")
            if header.name != name or header.size != size:
                raise ValueError(f"the tar header at {offset - tarfile.BLOCKSIZE} names {header.name!r} "
                                 f"({header.size} bytes), the index {name!r} ({size} bytes)")
            data = read_member(handle, offset, size)
            if ext == META_EXT:
                meta = json.loads(data)
                if meta.get("key") != sample.key:
                    raise ValueError(f"{name} describes sample {meta.get('key')!r}")
            elif decode:
                _decode(data, ext)
    except (tarfile.TarError, ValueError, UnicodeDecodeError) as err:
        return f"{type(err).__name__}: {err}"
    except Exception as err:  # a decoder's own error types
        return f"undecodable: {type(err).__name__}: {err}"
    return None


def _decode(data: bytes, ext: str) -> None:
    import io

    if ext.endswith("jpg"):
        import torch
        from torchvision.io import decode_jpeg

        decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        return
    import av

    with av.open(io.BytesIO(data)) as container:
        frames = sum(1 for _ in container.decode(video=0))
    if frames == 0:
        raise ValueError("no video frames decoded")


@dataclass
class VerifyReport:
    samples: int  # samples the index files (or scans) list
    damaged: List[BadSample]
    rebuilt_indexes: List[str]  # tars whose index was missing or unreadable


def verify_shard_set(shards: ShardSet, decode: bool = False, progress=None) -> VerifyReport:
    """Every check a run does at start-up, plus each member's tar header and metadata (and with `decode` each
    video's frames) read back."""
    contents = load_shards(shards)
    rebuilt = [t for t, i in zip(shards.tars, shards.index_paths) if not os.path.isfile(i)]
    damaged = list(contents.damaged)
    for samples in contents.per_tar:
        if not samples:
            continue
        with open(samples[0].tar, "rb") as handle:
            for sample in samples:
                reason = deep_check(sample, handle, decode)
                if reason is not None:
                    damaged.append(BadSample(sample.tar, sample.key, reason))
                if progress is not None:
                    progress()
    total = sum(len(s) for s in contents.per_tar) + len(contents.damaged)
    return VerifyReport(total, damaged, rebuilt)

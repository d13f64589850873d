"""DALI webdataset index files: read the samples a tar holds, write an index for any subset of them.

`fn.readers.webdataset` seeks through a tar using an index file (`v1.2 <count>` then one line per sample listing
`<ext> <offset> <size> <name>` for each member). Writing our own index for a subset of samples is how the loader
shards by rank, orders an epoch and drops samples known to be corrupt, all without touching the tars.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Sequence, Tuple

log = logging.getLogger(__name__)

INDEX_VERSION = "v1.2"
Member = Tuple[str, int, int, str]  # ext, data offset, size, member name: one group of an index line


@dataclass(frozen=True)
class SampleRef:
    """One sample of a shard: which tar, its key and the index line that locates its members."""

    tar: str
    key: str
    index_line: str


def declared_count(header: str, index_path: str) -> int:
    """Samples an index declares in its header line (`v1.2 <count>`)."""
    fields = header.split()
    if len(fields) != 2 or fields[0] != INDEX_VERSION or not fields[1].isdigit():
        raise ValueError(f"{index_path}: not a DALI webdataset index ('{INDEX_VERSION} <count>' header expected); "
                         "rebuild it with the packer or wds2idx")
    return int(fields[1])


def index_text(lines: Sequence[str]) -> str:
    """An index file's text: the header, then one line per sample."""
    return f"{INDEX_VERSION} {len(lines)}\n" + "".join(line + "\n" for line in lines)


def read_index(tar: str, index_path: str) -> List[SampleRef]:
    """Samples of `tar` in stored order, as listed by its DALI index file."""
    lines = Path(index_path).read_text().splitlines()
    declared = declared_count(lines[0] if lines else "", index_path)
    samples = [SampleRef(tar, _key_of(line, index_path), line) for line in lines[1:] if line.strip()]
    if declared != len(samples):
        raise ValueError(f"{index_path}: header declares {declared} samples but lists {len(samples)}; rebuild it")
    return samples


def read_shard_indexes(tars: Sequence[str], index_paths: Sequence[str]) -> List[List[SampleRef]]:
    """Samples of every tar; a tar whose index cannot be read is logged and contributes no samples."""
    if len(tars) != len(index_paths):
        raise ValueError(f"got {len(tars)} tars but {len(index_paths)} index files; they must pair up")
    per_tar = []
    for tar, index_path in zip(tars, index_paths):
        try:
            if not Path(tar).is_file():
                raise FileNotFoundError(f"shard {tar} does not exist")
            per_tar.append(read_index(tar, index_path))
        except (OSError, ValueError) as err:
            log.error("skipping unreadable shard %s: %s", tar, err)
            per_tar.append([])
    return per_tar


def members_of(index_line: str) -> List[Member]:
    """(ext, data offset, size, member name) of each member an index line lists."""
    fields = index_line.split()
    return [(fields[i], int(fields[i + 1]), int(fields[i + 2]), fields[i + 3]) for i in range(0, len(fields), 4)]


def member_line(members: Iterable[Member]) -> str:
    """The index line listing `members` (the inverse of `members_of`)."""
    return " ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in members)


def read_member(handle, offset: int, size: int) -> bytes:
    """`size` bytes at `offset` of an open tar; a tar that ends sooner is a ValueError."""
    handle.seek(offset)
    data = handle.read(size)
    if len(data) != size:
        raise ValueError(f"the tar ends after {len(data)} of {size} bytes")
    return data


def write_index(samples: Iterable[SampleRef], index_path: str) -> None:
    """Write an index listing `samples` (all from one tar) in the given order."""
    Path(index_path).write_text(index_text([s.index_line for s in samples]))


def _key_of(index_line: str, index_path: str) -> str:
    fields = index_line.split()
    if len(fields) < 4 or len(fields) % 4:
        raise ValueError(f"{index_path}: malformed line {index_line!r} (expected groups of 'ext offset size name')")
    name = fields[3]
    # as webdataset does: the key is everything before the first dot of the file name (folders included)
    dot = name.find(".", name.rfind("/") + 1)
    return name if dot < 0 else name[:dot]

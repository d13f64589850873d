"""Resolve a shard set (folder, brace pattern, glob or manifest.csv) into tars, index files and sample counts.

The DALI reader takes `tars` + `index_paths` as its `paths`/`index_paths`. A listed tar that is missing is an
error that names the file, never a silently smaller set; a missing index is not (it is derived data: the loader
rebuilds it from the tar, `mae_st.data.verify`).
"""

from __future__ import annotations

import csv
import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from braceexpand import braceexpand

from mae_st.data.format import MANIFEST_NAME, SHARD_SUFFIX, index_name_for
from mae_st.data.index import SampleRef, declared_count, read_shard_indexes

_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class ShardSet:
    """Tars of one set in order, the DALI index of each, and how many samples each holds."""

    tars: List[str]
    index_paths: List[str]
    counts: List[int]
    # tar -> the keys manifest.csv lists for it (empty without a manifest): what a damaged shard should hold
    listed_keys: Dict[str, List[str]] = field(default_factory=dict, compare=False)

    @property
    def total(self) -> int:
        return sum(self.counts)

    def __len__(self) -> int:
        return len(self.tars)


def list_shards(spec: str) -> ShardSet:
    """A folder (its manifest.csv if present, else every `*.tar`), a manifest.csv, or a brace/glob pattern
    like `data/train-{000000..000009}.tar`; counts come from the manifest or the index files."""
    if not spec:
        raise ValueError("no shard set given: pass the packer's output folder, a manifest.csv or a pattern like "
                         "'data/train-{000000..000009}.tar'")
    if os.path.isdir(spec):
        manifest = os.path.join(spec, MANIFEST_NAME)
        if os.path.isfile(manifest):
            return _from_manifest(manifest)
        return _from_tars(sorted(glob.glob(os.path.join(glob.escape(spec), "*" + SHARD_SUFFIX))), spec)
    if spec.endswith(".csv"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"manifest {spec} not found")
        return _from_manifest(spec)
    return _from_tars(_expand_pattern(spec), spec)


def list_samples(spec: str) -> List[SampleRef]:
    """Every sample of a shard set (anything `list_shards` takes), tar by tar, in index order."""
    shards = list_shards(spec)
    return [ref for refs in read_shard_indexes(shards.tars, shards.index_paths) for ref in refs]


def read_index_count(index_path: str) -> Optional[int]:
    """Samples an index declares in its header line (`v1.2 <count>`); None when the index file is missing."""
    if not os.path.isfile(index_path):
        return None
    with open(index_path) as f:
        return declared_count(f.readline(), index_path)


def _from_manifest(manifest: str) -> ShardSet:
    keys: Dict[str, List[str]] = {}
    with open(manifest, newline="") as f:
        for row in csv.DictReader(f):
            keys.setdefault(row["shard"], []).append(row["key"])
    if not keys:
        raise ValueError(f"manifest {manifest} lists no samples")
    folder = Path(manifest).parent
    tars = [str(folder / name) for name in sorted(keys)]
    shard_set = _from_tars(tars, manifest, {str(folder / name): len(k) for name, k in keys.items()})
    shard_set.listed_keys.update({str(folder / name): k for name, k in keys.items()})
    for tar, indexed in zip(shard_set.tars, shard_set.counts):
        listed = len(keys[Path(tar).name])
        if indexed != listed:
            raise ValueError(f"shard {tar}: manifest {manifest} lists {listed} samples but its index has {indexed}; "
                             "the folder mixes two packer runs, re-pack it")
    return shard_set


def _from_tars(tars: Sequence[str], spec: str, listed: Optional[Dict[str, int]] = None) -> ShardSet:
    if not tars:
        raise FileNotFoundError(f"no shards ({SHARD_SUFFIX}) found for {spec!r}; pass the packer's output folder, "
                                "a manifest.csv or a pattern like 'data/train-{000000..000009}.tar'")
    index_paths = [index_name_for(tar) for tar in tars]
    for tar, index_path in zip(tars, index_paths):
        if not os.path.isfile(tar):
            raise FileNotFoundError(f"shard {tar} listed by {spec!r} but not found")
    counts = [read_index_count(p) for p in index_paths]
    # a missing index counts what the manifest lists (or 0): the loader rebuilds it and names what is lost
    counts = [(listed or {}).get(t, 0) if c is None else c for t, c in zip(tars, counts)]
    return ShardSet(list(tars), index_paths, counts)


def _expand_pattern(spec: str) -> List[str]:
    paths: List[str] = []
    for expanded in braceexpand(spec):
        paths.extend(sorted(glob.glob(expanded)) if _GLOB_CHARS & set(expanded) else [expanded])
    return paths

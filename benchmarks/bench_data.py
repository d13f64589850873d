"""Section `data`: film the benchmark footage and pack it with the project's packer, once per codec.

The packer (`pack_videos`, the API behind tools/shard_videos.py) runs first with its default settings, then for
each of h264/vp9/jpeg that the default did not already produce. Later sections find the shard sets in this section's
rows (or in `--shards`).
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from benchmarks.harness import SectionContext
from benchmarks.make_bench_videos import Footage, make_bench_videos
from mae_st.data.format import MANIFEST_NAME, SHARD_SUFFIX
from mae_st.data.packing import PackOptions, pack_videos

CODECS = ("h264", "vp9", "jpeg")  # packed besides the default, when the default is none of them


@dataclass(frozen=True)
class ShardSet:
    """One packed shard folder the benchmarks read."""

    name: str
    path: str
    codec: str
    default: bool  # packed with the packer's default settings (the set the headline figures use)

    def tars(self) -> List[str]:
        return sorted(glob.glob(os.path.join(self.path, "*" + SHARD_SUFFIX)))


def run_data(ctx: SectionContext) -> None:
    sizes = ctx.sizes
    raw = Path(ctx.work_dir) / "raw"
    footage = Footage(count=sizes.videos, seconds=sizes.seconds, fps=sizes.fps, height=sizes.height,
                      width=sizes.width, photos=ctx.photos)
    started = time.perf_counter()
    paths = make_bench_videos(footage, raw, processes=min(os.cpu_count() or 1, sizes.videos))
    seconds = time.perf_counter() - started
    ctx.emit({"step": "footage", "videos": len(paths), "MB": _megabytes(paths), "seconds": seconds,
              "videos/s": len(paths) / seconds, "size": f"{sizes.width}x{sizes.height}",
              "frames/video": int(sizes.seconds * sizes.fps)})

    default_codec = PackOptions(out_dir="").codec
    pack(ctx, raw, "default", PackOptions(out_dir="", data_dirs=[str(raw)]))
    for codec in CODECS:
        if codec != default_codec:
            pack(ctx, raw, codec, PackOptions(out_dir="", data_dirs=[str(raw)], codec=codec))


def pack(ctx: SectionContext, raw: Path, name: str, options: PackOptions) -> None:
    """Packs `raw` with the packer's Python API (what tools/shard_videos.py runs) into <work>/shards/<name>."""
    out = Path(ctx.work_dir) / "shards" / name
    options = dataclasses.replace(options, out_dir=str(out), prefix="train", progress=False)
    result = pack_videos(options)
    ctx.emit({"step": "pack", "set": name, "codec": manifest_codec(out, options.codec), "path": str(out),
              "default": name == "default", "videos": result.samples, "shards": len(result.shards),
              "MB": result.bytes / 1e6, "seconds": result.seconds, "videos/s": result.samples / result.seconds,
              "rejected": result.rejected, "reused shards": result.reused_shards, "mean frames": mean_frames(out),
              "settings": f"crf {options.crf or 'default'}, short side {options.short_side or 'kept'}"})


def shard_sets(ctx: SectionContext) -> List[ShardSet]:
    """The sets to benchmark: `--shards` when given, else what the `data` section packed; default set first."""
    if ctx.shards:
        given = []
        for i, spec in enumerate(ctx.shards):
            name, _, path = spec.rpartition("=")
            given.append(ShardSet(name=name or Path(path).name, path=path,
                                  codec=manifest_codec(Path(path), "unknown"), default=i == 0))
        return given
    packed = [ShardSet(name=r["set"], path=r["path"], codec=r["codec"], default=r["default"])
              for r in ctx.prior_rows("data") if r.get("step") == "pack"]
    if not packed:
        raise RuntimeError("no shard sets: the data section made none (see its error above); pass --shards")
    return sorted(packed, key=lambda s: not s.default)


def manifest_rows(folder: Path) -> List[dict]:
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def manifest_codec(folder: Path, fallback: str) -> str:
    """The codec the packer wrote (manifest.csv's codec column), or `fallback` without a manifest."""
    codecs = {row.get("codec", "") for row in manifest_rows(folder)} - {""}
    return "+".join(sorted(codecs)) if codecs else fallback


def mean_frames(folder: Path) -> Optional[float]:
    frames = [float(row["frames"]) for row in manifest_rows(folder) if row.get("frames")]
    return sum(frames) / len(frames) if frames else None


def _megabytes(paths) -> float:
    return sum(os.path.getsize(p) for p in paths) / 1e6

"""Benchmark footage with real image content: camera pans and zooms over scikit-learn's sample photographs.

Flat synthetic frames compress to nothing and decode unrealistically fast; pans over photographs give the
bitrate and motion of real 256p footage. Written as high-quality H.264 "camera originals" that the benchmark then
packs with `tools/shard_videos.py`, exactly as a user's footage would be.

    python benchmarks/make_bench_videos.py --out_dir /tmp/bench_raw --count 24 [--processes 8]

Video i depends only on (seed, i), so any number of processes writes the same footage.
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from functools import partial
from pathlib import Path
from typing import List, Optional

import av
import numpy as np
import torch
import torch.nn.functional as F


def load_photos(npz_path: str | None) -> list:
    """scikit-learn's two sample photographs, or the same arrays from an .npz (for machines without sklearn)."""
    if npz_path:
        with np.load(npz_path) as archive:
            return [archive[name] for name in archive.files]
    from sklearn.datasets import load_sample_images

    return load_sample_images().images


def camera_path_frames(photo: np.ndarray, num_frames: int, height: int, width: int,
                       rng: np.random.Generator) -> np.ndarray:
    """A (T, H, W, 3) uint8 clip of a window that pans and zooms across `photo`."""
    image = torch.from_numpy(np.array(photo)).permute(2, 0, 1)[None].float()
    ph, pw = photo.shape[:2]
    zoom0, zoom1 = rng.uniform(0.45, 0.9, 2)
    (x0, y0), (x1, y1) = rng.uniform(0, 1, (2, 2))
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        a = t / max(num_frames - 1, 1)
        zoom = zoom0 + (zoom1 - zoom0) * a
        ch, cw = int(ph * zoom), int(ph * zoom * width / height)
        cw = min(cw, pw)
        top = int((ph - ch) * (y0 + (y1 - y0) * a))
        left = int((pw - cw) * (x0 + (x1 - x0) * a))
        crop = image[:, :, top : top + ch, left : left + cw]
        frame = F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)[0]
        frames[t] = frame.clamp(0, 255).byte().permute(1, 2, 0).numpy()
    return frames


def write_h264(path: Path, frames: np.ndarray, fps: int) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


@dataclass(frozen=True)
class Footage:
    """What to film: `count` videos of `seconds` at `fps`, `width` x `height`, from the photographs."""

    count: int = 24
    seconds: float = 10.0
    fps: int = 30
    height: int = 256
    width: int = 342
    seed: int = 0
    photos: Optional[str] = None  # .npz of photographs; scikit-learn's sample images when None


def write_bench_video(footage: Footage, out_dir: Path, index: int) -> Path:
    """Writes video `index` as <out_dir>/class_<index % 4>/clip_<index>.mp4 (four classes, for the packer)."""
    torch.set_num_threads(1)  # one video per process; the pool provides the parallelism
    photos = load_photos(footage.photos)
    rng = np.random.default_rng([footage.seed, index])
    frames = camera_path_frames(photos[index % len(photos)], int(footage.seconds * footage.fps), footage.height,
                                footage.width, rng)
    folder = out_dir / f"class_{index % 4}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"clip_{index:04d}.mp4"
    write_h264(path, frames, footage.fps)
    return path


def make_bench_videos(footage: Footage, out_dir: str | Path, processes: int = 1) -> List[Path]:
    """Writes all `footage.count` videos under `out_dir` with `processes` worker processes."""
    out = Path(out_dir)
    write = partial(write_bench_video, footage, out)
    if processes <= 1:
        return [write(i) for i in range(footage.count)]
    with ProcessPoolExecutor(max_workers=processes) as pool:
        return list(pool.map(write, range(footage.count)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=342)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--photos", default=None, help="an .npz of RGB photographs to use instead of sklearn's")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    footage = Footage(count=args.count, seconds=args.seconds, fps=args.fps, height=args.height, width=args.width,
                      seed=args.seed, photos=args.photos)
    paths = make_bench_videos(footage, args.out_dir, args.processes)
    print(f"wrote {len(paths)} videos under {args.out_dir}")


if __name__ == "__main__":
    main()

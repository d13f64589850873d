"""Packing throughput of `tools/shard_videos.py` per codec: videos/s per core (one worker) for copy and each
transcode, on clips the script films itself (default 10 s of 320x240 at 30 fps, H.264 like a camera's).

    python benchmarks/bench_packer.py [--videos 4 --seconds 10 --width 320 --height 240 --fps 30]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from mae_st.data.packing import PackOptions, pack_videos  # noqa: E402
from mae_st.data.packing.transcode import CODECS  # noqa: E402
from tests.video_factory import moving_square_frames, write_video  # noqa: E402


def film_clips(folder: Path, args: argparse.Namespace) -> list:
    frames = int(args.seconds * args.fps)
    return [write_video(folder / f"clip{i}.mp4", moving_square_frames(frames, args.height, args.width, seed=i),
                        fps=args.fps) for i in range(args.videos)]


def bench_codec(codec: str, raw: Path, out: Path, args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    result = pack_videos(PackOptions(out_dir=str(out / codec), data_dirs=[str(raw)], no_labels=True, codec=codec,
                                     workers=args.workers, progress=False))
    seconds = time.perf_counter() - started
    return {"codec": codec, "videos": result.samples, "seconds": seconds,
            "per_core": result.samples / seconds / args.workers, "MB": result.bytes / 1e6,
            "kB/video": result.bytes / 1e3 / max(result.samples, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--workers", type=int, default=1, help="worker processes (1 = per-core figures)")
    parser.add_argument("--codecs", nargs="+", default=list(CODECS), choices=CODECS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_packer_") as tmp:
        raw = Path(tmp) / "raw"
        film_clips(raw, args)
        rows = [bench_codec(codec, raw, Path(tmp) / "out", args) for codec in args.codecs]
    print(f"{args.videos} clips of {args.seconds:g} s {args.width}x{args.height} @ {args.fps} fps (H.264 source), "
          f"{args.workers} worker(s), {os.cpu_count()} cores on this machine")
    print(f"{'codec':<6} {'videos':>6} {'seconds':>8} {'videos/s/core':>14} {'x realtime/core':>16} {'kB/video':>9}")
    for r in rows:
        realtime = r["per_core"] * args.seconds
        print(f"{r['codec']:<6} {r['videos']:>6} {r['seconds']:>8.2f} {r['per_core']:>14.2f} {realtime:>16.1f} "
              f"{r['kB/video']:>9.1f}")


if __name__ == "__main__":
    main()

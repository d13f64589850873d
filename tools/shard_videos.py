"""Pack folders of raw video into WebDataset tar shards that mae_st's DALI pipeline reads at full speed.

    python tools/shard_videos.py --data_dirs raw/train --out_dir shards/train --prefix train
    python tools/shard_videos.py --file_list val.csv --out_dir shards/val --prefix val --short_side 320
    python tools/shard_videos.py --data_dirs footage/ --no_labels --segment_seconds 10 --out_dir shards/pretrain
    python tools/shard_videos.py --verify shards/train [--decode]   # check a copied set before a long run

Inputs: video files found recursively under --data_dirs (by their extension: .mp4, .mkv, .webm, .mov, .avi, ...,
SCANNED_VIDEO_EXTS in mae_st/data/packing/inputs.py), labelled by their class folder (the first folder below the
data dir; sorted names -> indices), or the rows `path[,label]` of --file_list (relative paths from the CSV's
folder; labels all indices or all names). --no_labels packs unlabelled footage (label -1). Pack each split into
its own --out_dir.

Output in --out_dir: <prefix>-000000.tar ... (samples shuffled with --seed; each sample is <key>.<webm|mp4|...>
and <key>.json), <prefix>-000000.idx (DALI index), manifest.csv, labels.json, summary.json, failures.csv (every
input that was not packed, with the reason) and skipped.csv (every other file under --data_dirs: not a video by
its extension, hidden, or in a hidden or linked folder, with the reason). Every file ends in the manifest (maybe
as several segments), in failures.csv or in skipped.csv, and the last line printed counts each. Output is
byte-identical for the same inputs, settings and seed; a rerun of an interrupted command resumes (finished files
and shards are kept), and a shard only appears under its final name once complete.

Default codec VP9 (webm): the packed set decodes on the GPU (NVDEC, ~22 videos/s vs ~8-12 for H.264 on an H100
for 300-frame 256p clips) AND on DALI's CPU decoder, which reads VP8/VP9/MJPEG only; files are also the smallest.
Measured here (benchmarks/bench_packer.py, 10 s 320x240 30 fps clips, one core): VP9 (libvpx realtime,
cpu-used 8) packs 3.5 videos/s, H.264 4.3, HEVC 0.9, copy ~10; packing happens once, decoding every epoch.
Keyframes every 1 s by default (--gop): a clip read at random starts at most 1 s of frames after a keyframe, so
seeking decodes little waste, while keyframes stay a small share of the bytes. Transcoding also turns rotated
phone footage upright, makes the frame rate constant, removes B-frames and rounds sizes to even numbers.
--codec copy stores the original files unchanged (each is fully decoded once to check it).
--codec jpeg stores every frame as its own JPEG (<key>.000000.jpg, ...), so a clip is read and decoded frame by
frame (on the DALI CPU threads by default; --jpeg_decode_device gpu for nvJPEG) instead of decoding a whole video
per clip: much faster for one-clip-per-video finetuning, at about 10x the bytes of VP9 (--fps and --short_side
shrink it). See docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `mae_st` importable

from mae_st.data.packing import PackOptions, pack_videos  # noqa: E402
from mae_st.data.packing.transcode import CODECS  # noqa: E402


def parse_options(argv: Optional[List[str]] = None) -> PackOptions:
    defaults = PackOptions(out_dir="")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dirs", nargs="+", default=[], help="folders scanned recursively for videos")
    p.add_argument("--file_list", default="", help="CSV of path[,label] rows")
    p.add_argument("--out_dir", required=True, help="where the shards and reports go (one folder per split)")
    p.add_argument("--prefix", default=defaults.prefix, help="shard name prefix, e.g. train or val")
    p.add_argument("--no_labels", action="store_true", help="unlabelled footage (pretraining): label -1")
    p.add_argument("--codec", default=defaults.codec, choices=CODECS, help="vp9 (default, see above), h264, "
                   "hevc, jpeg (one image per frame) or copy (store the original bytes; no resize/fps/segments)")
    p.add_argument("--short_side", type=int, help="downscale so the shorter side is this many pixels (e.g. 256, "
                   "320); aspect kept, sizes even, never upscaled")
    p.add_argument("--fps", type=float, help="resample to this frame rate (default: the source's)")
    p.add_argument("--gop", type=int, help="frames between keyframes (default: one keyframe per second)")
    p.add_argument("--crf", type=int, help="quality, lower is better (defaults: vp9 32, h264 23, hevc 28; jpeg: "
                   "quantiser 2-31, default 3)")
    p.add_argument("--segment_seconds", type=float, help="split long recordings into samples of this length")
    p.add_argument("--min_frames", type=int, default=defaults.min_frames, help="reject videos (and drop last "
                   "segments) with fewer frames")
    p.add_argument("--samples_per_shard", type=int, default=defaults.samples_per_shard)
    p.add_argument("--max_shard_bytes", type=int, default=defaults.max_shard_bytes)
    p.add_argument("--seed", type=int, default=defaults.seed, help="shuffles samples across shards")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel worker processes")
    p.add_argument("--timeout", type=float, default=defaults.timeout, help="seconds one file may take before its "
                   "worker is killed and the file rejected (raise it for hour-long recordings)")
    p.add_argument("--dry_run", action="store_true", help="list the inputs and their labels; pack nothing")
    p.add_argument("--keep_staging", action="store_true", help="keep the per-file work folder (.packing)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    return PackOptions(
        out_dir=args.out_dir, data_dirs=args.data_dirs, file_list=args.file_list, prefix=args.prefix,
        no_labels=args.no_labels, codec=args.codec, short_side=args.short_side, fps=args.fps, gop=args.gop,
        crf=args.crf, segment_seconds=args.segment_seconds, min_frames=args.min_frames,
        samples_per_shard=args.samples_per_shard, max_shard_bytes=args.max_shard_bytes, seed=args.seed,
        workers=args.workers, timeout=args.timeout, dry_run=args.dry_run, keep_staging=args.keep_staging,
        progress=not args.no_progress)


def verify(argv: List[str]) -> int:
    """`--verify DIR [--decode]`: exit status 0 when every sample of the set reads back, 1 when some do not."""
    from mae_st.data.shards import list_shards
    from mae_st.data.verify import verify_shard_set

    p = argparse.ArgumentParser(prog="shard_videos.py --verify", description="check a packed (or copied) shard "
                                "set before a long run: sizes against the index files and manifest, every tar "
                                "header and metadata member, and with --decode every video")
    p.add_argument("--verify", required=True, metavar="DIR", help="shard folder, manifest.csv or brace pattern")
    p.add_argument("--decode", action="store_true", help="also decode every video on the CPU (PyAV; slow)")
    args = p.parse_args(argv)
    try:
        report = verify_shard_set(list_shards(args.verify), decode=args.decode)
    except (ValueError, FileNotFoundError) as err:
        print(f"shard_videos: error: {err}", file=sys.stderr)
        return 2
    for tar in report.rebuilt_indexes:
        print(f"index missing or unreadable: {tar} (runs rebuild it from the tar; the packer rewrites it)")
    for bad in report.damaged:
        print(f"damaged: {bad.key} in {bad.tar}: {bad.reason}")
    print(f"{len(report.damaged)} damaged of {report.samples} samples, {len(report.rebuilt_indexes)} missing "
          f"indexes in {args.verify}")
    return 1 if report.damaged or report.rebuilt_indexes else 0


def main(argv: Optional[List[str]] = None) -> int:
    """Exit status 0 when something was packed (or listed by --dry_run), 1 when nothing could be, 2 on bad usage."""
    argv = sys.argv[1:] if argv is None else argv
    if any(arg == "--verify" or arg.startswith("--verify=") for arg in argv):
        return verify(argv)
    options = parse_options(argv)
    try:
        result = pack_videos(options)
    except (ValueError, FileNotFoundError) as err:
        print(f"shard_videos: error: {err}", file=sys.stderr)
        return 2
    print(result.summary_line())
    return 0 if result.dry_run or result.samples else 1


if __name__ == "__main__":
    sys.exit(main())

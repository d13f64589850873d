"""Clips/s of DALI's video decoder per way of selecting frames: the whole video (what the pipeline does today)
against decoding only one clip's frames per sample (`start_frame`/`sequence_length`/`stride`, or `frames=`).

Each variant is a minimal graph, webdataset reader -> `fn.decoders.video`, nothing else. `--pipelines K` runs K
identical pipelines (each reading its 1/K of the shards, `--threads` split among them, as the loader does) and
takes one batch from each in turn while the others decode ahead; the row gives their total rate.

    python benchmarks/bench_decode.py --shards /root/bench/shards/default --pipelines 1,4 --seconds 8
    python benchmarks/bench_decode.py --shards /tmp/shards --device cpu --frames 60 --stride 2 --seconds 3

Variants (a random start is a per-sample uniform integer in [0, frames - span], span = (clip - 1) * stride + 1,
computed in the graph; `--frames` is the footage's frame count, fixed for the benchmark footage):
  full          every frame of the video (today's decode; the clip is cut afterwards by sequence_rearrange)
  range-idx     start_frame=<random>, sequence_length=clip, stride, pad_mode="edge", build_index=True
  range-noidx   the same with build_index=False (no up-front scan of the container)
  range-start0  start_frame=0: the same frames count without any seek (isolates the seek cost)
  frames-list   frames=<per-sample list start + stride * arange(clip)>, pad_mode="edge" (list form of range-idx)
Before timing, `--verify` (default on) decodes one batch both whole and as a clip from the same random starts
and reports the largest mean |difference| between the clip and the frames it should equal (0 when the seek
lands on the right frames; the `full` and `range-start0` rows leave it empty).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.bench_pipeline import release_dali_memory  # noqa: E402
from benchmarks.harness import sync  # noqa: E402

VARIANTS = ("full", "range-idx", "range-noidx", "range-start0", "frames-list")
RANDOM_START = ("range-idx", "range-noidx", "frames-list")  # variants whose frames depend on a random start


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="shard folder of tools/shard_videos.py (tars + .idx)")
    p.add_argument("--batch", type=int, default=4, help="videos per pipeline iteration")
    p.add_argument("--threads", type=int, default=8, help="DALI threads of all pipelines together")
    p.add_argument("--pipelines", default="1", help="concurrent pipelines; a comma list runs each count in turn")
    p.add_argument("--clip", type=int, default=16, help="frames per clip")
    p.add_argument("--stride", type=int, default=8, help="frames between a clip's frames")
    p.add_argument("--frames", type=int, default=300, help="frames per video of the footage")
    p.add_argument("--seconds", type=float, default=15.0, help="timed seconds per row at most (warm-up extra)")
    p.add_argument("--iters", type=int, default=1000, help="timed iterations per row at most")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds (one batch from every pipeline)")
    p.add_argument("--prefetch", type=int, default=2, help="prefetch_queue_depth of every pipeline")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu", help="gpu: decoder device 'mixed' (NVDEC)")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the frame check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the rows (and the settings) to this JSON file")
    args = p.parse_args(argv)
    args.pipelines = [int(k) for k in str(args.pipelines).split(",") if k.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if min(args.pipelines) < 1 or args.batch < 1 or args.clip < 1 or args.stride < 1:
        p.error("--pipelines, --batch, --clip and --stride must be >= 1")
    return args


# ---- graph ------------------------------------------------------------------------------------------------------


def clip_span(args) -> int:
    return (args.clip - 1) * args.stride + 1


def random_start(args):
    """Per-sample uniform integer in [0, frames - span] (scalar INT32 per sample), computed in the graph."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types

    last = max(args.frames - clip_span(args), 0)
    u = fn.random.uniform(range=[0.0, 1.0])  # [0, 1)
    # floor, not a bare cast: DALI's float -> int cast rounds to nearest, which would halve the end points' odds
    start = fn.cast(dmath.floor(u * float(last + 1)), dtype=types.INT32)
    return dmath.min(start, last)


def decode(video, variant: str, args, start=None):
    """`fn.decoders.video` as the variant calls it; `start` (random variants) comes from `random_start`."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    device = "mixed" if args.device == "gpu" else "cpu"
    if variant == "full":
        return fn.decoders.video(video, device=device)
    if variant in ("range-idx", "range-noidx"):
        return fn.decoders.video(video, device=device, start_frame=start, sequence_length=args.clip,
                                 stride=args.stride, pad_mode="edge", build_index=variant == "range-idx")
    if variant == "range-start0":
        return fn.decoders.video(video, device=device, start_frame=0, sequence_length=args.clip,
                                 stride=args.stride, pad_mode="edge")
    if variant == "frames-list":
        offsets = types.Constant(np.arange(args.clip, dtype=np.int32) * args.stride)
        # a per-sample 1-D INT32 list (a 2-D one per sample is refused). pad_mode does apply to
        # `frames`, whatever its doc says: the default "constant" turns indices past the end into black frames
        indices = fn.cast(start + offsets, dtype=types.INT32)
        return fn.decoders.video(video, device=device, frames=indices, pad_mode="edge")
    raise ValueError(variant)


def read(shards, args, seed: int, shard_id: int, num_shards: int):
    """The training reader (`mae_st.data.pipeline._read`), this pipeline's 1/num_shards of the set."""
    import nvidia.dali.fn as fn

    from mae_st.data.format import META_EXT
    from mae_st.data.pipeline import VIDEO_EXT_SET

    video, _meta = fn.readers.webdataset(
        paths=list(shards.tars), index_paths=list(shards.index_paths), ext=[VIDEO_EXT_SET, META_EXT],
        missing_component_behavior="skip", random_shuffle=True, initial_fill=max(1, args.batch), seed=seed,
        shard_id=shard_id, num_shards=num_shards, name="reader")
    return video


def build(shards, variant: str, args, threads: int, seed: int, shard_id: int = 0, num_shards: int = 1,
          verify: bool = False):
    """Timing graph: outputs the decoded frames. Verify graph (random variants): (clip, whole video, start)."""
    from nvidia.dali import pipeline_def

    @pipeline_def
    def graph():
        video = read(shards, args, seed, shard_id, num_shards)
        start = random_start(args) if variant in RANDOM_START else None
        clip = decode(video, variant, args, start)
        if verify:
            return clip, decode(video, "full", args), start
        return clip

    pipe = graph(batch_size=args.batch, num_threads=threads, device_id=0 if args.device == "gpu" else None,
                 seed=seed, prefetch_queue_depth=args.prefetch, exec_dynamic=True)
    pipe.build()
    return pipe


# ---- measurement ------------------------------------------------------------------------------------------------


def torch_device(args) -> torch.device:
    return torch.device("cuda" if args.device == "gpu" else "cpu")


def shape_summary(batch) -> Dict[str, object]:
    """Frames per clip (min..max over the batch) and one sample's full (F, H, W, C) shape."""
    shapes = [tuple(s) for s in batch.shape()]
    frames = sorted({s[0] for s in shapes})
    return {"frames/clip": frames[0] if len(frames) == 1 else f"{frames[0]}..{frames[-1]}", "shape": shapes[0]}


def measure(shards, variant: str, args, k: int) -> Dict[str, object]:
    """Total clips/s of k pipelines taken round-robin, each scheduled ahead like the loader's streams."""
    from benchmarks import gpu_monitor

    threads = max(1, args.threads // k)
    built = time.perf_counter()
    pipes = [build(shards, variant, args, threads, seed=args.seed + 7 * j, shard_id=j, num_shards=k)
             for j in range(k)]
    for pipe in pipes:
        pipe.schedule_run()  # every pipeline starts decoding at once, as the loader's streams do
    build_s = time.perf_counter() - built
    shape: Dict[str, object] = {}
    with gpu_monitor.GpuMonitor() as monitor:
        started = time.perf_counter()
        turn = 0

        def step():
            nonlocal turn
            pipe = pipes[turn % k]
            turn += 1
            (out,) = pipe.outputs()
            pipe.schedule_run()
            return out

        for _ in range(args.warmup * k):  # the first batch pays for each pipeline's start; the cap keeps half
            shape = shape or shape_summary(step())
            if time.perf_counter() - started > args.seconds / 2:
                break
        if not shape:
            shape = shape_summary(step())
        sync(torch_device(args))
        clock, iters = time.perf_counter(), 0
        while iters < args.iters and time.perf_counter() - clock < args.seconds:
            step()
            iters += 1
        sync(torch_device(args))
        seconds = time.perf_counter() - clock
        end = time.time()
    usage = monitor.window(end - seconds, end, None)
    pipes.clear()  # drops the pipelines before the next row builds its own
    release_dali_memory()
    return {"clips/s": iters * args.batch / seconds, **shape, "s/iter": seconds / iters, "iters": iters,
            "threads/pipe": threads, "build s": build_s, "nvdec %": usage["nvdec %"], "sm %": usage["sm %"]}


def verify(shards, variant: str, args) -> Optional[float]:
    """Largest mean |clip frame - whole-video frame it should be| over one batch (None: nothing to check)."""
    if variant not in RANDOM_START:
        return None
    pipe = build(shards, variant, args, max(1, args.threads), seed=args.seed + 12345, verify=True)
    clips, wholes, starts = pipe.run()
    if args.device == "gpu":
        clips, wholes = clips.as_cpu(), wholes.as_cpu()
    worst = 0.0
    for i in range(len(clips)):
        clip, whole, start = np.asarray(clips[i]), np.asarray(wholes[i]), int(np.asarray(starts[i]))
        count = whole.shape[0]
        expected = whole[np.minimum(start + np.arange(args.clip) * args.stride, count - 1)]
        if clip.shape != expected.shape:
            raise RuntimeError(f"sample {i}: clip {clip.shape} but expected {expected.shape} (start {start}, "
                               f"video of {count} frames)")
        diff = np.abs(clip.astype(np.int16) - expected.astype(np.int16)).reshape(args.clip, -1).mean(axis=1)
        worst = max(worst, float(diff.max()))
    del pipe
    release_dali_memory()
    return worst


# ---- table ------------------------------------------------------------------------------------------------------

COLUMNS = (("variant", 13, "{}"), ("pipes", 5, "{}"), ("batch", 5, "{}"), ("clips/s", 8, "{:.1f}"),
           ("frames/clip", 11, "{}"), ("s/iter", 7, "{:.3f}"), ("nvdec %", 7, "{:.0f}"), ("sm %", 5, "{:.0f}"),
           ("verify", 7, "{:.2f}"), ("shape", 18, "{}"))


def fmt_row(row: Dict[str, object]) -> str:
    cells = []
    for name, width, spec in COLUMNS:
        value = row.get(name)
        cells.append(("-" if value is None else spec.format(value)).rjust(width))
    line = "  ".join(cells)
    return line + (f"  ERROR: {row['error']}" if row.get("error") else "")


def header() -> str:
    return "  ".join(name.rjust(width) for name, width, _ in COLUMNS)


def first_lines(err: BaseException, n: int = 3) -> str:
    """The message itself: for a DALI error the lines after its "encountered:" (not the graph's traceback)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if "encountered:" in lines:
        lines = lines[lines.index("encountered:") + 1:]
    lines = [line for line in lines if not line.startswith(("C++ context", "Current pipeline object"))]
    return f"{type(err).__name__}: " + " | ".join(lines[:n])


def device_name(args) -> str:
    if args.device == "gpu":
        try:
            return torch.cuda.get_device_name(0)
        except Exception as err:  # noqa: BLE001 - informational only
            return f"gpu ({err})"
    return f"cpu ({platform.processor() or platform.machine()})"


def main(argv=None) -> int:
    args = parse_args(argv)
    import nvidia.dali as dali

    from mae_st.data.shards import list_shards

    shards = list_shards(args.shards)
    print(f"DALI {dali.__version__} on {device_name(args)}; {shards.total} videos in {len(shards)} shards; "
          f"clip {args.clip} x stride {args.stride} (span {clip_span(args)} of {args.frames} frames); "
          f"batch {args.batch}, {args.threads} threads in all; <= {args.seconds:g} s per row", flush=True)
    print(header(), flush=True)
    rows: List[Dict[str, object]] = []
    for k in args.pipelines:
        for variant in args.variants:
            row: Dict[str, object] = {"variant": variant, "pipes": k, "batch": args.batch}
            try:
                if args.verify and k == args.pipelines[0]:
                    row["verify"] = verify(shards, variant, args)
                row.update(measure(shards, variant, args, k))
            except Exception as err:  # noqa: BLE001 - one variant failing must not end the others
                row["error"] = first_lines(err)
                row["traceback"] = traceback.format_exc()
                release_dali_memory()
            rows.append(row)
            print(fmt_row(row), flush=True)
            if args.out:  # after every row, so a run cut short keeps what it measured
                Path(args.out).write_text(json.dumps({"settings": vars(args), "dali": dali.__version__,
                                                      "device": device_name(args), "rows": rows},
                                                     indent=1, default=str))
    if args.out:
        print(f"wrote {args.out}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Where a reused NVDEC decoder thread's time goes, and what the packer's keyframe interval buys.

Why: the finetuning stream stops near 210 clips/s at 6-8 decoder threads with NVDEC 18-26 % busy (issue 15 wants
300). This tells whether a clip's cost is per video (pointing the decoder at it) or per decoded frame, whether
the library's calls hold the GIL, and how clips/s moves when the footage is packed with shorter GOPs (fewer frames
decoded to reach a clip's frames, more bytes). On an H200 (2026-12-01, docs/performance.md): ~0.12-0.15 ms a
decoded frame and 1.3-2 ms a video; the GIL mostly free; ~16-17 thousand decoded frames/s in all at 8 threads;
shorter GOPs no faster at stride 4 for 1.9-6.1x the bytes, so the packer's default GOP stays.

    source .devcarry/c4/install.sh && python3 benchmarks/nvdec_cost.py --work-dir /root/bench_nvdec --out $OUT/cost
    python benchmarks/nvdec_cost.py --decoder pyav --quick --work-dir /tmp/bn --out /tmp/cost --seconds 6   # CPU

Uses bench_nvdec.py's footage under --work-dir (its data section films and packs it when missing) and packs the
same originals again with `--gop G` for each G of --gops and with `--codec C` for each C of --codecs but vp9 (NVDEC's
cost per decoded frame may depend on the codec; sets named by codec, one-second GOP). Sections:
  calls   one decoder, one thread: ms per video in `open` (reconfigure), the library's frame call and the copy,
          for frame patterns (1 frame, 16 at stride 1/4/8, 64 at stride 1), on every set; with --decoder pyav
          also PyAV decoding from the start instead of seeking
  gil     how fast a pure-Python thread counts alone and beside 4 and 8 decoder threads (decode only)
  rates   decode-only clips/s with 1/4/8 threads (ClipReader + decoder, no augmentation) and the finetuning /
          pretraining streams bench_nvdec.py measures (ClipStream with RandAugment), on every set
  classic the classic PyAV DataLoader (16 workers) against the pretraining stream, same run (not by default)
  levers  Python's switch interval (5 ms against train.py's 0.5) and NvdecDecoder's copy (gather against in
          order), decode only and streams, 8 threads (NVDEC only; not by default)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402

from benchmarks.bench_nvdec import QUICK, Bench, Plan  # noqa: E402
from benchmarks.decode_processes import start_reading  # noqa: E402
from mae_st.data.clip_reader import DecodedSample, read_member  # noqa: E402
from mae_st.data.format import VIDEO_EXTS, SampleMeta  # noqa: E402
from mae_st.data.frames import sample_members  # noqa: E402
from mae_st.data.shards import list_samples, list_shards  # noqa: E402

PATTERNS = {"1 frame": (1, 1), "16 x stride 1": (16, 1), "16 x stride 4": (16, 4), "16 x stride 8": (16, 8),
            "64 x stride 1": (64, 1)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default="/tmp/mae_st_bench_nvdec", help="bench_nvdec.py's footage and shards")
    p.add_argument("--out", default="nvdec_cost_out")
    p.add_argument("--decoder", default="nvdec", choices=("nvdec", "pyav"))
    p.add_argument("--gops", default="30,8,4,2", help="keyframe intervals to pack and compare (30: the default set, "
                   "the packer's one-second GOP)")
    p.add_argument("--codecs", default="vp9", help="codecs to pack the originals with and compare (vp9: the default "
                   "set; h264, hevc: sets of those names)")
    p.add_argument("--sections", default="calls,gil,rates")
    p.add_argument("--seconds", type=float, default=5.0, help="per rate row")
    p.add_argument("--threads", default="1,4,8")
    p.add_argument("--streams", default="finetune:8,pretrain:8", help="mode:threads rows of the ClipStream rates")
    p.add_argument("--quick", action="store_true", help="bench_nvdec.py's tiny footage: every code path on a CPU")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda", 0) if args.decoder == "nvdec" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    plan = dataclasses.replace(QUICK if args.quick else Plan(), measure_seconds=args.seconds)
    bench = Bench(argparse.Namespace(decoder=args.decoder, no_mixed=True, photos=None, sections="data"),
                  plan, device, out.resolve(), Path(args.work_dir).resolve())
    report: Dict[str, list] = {"sets": pack_sets(bench, [int(g) for g in args.gops.split(",")],
                                                 [c for c in args.codecs.split(",") if c])}
    for section in args.sections.split(","):
        started = time.perf_counter()
        try:
            report[section] = SECTIONS[section](bench, args)
        except Exception as err:  # noqa: BLE001 - one failed section must not cost the others
            import traceback

            traceback.print_exc()
            report[section] = [{"error": repr(err)[:400]}]
        print(f"## {section} ({time.perf_counter() - started:.0f} s)", flush=True)
        for row in report[section]:
            print(json.dumps(row), flush=True)
        (out / "nvdec_cost.json").write_text(json.dumps(report, indent=1))


def pack_sets(bench: Bench, gops: Sequence[int], codecs: Sequence[str] = ("vp9",)) -> List[dict]:
    """bench_nvdec.py's default set, and its originals packed again with each keyframe interval but the default's
    and with each codec but VP9 (the default's)."""
    from mae_st.data.packing import PackOptions, pack_videos

    rows = []
    bench.run_data([])
    raw = sorted(str(p) for p in (bench.work / "raw" / "default").iterdir())
    variants = [(gop, "vp9") for gop in gops] + [(30, codec) for codec in codecs if codec != "vp9"]
    for gop, codec in variants:
        name = codec if codec != "vp9" else "default" if gop == 30 else f"gop{gop}"
        folder = bench.work / "shards" / name
        started = time.perf_counter()
        if not (folder / "summary.json").is_file():
            pack_videos(PackOptions(out_dir=str(folder), data_dirs=raw, prefix="train", progress=False,
                                    gop=None if gop == 30 else gop, codec=codec))
        bench.sets[name] = str(folder)
        megabytes = sum(os.path.getsize(t) for t in list_shards(str(folder)).tars) / 1e6
        rows.append({"set": name, "codec": codec, "gop": gop, "MB": round(megabytes, 1),
                     "pack s": round(time.perf_counter() - started, 1)})
    return rows


# ---- calls: one decoder, one thread --------------------------------------------------------------------------


def run_calls(bench: Bench, args) -> List[dict]:
    rows = []
    scratch = Path("/dev/shm" if os.access("/dev/shm", os.W_OK) else "/tmp") / f"nvdec_cost_{os.getpid()}"
    scratch.mkdir(exist_ok=True)
    decoders = {args.decoder: bench._decoder_factory()()}
    if args.decoder == "pyav":  # what seeking to the keyframe before the clip buys on the CPU
        from mae_st.data.pyav_decode import PyAVDecoder

        decoders["pyav from the start"] = PyAVDecoder(seek=False)
    try:
        for name, folder in bench.sets.items():
            videos = extract_videos(folder, scratch / name)
            for kind, decoder in decoders.items():
                decode_pattern(decoder, videos, 4, 1, random.Random(0))  # warm: the decoder exists and has run
                for label, (count, stride) in PATTERNS.items():
                    rows.append({"set": name, "decoder": kind, "pattern": label,
                                 **decode_pattern(decoder, videos, count, stride, random.Random(1))})
    finally:
        for decoder in decoders.values():
            decoder.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return rows


def extract_videos(folder: str, into: Path) -> List[tuple]:
    """(path, frame count) of every sample's video, written to files once (the scratch write is not timed)."""
    into.mkdir(parents=True, exist_ok=True)
    videos = []
    for ref in list_samples(folder):
        members = sample_members(ref)
        meta = SampleMeta.from_json(read_member(ref.tar, *members["json"]))
        ext = next(e for e in members if e in VIDEO_EXTS)
        path = into / f"{ref.key.replace('/', '_')}.{ext}"
        path.write_bytes(read_member(ref.tar, *members[ext]))
        videos.append((str(path), meta.frames))
    return videos


def decode_pattern(decoder, videos: List[tuple], count: int, stride: int, rng: random.Random) -> dict:
    """ms per video of `count` frames `stride` apart from a random start, and the decoder's phases."""
    before = dict(getattr(decoder, "seconds", {}))
    frames_before = decoder.frames
    started = time.perf_counter()
    for path, frames in videos:
        span = (count - 1) * stride + 1
        first = rng.randrange(max(frames - span, 0) + 1)
        decoder.decode(path, [first + k * stride for k in range(count)])
    seconds = time.perf_counter() - started
    row = {"ms/video": round(1e3 * seconds / len(videos), 2), "videos": len(videos),
           "decoder frames/video": (decoder.frames - frames_before) / len(videos)}  # nvdec: returned, pyav: decoded
    for phase, total in getattr(decoder, "seconds", {}).items():
        row[f"{phase} ms"] = round(1e3 * (total - before[phase]) / len(videos), 2)
    return row


# ---- gil: does a decoder call hold the interpreter? ------------------------------------------------------------


def run_gil(bench: Bench, args) -> List[dict]:
    rows = [{"decoder threads": 0, "python counts/s": count_rate(args.seconds / 2)}]
    for threads in (4, 8):
        with BackgroundDecoding(bench, "default", "finetune", threads) as progress:
            rate = count_rate(args.seconds / 2)
        rows.append({"decoder threads": threads, "python counts/s": rate, "decode clips/s": progress.rate(),
                     "share of alone": round(rate / rows[0]["python counts/s"], 3)})
    return rows


def count_rate(seconds: float) -> float:
    """Increments a Python counter in a thread of its own for `seconds`: its rate falls with the GIL's share."""
    result = []

    def spin():
        n, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            n += 1
        result.append(n / seconds)

    t = threading.Thread(target=spin)
    t.start()
    t.join()
    return round(result[0])


class _Progress:
    def __init__(self):
        self.clips, self.started, self.ended = 0, time.perf_counter(), None

    def rate(self) -> float:
        return round(self.clips / ((self.ended or time.perf_counter()) - self.started), 1)


class BackgroundDecoding:
    """Decode-only reading of a set in the background (ClipReader, `threads` decoders) while the block runs."""

    def __init__(self, bench: Bench, set_name: str, mode: str, threads: int):
        self.reader, self.results = start_reading(bench._decoder_factory(), threads, mode,
                                                  list_samples(bench.sets[set_name]) * 400)
        self.progress, self.stop = _Progress(), threading.Event()
        self.thread = threading.Thread(target=self._consume, daemon=True)

    def _consume(self):
        for result in self.results:
            if self.stop.is_set():
                break
            if isinstance(result, DecodedSample):
                self.progress.clips += result.clips.shape[0]
        self.progress.ended = time.perf_counter()

    def __enter__(self) -> _Progress:
        self._phases_before = merged_phases(self.reader.decoders)
        self.progress.started = time.perf_counter()
        self.thread.start()
        return self.progress

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=30)
        after = merged_phases(self.reader.decoders)
        self.phases = {k: v - self._phases_before.get(k, 0.0) for k, v in after.items()}
        self.results.close()
        self.reader.close()


def merged_phases(decoders) -> Dict[str, float]:
    """Seconds per phase summed over the decoders, and the videos they decoded."""
    totals: Dict[str, float] = {"videos": 0.0}
    for d in decoders:
        totals["videos"] += d.videos
        for phase, seconds in getattr(d, "seconds", {}).items():
            totals[phase] = totals.get(phase, 0.0) + seconds
    return totals


# ---- rates: decode only, and the streams -------------------------------------------------------------------------


def run_rates(bench: Bench, args) -> List[dict]:
    rows = []
    for name in bench.sets:
        for threads in (int(t) for t in args.threads.split(",")):
            for mode in ("finetune", "pretrain") if threads == max(map(int, args.threads.split(","))) else \
                    ("finetune",):
                rows.append({"set": name, "what": f"decode only, {mode}", "threads": threads,
                             **decode_only_rate(bench, name, mode, threads, args.seconds)})
        for spec in args.streams.split(","):
            mode, threads = spec.split(":")
            row = bench._stream_rate(name, mode, int(threads))
            rows.append({"set": name, "what": f"{mode} stream", "threads": int(threads),
                         **{k: row.get(k) for k in ("clips/s", "nvdec %", "sm %", "smi MiB", "bad")}})
    return rows


def decode_only_rate(bench: Bench, set_name: str, mode: str, threads: int, seconds: float) -> dict:
    run = BackgroundDecoding(bench, set_name, mode, threads)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    with run as progress:
        time.sleep(seconds)
    wall = time.perf_counter() - wall0
    row = {"clips/s": progress.rate(), "cpu cores": round((time.process_time() - cpu0) / wall, 2)}
    videos = max(run.phases.pop("videos"), 1)
    for phase, total in run.phases.items():  # a thread's seconds per video it decoded
        row[f"{phase} ms/video"] = round(1e3 * total / videos, 2)
    return row


# ---- classic: issue 15's baseline, beside the pretraining stream in the same run -------------------------------


def run_classic(bench: Bench, args) -> List[dict]:
    """The classic PyAV DataLoader (benchmarks/classic_loader.py) with 16 workers against the pretraining stream
    (repeat_aug 16, 8 threads) on the default set."""
    from benchmarks.bench_data import ShardSet
    from benchmarks.bench_pipeline import measure_classic
    from benchmarks.harness import gpu_profile, tiny_profile

    # 16 workers take seconds to start and their prefetched batches are drained first: a 12 s cap once left 1 batch
    sizes = tiny_profile() if args.quick else dataclasses.replace(gpu_profile(), classic_seconds=30.0)
    shard_set = ShardSet("default", bench.sets["default"], "vp9", True)
    classic = measure_classic(shard_set, 2 if args.quick else 16, bench.device, sizes, sizes.classic_seconds + 8)
    ours = bench._stream_rate("default", "pretrain", 8)["clips/s"]
    return [{"what": "classic PyAV DataLoader, pretraining", **{k: classic.get(k) for k in ("clips/s", "bs")}},
            {"what": "pretrain stream, 8 threads", "clips/s": ours,
             "ratio to classic": round(ours / classic["clips/s"], 2)}]


# ---- levers: the interpreter's switch interval and the decoder's copy, in one run -------------------------------


def run_levers(bench: Bench, args) -> List[dict]:
    """Decode-only clips/s at 8 threads for Python's default switch interval (5 ms, what the other rows run) and
    train.py's (RunConfig.gil_switch_interval_ms), each with NvdecDecoder's copy-then-gather and in-order copy; then
    the streams at both intervals with the in-order copy."""
    from mae_st.config import RunConfig
    from mae_st.data.nvdec import NvdecDecoder

    rows, default = [], sys.getswitchinterval()
    intervals = {"5 ms (Python's default)": 0.005, f"{RunConfig.gil_switch_interval_ms:g} ms (train.py's)":
                 RunConfig.gil_switch_interval_ms / 1000}
    try:
        for mode in ("finetune", "pretrain"):
            for label, interval in intervals.items():
                sys.setswitchinterval(interval)
                for in_order in (False, True):
                    NvdecDecoder.copy_in_order = in_order
                    rows.append({"what": f"decode only, {mode}", "switch interval": label,
                                 "copy": "in order" if in_order else "then gather", "threads": 8,
                                 **decode_only_rate(bench, "default", mode, 8, args.seconds)})
        NvdecDecoder.copy_in_order = True
        for mode in ("finetune", "pretrain"):
            for label, interval in intervals.items():
                sys.setswitchinterval(interval)
                row = bench._stream_rate("default", mode, 8)
                rows.append({"what": f"{mode} stream", "switch interval": label, "copy": "in order", "threads": 8,
                             **{k: row.get(k) for k in ("clips/s", "nvdec %", "sm %", "smi MiB", "bad")}})
    finally:
        sys.setswitchinterval(default)
        NvdecDecoder.copy_in_order = True
    return rows


SECTIONS = {"calls": run_calls, "gil": run_gil, "rates": run_rates, "classic": run_classic, "levers": run_levers}

if __name__ == "__main__":
    main()

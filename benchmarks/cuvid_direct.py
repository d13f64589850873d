"""NVDEC through the driver's video API directly (mae_st/data/cuvid.py) against PyNvVideoCodec (mae_st/data/nvdec.py).

The question (docs/performance.md, 2026-12-01 third): a reader thread with PyNvVideoCodec costs ~0.12-0.15 ms a
decoded frame, and one process levels off near 16-17 thousand decoded frames/s. Is that the library's own work
(mapping and converting frames it only passes over) or the driver's? CuvidDecoder maps only the frames asked for.

    source .devcarry/c4/install.sh && python3 benchmarks/bench_nvdec.py --sections data --no-mixed \\
        --out $OUT/bn --work-dir /root/bench_nvdec
    python3 benchmarks/cuvid_direct.py /root/bench_nvdec/shards/default

Sections: `check` (both decoders against PyAV's frames on the packed footage: mean |difference|, frames
misaligned, ms per call) and `phases` (threads decoding pre-written files, clips/s and ms per video in each phase).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import sys
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mae_st.data.clip_reader import read_member  # noqa: E402
from mae_st.data.clip_stream import decoder_factory  # noqa: E402
from mae_st.data.frames import sample_members  # noqa: E402
from mae_st.data.pyav_decode import PyAVDecoder  # noqa: E402
from mae_st.data.shards import list_samples  # noqa: E402

CHECK_PATTERNS = {"ft 16@4 from 37": [37 + 4 * k for k in range(16)], "first 3": [0, 1, 2], "late 1": [250],
                  "past end": [295, 299, 5000], "pt union": sorted(set(range(3, 280, 8)) | set(range(40, 168, 8))),
                  "repeats unordered": [50, 10, 50, 12, 10]}
# per video v: a finetuning clip (16 at stride 4), and the union of a pretraining video's 16 clips at stride 8
PHASE_PATTERNS = {"ft": lambda v: [(37 + 7 * v) % 150 + 4 * k for k in range(16)],
                  "pt": lambda v: sorted({(s + 8 * k) for s in range(v % 20, 160, 11) for k in range(16)})}
PHASE_ROWS = [("nvdec", 1, "ft", 0), ("cuvid", 1, "ft", 0), ("cuvid", 1, "ft", 4), ("nvdec", 8, "ft", 0),
              ("cuvid", 8, "ft", 0), ("cuvid", 8, "ft", 4), ("nvdec", 1, "pt", 0), ("cuvid", 1, "pt", 0),
              ("nvdec", 8, "pt", 0), ("cuvid", 8, "pt", 0)]  # (decoder, threads, pattern, parser display delay)


def write_videos(folder: str, scratch: Path) -> list:
    paths = []
    for i, ref in enumerate(list_samples(folder)):
        members = sample_members(ref)
        ext = next(e for e in members if e in ("webm", "mp4", "mkv"))
        path = scratch / f"cuvid_direct_{i}.{ext}"
        path.write_bytes(read_member(ref.tar, *members[ext]))
        paths.append(str(path))
    return paths


def check(paths: list, device: torch.device) -> None:
    cuvid, nvdec, reference = decoder_factory("cuvid", device)(), decoder_factory("nvdec", device)(), PyAVDecoder()
    for path in paths[:3]:
        for name, indices in CHECK_PATTERNS.items():
            row = {"video": Path(path).name, "pattern": name}
            try:
                expected = reference.decode(path, indices).numpy().astype(np.int16)
                got = {}
                for label, decoder in (("cuvid", cuvid), ("nvdec", nvdec)):
                    started = time.perf_counter()
                    got[label] = decoder.decode(path, indices).cpu().numpy().astype(np.int16)
                    row[f"{label} ms"] = round(1e3 * (time.perf_counter() - started), 1)
                for label in got:
                    row[f"{label}-pyav"] = round(float(np.abs(got[label] - expected).mean()), 3)
                if len(set(indices)) == len(indices):  # which PyAV frame each frame is closest to
                    distance = np.abs(got["cuvid"][:, None].astype(np.float32) - expected[None]).mean(axis=(2, 3, 4))
                    row["cuvid misaligned"] = int((distance.argmin(axis=1) != np.arange(len(indices))).sum())
            except Exception as err:  # noqa: BLE001 - one failed pattern must not cost the others
                traceback.print_exc()
                row["error"] = repr(err)[:300]
            print(json.dumps(row), flush=True)
    cuvid.close()
    nvdec.close()


def phase_row(paths: list, device: torch.device, kind: str, threads: int, pattern: str, delay: int,
              seconds: float) -> dict:
    decoders, counts, ready, stop = [], [0] * threads, threading.Event(), threading.Event()

    def work(t: int) -> None:
        decoder = decoder_factory(kind, device)()
        if kind == "cuvid":
            decoder.display_delay = delay
        decoders.append(decoder)
        decoder.decode(paths[t], PHASE_PATTERNS[pattern](t))  # its session created, not timed
        decoder.seconds = {k: 0.0 for k in decoder.seconds}
        ready.wait()
        video = t
        while not stop.is_set():
            decoder.decode(paths[video % len(paths)], PHASE_PATTERNS[pattern](video))
            counts[t] += 1
            video += threads
        decoder.close()

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    time.sleep(2.0)
    cpu, started = time.process_time(), time.perf_counter()
    ready.set()
    time.sleep(seconds)
    stop.set()
    for worker in workers:
        worker.join()
    wall, videos = time.perf_counter() - started, sum(counts)
    row = {"decoder": kind, "pattern": pattern, "threads": threads, "display delay": delay,
           "videos/s": round(videos / wall, 1), "cores": round((time.process_time() - cpu) / wall, 2)}
    for phase in decoders[0].seconds:
        row[f"{phase} ms/video"] = round(1e3 * sum(d.seconds[phase] for d in decoders) / max(videos, 1), 2)
    if kind == "cuvid":
        row["decoded/video"] = round(sum(d.decoded for d in decoders) / max(sum(d.videos for d in decoders), 1), 1)
    return row


def main() -> None:
    faulthandler.enable()  # a wrong structure layout crashes in the driver: say where
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", help="a packed shard folder (bench_nvdec.py's default set)")
    p.add_argument("--sections", default="check,phases")
    p.add_argument("--seconds", type=float, default=4.0, help="per phases row")
    args = p.parse_args()
    torch.cuda.set_device(0)
    device = torch.device("cuda", 0)
    scratch = Path("/dev/shm")
    paths = write_videos(args.shards, scratch)
    if "check" in args.sections:
        print("## check", flush=True)
        check(paths, device)
    if "phases" in args.sections:
        print("## phases", flush=True)
        for kind, threads, pattern, delay in PHASE_ROWS:
            try:
                print(json.dumps(phase_row(paths, device, kind, threads, pattern, delay, args.seconds)), flush=True)
            except Exception:  # noqa: BLE001
                traceback.print_exc()


if __name__ == "__main__":
    main()

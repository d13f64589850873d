"""Reused-decoder clips/s with the decoding split over processes instead of threads of one process.

Why: the finetuning stream's decoding stops scaling at ~6 threads in one process (85.8 / 192.2 / 212.7 / 209.8
clips/s with 1 / 4 / 6 / 8 threads on an H200, NVDEC 10-26 % busy), and inside train.py the decoder threads share
the step's interpreter. This measures decode alone (ClipReader + NvdecDecoder, no augmentation) for P processes
x T threads, and the same with the decoded clips handed to the parent through CUDA IPC (torch.multiprocessing),
which is what a decode-process design would pay. Each row reports clips/s and the CPU cores its processes used.
On an H200 (2026-12-01, docs/performance.md) two or more decoding processes were 2.5-4x slower than one process
with the same threads, so decoding stays in threads.

    source .devcarry/c4/install.sh && python3 benchmarks/decode_processes.py --shards /root/bench_nvdec/shards/default
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from mae_st.config import DataConfig  # noqa: E402
from mae_st.data.shards import list_samples  # noqa: E402

MODES = {"finetune": dict(sampling_rate=4, repeat_aug=1), "pretrain": dict(sampling_rate=8, repeat_aug=16)}


def start_reading(factory, threads: int, mode: str, samples, seed: int = 0):
    """(reader, results): a ClipReader of `threads` decoders reading `samples` with `mode`'s clips, warmed up (every
    thread has created its decoder and decoded a video)."""
    from mae_st.data.clip_reader import ClipReader
    from mae_st.data.clip_stream import ClipPlan

    plan = ClipPlan(DataConfig(num_frames=16, **MODES[mode]), training=True, seed=seed, epoch=0)
    reader = ClipReader(factory, threads, ahead=max(2 * threads, 4))
    results = reader.read(plan.request(ref) for ref in samples)
    for _ in range(2 * threads):
        next(results)
    return reader, results


def _worker(rank, procs, threads, mode, folder, ipc, kind, ready, out, start, stop):
    from mae_st.data.clip_reader import DecodedSample
    from mae_st.data.clip_stream import decoder_factory

    device = torch.device("cuda", 0) if kind == "nvdec" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    reader, results = start_reading(decoder_factory(kind, device), threads, mode,
                                    list_samples(folder)[rank::procs] * 200, seed=rank)
    ready.put(rank)
    start.wait()
    clips, cpu0, t0 = 0, time.process_time(), time.perf_counter()
    for result in results:
        if stop.is_set():
            break
        if isinstance(result, DecodedSample):
            clips += result.clips.shape[0]
            if ipc:
                out.put(result.clips)
    ready.put(("done", rank, clips, time.perf_counter() - t0, time.process_time() - cpu0))
    if ipc:
        out.put(None)
    results.close()
    reader.close()


def measure(procs: int, threads: int, mode: str, folder: str, seconds: float, ipc: bool, kind: str) -> dict:
    ctx = mp.get_context("spawn")
    ready, out = ctx.Queue(), ctx.Queue(maxsize=4 * procs)
    start, stop = ctx.Event(), ctx.Event()
    workers = [ctx.Process(target=_worker, args=(r, procs, threads, mode, folder, ipc, kind, ready, out, start,
                                                                 stop))
               for r in range(procs)]
    for w in workers:
        w.start()
    for _ in workers:
        ready.get(timeout=120)
    received = [0]

    def drain():  # the parent's side of the hand-over: open each IPC tensor and touch it
        ended = 0
        while ended < procs:
            item = out.get()
            if item is None:
                ended += 1
                continue
            received[0] += item.shape[0]
            item.view(-1)[:1].sum().item()
            del item

    drainer = threading.Thread(target=drain, daemon=True) if ipc else None
    if drainer:
        drainer.start()
    start.set()
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    wall = time.perf_counter() - t0
    reports = []
    while len(reports) < procs:
        item = ready.get(timeout=60)
        if isinstance(item, tuple):
            reports.append(item)
    if drainer:
        drainer.join(timeout=30)
    for w in workers:
        w.join(timeout=30)
    clips = sum(r[2] for r in reports)
    return {"mode": mode, "procs": procs, "threads": threads, "ipc": ipc,
            "clips/s": round(clips / max(r[3] for r in reports), 1),
            "received/s": round(received[0] / wall, 1) if ipc else None,
            "cpu cores": round(sum(r[4] for r in reports) / max(r[3] for r in reports), 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--out", default=None, help="JSON of the rows")
    p.add_argument("--decoder", default="nvdec", choices=("nvdec", "pyav"), help="pyav: the CPU check of this script")
    p.add_argument("--rows", default="finetune:1x1,finetune:1x4,finetune:1x8,finetune:2x4,finetune:4x2,"
                   "finetune:8x1,finetune:4x2:ipc,finetune:8x1:ipc,pretrain:1x8,pretrain:4x2,pretrain:8x1,"
                   "pretrain:8x1:ipc")
    args = p.parse_args()
    rows = []
    for spec in args.rows.split(","):
        mode, shape, *flag = spec.split(":")
        procs, threads = map(int, shape.split("x"))
        try:
            row = measure(procs, threads, mode, args.shards, args.seconds, ipc=bool(flag), kind=args.decoder)
        except Exception as err:  # noqa: BLE001 - one failed row must not cost the others
            row = {"mode": mode, "procs": procs, "threads": threads, "error": repr(err)[:300]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

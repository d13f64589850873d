"""The reused-decoder backend on one GPU in one command: correctness, then clips/s against DALI's pipeline.

    source .devcarry/c4/install.sh && python3 benchmarks/bench_nvdec.py --out $OUT      # ~5 min on one H200
    python benchmarks/bench_nvdec.py --decoder pyav --quick --out /tmp/bench_nvdec        # every path, on a CPU

Sections, each in try/except (a failure prints its traceback, is recorded and the next section runs), results
written to <out>/bench_nvdec.json after every section:
  env          device, versions, why NVDEC would be unavailable
  data         films benchmark footage (benchmarks/make_bench_videos.py: pans over photographs, H.264 originals)
               and packs it with the packer's defaults (VP9), once; reused on a rerun with the same --work-dir.
               A second set mixes three sizes (320x240, 342x256, 456x256)
  check        tests/test_clip_reader.py through this decoder (frame indices read back from pixels, one decode per
               video, bad and hung samples, mixed sizes); this decoder against PyAV on the packed footage
               (mean |difference| and frame alignment); a sample corrupted in a copy of a packed shard is skipped
  throughput   ClipStream clips/s: finetuning (1 clip a video, RandAugment, batch 8) with 1/2/4/6/8 threads,
               pretraining (repeat_aug 16) with 4/8 threads, evaluation 10x3 views in videos/s, the mixed-size set,
               and DALI's reader graph (build_train_pipeline, 1 and 4 pipelines) on the same finetuning work, with
               ratios; every row has peak torch memory, nvidia-smi memory and NVDEC use, and the threads alive
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402

from benchmarks import gpu_monitor  # noqa: E402
from benchmarks.harness import REPO, child_env, time_batches  # noqa: E402
from benchmarks.make_bench_videos import Footage, make_bench_videos  # noqa: E402
from mae_st.config import DataConfig  # noqa: E402
from mae_st.data.format import index_name_for  # noqa: E402
from mae_st.data.frames import sample_members  # noqa: E402
from mae_st.data.index import SampleRef, read_shard_indexes  # noqa: E402
from mae_st.data.shards import list_samples, list_shards  # noqa: E402

MIXED_SIZES = ((320, 240), (342, 256), (456, 256))  # width, height
warnings.filterwarnings("ignore", category=DeprecationWarning)  # DALI's rand_augment names deprecated aliases


@dataclass(frozen=True)
class Plan:
    """Sizes of a run: the GPU one, or `--quick` for the CPU check of every code path."""

    videos: int = 48
    seconds: float = 10.0
    fps: int = 30
    size: tuple = (342, 256)
    mixed_sizes: tuple = MIXED_SIZES
    mixed_per_size: int = 16
    num_frames: int = 16
    img_size: int = 224
    finetune_rate: int = 4
    pretrain_rate: int = 8
    repeat_aug: int = 16
    finetune_batch: int = 8
    pretrain_batch: int = 2
    eval_batch: int = 4
    finetune_threads: tuple = (1, 2, 4, 6, 8)
    pretrain_threads: tuple = (4, 8)
    dali_pipelines: tuple = (1, 4)
    dali_threads: int = 8
    measure_seconds: float = 9.0
    max_steps: int = 400
    warmup: int = 2
    test_timeout: float = 150.0


QUICK = Plan(videos=8, seconds=2.0, fps=15, size=(128, 96), mixed_sizes=((128, 96), (160, 96), (96, 128)),
             mixed_per_size=3, num_frames=4, img_size=32, finetune_rate=2, pretrain_rate=2, repeat_aug=4,
             finetune_batch=4, pretrain_batch=2, eval_batch=2, finetune_threads=(1, 2), pretrain_threads=(2,),
             dali_pipelines=(1, 2), dali_threads=2, measure_seconds=6.0, max_steps=8, warmup=1, test_timeout=300.0)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_nvdec_out", help="folder for bench_nvdec.json and logs (e.g. $OUT)")
    p.add_argument("--work-dir", default="/tmp/mae_st_bench_nvdec", help="footage and shards (reused when present)")
    p.add_argument("--decoder", default="nvdec", choices=("nvdec", "pyav"))
    p.add_argument("--quick", action="store_true", help="tiny footage and few rows: every code path on a CPU")
    p.add_argument("--seconds", type=float, default=None, help="cap per throughput row (default 9, quick 6)")
    p.add_argument("--sections", default="env,data,check,throughput,loader")
    p.add_argument("--no-mixed", action="store_true", help="film and pack only the one-size set")
    p.add_argument("--photos", default=None, help=".npz of photographs for the footage (when sklearn is absent)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    plan = QUICK if args.quick else Plan()
    if args.seconds:
        plan = dataclasses.replace(plan, measure_seconds=args.seconds)
    out, work = Path(args.out).resolve(), Path(args.work_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(0)
    bench = Bench(args, plan, device, out, work)
    started = time.time()
    for name in [s.strip() for s in args.sections.split(",") if s.strip()]:
        bench.section(name)
    bench.report["total_seconds"] = round(time.time() - started, 1)
    bench.write()
    bench.print_tables()


class Bench:
    """Runs the sections and keeps every row; a section's exception is recorded, and the next one runs."""

    def __init__(self, args, plan: Plan, device: torch.device, out: Path, work: Path):
        self.args, self.plan, self.device, self.out, self.work = args, plan, device, out, work
        self.report: Dict[str, object] = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                                          "command": " ".join(sys.argv), "plan": dataclasses.asdict(plan),
                                          "decoder": args.decoder, "sections": {}}
        self.sets: Dict[str, str] = {}

    def section(self, name: str) -> None:
        print(f"\n=== {name} ===", flush=True)
        rows: List[dict] = []
        self.report["sections"][name] = {"status": "running", "rows": rows}
        started = time.time()
        try:
            getattr(self, f"run_{name}")(rows)
            status = "ok" if not any("error" in r for r in rows) else "errors in some rows"
        except Exception:  # noqa: BLE001 - recorded; the next section still runs
            traceback.print_exc()
            status = "failed: " + traceback.format_exc(limit=3).strip().splitlines()[-1]
            rows.append({"error": traceback.format_exc()})
        self.report["sections"][name].update(status=status, seconds=round(time.time() - started, 1))
        self.write()

    def row(self, rows: List[dict], label: dict, measure: Callable[[], dict]) -> dict:
        """One row: `label` plus what `measure()` returns, or its traceback."""
        try:
            result = measure()
        except Exception:  # noqa: BLE001 - one failing configuration costs its own row
            traceback.print_exc()
            result = {"error": traceback.format_exc()}
        row = {**label, **result}
        rows.append(row)
        print("  " + "  ".join(f"{k}={_short(v)}" for k, v in row.items() if k != "error"), flush=True)
        self.write()
        return row

    def write(self) -> None:
        (self.out / "bench_nvdec.json").write_text(json.dumps(self.report, indent=1, default=str))

    # ---- env ------------------------------------------------------------------------------------------------

    def run_env(self, rows: List[dict]) -> None:
        from mae_st.data.nvdec import nvdec_unavailable_reason

        info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                "device": torch.cuda.get_device_name(0) if self.device.type == "cuda" else "cpu",
                "nvdec unavailable because": nvdec_unavailable_reason()}
        for module in ("nvidia.dali", "av", "PyNvVideoCodec"):
            try:
                info[module] = __import__(module, fromlist=["__version__"]).__version__
            except Exception as err:  # noqa: BLE001 - a missing module is a fact to report
                info[module] = f"unavailable: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        rows.append(info)
        print("  " + "  ".join(f"{k}={v}" for k, v in info.items()), flush=True)
        if self.args.decoder == "nvdec" and info["nvdec unavailable because"]:
            print(f"  NOTE: --decoder nvdec but {info['nvdec unavailable because']}", flush=True)

    # ---- data -----------------------------------------------------------------------------------------------

    def run_data(self, rows: List[dict]) -> None:
        plan = self.plan
        width, height = plan.size
        self.sets["default"] = self.row(rows, {"set": "default", "size": f"{width}x{height}"},
                                        lambda: self._film_and_pack("default", [(width, height, plan.videos)]))["path"]
        if self.args.no_mixed:
            return
        sizes = [(w, h, plan.mixed_per_size) for w, h in plan.mixed_sizes]
        label = {"set": "mixed", "size": "+".join(f"{w}x{h}" for w, h in plan.mixed_sizes)}
        self.sets["mixed"] = self.row(rows, label, lambda: self._film_and_pack("mixed", sizes))["path"]

    def _film_and_pack(self, name: str, sizes) -> dict:
        from mae_st.data.packing import PackOptions, pack_videos

        out = self.work / "shards" / name
        raw_dirs = []
        started = time.perf_counter()
        for width, height, count in sizes:
            raw = self.work / "raw" / name / f"{width}x{height}"
            footage = Footage(count=count, seconds=self.plan.seconds, fps=self.plan.fps, height=height, width=width,
                              photos=self.args.photos, seed=width * 1000 + height)
            if len(list(raw.glob("class_*/*.mp4"))) != count:
                make_bench_videos(footage, raw, processes=min(os.cpu_count() or 1, count))
            raw_dirs.append(str(raw))
        filmed = time.perf_counter() - started
        if not (out / "summary.json").is_file():
            pack_videos(PackOptions(out_dir=str(out), data_dirs=raw_dirs, prefix="train", progress=False))
        samples = self._samples(str(out))
        return {"path": str(out), "videos": len(samples), "film s": filmed,
                "pack s": time.perf_counter() - started - filmed,
                "MB": sum(os.path.getsize(t) for t in list_shards(str(out)).tars) / 1e6}

    def _samples(self, folder: str) -> List[SampleRef]:
        return list_samples(folder)

    def _set(self, name: str) -> str:
        path = self.sets.get(name) or str(self.work / "shards" / name)
        if not (Path(path) / "summary.json").is_file():
            raise RuntimeError(f"no packed '{name}' set under {path}: run the data section")
        return path

    # ---- check ----------------------------------------------------------------------------------------------

    def run_check(self, rows: List[dict]) -> None:
        self.row(rows, {"check": "tests/test_clip_reader.py", "decoder": self.args.decoder}, self._pytest)
        self.row(rows, {"check": f"{self.args.decoder} vs pyav on packed footage"}, self._against_pyav)
        self.row(rows, {"check": "corrupt sample in a packed shard"}, self._corrupt_sample)

    def _pytest(self) -> dict:
        env = dict(child_env(), MAE_ST_TEST_DECODER=self.args.decoder)
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_clip_reader.py"]
        try:
            done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                                  timeout=self.plan.test_timeout)
            output, rc = done.stdout + done.stderr, done.returncode
        except subprocess.TimeoutExpired as err:
            output, rc = f"{err.stdout or ''}{err.stderr or ''}\n[timed out]", "timeout"
        log = self.out / f"test_clip_reader_{self.args.decoder}.log"
        log.write_text(output if isinstance(output, str) else str(output))
        summary = [line for line in output.splitlines() if " passed" in line or " failed" in line][-1:]
        failed = [line for line in output.splitlines() if line.startswith(("FAILED", "ERROR"))]
        return {"rc": rc, "summary": summary[0] if summary else output[-300:], "failed": failed, "log": str(log)}

    def _against_pyav(self) -> dict:
        """Mean |difference| between this decoder's frames and PyAV's, and whether frame i matches PyAV's frame i
        best among its neighbours (an off-by-one seek would match i +- 1)."""
        from mae_st.data.clip_reader import ScratchFiles, read_member
        from mae_st.data.pyav_decode import PyAVDecoder

        decoder = self._decoder_factory()()
        reference = PyAVDecoder()
        scratch = ScratchFiles(str(self.work), "against_pyav_")
        worst, misaligned, frames = 0.0, [], 0
        try:
            for ref in self._samples(self._set("default"))[:4]:
                members = sample_members(ref)
                ext = next(e for e in members if e != "json")
                path = scratch.write(read_member(ref.tar, *members[ext]), ext)
                wanted = list(range(10, 10 + 4 * self.plan.num_frames, 4))
                ours = decoder.decode(path, wanted).cpu().float()
                around = sorted({j for i in wanted for j in (i - 1, i, i + 1)})
                theirs = dict(zip(around, reference.decode(path, around).float()))
                for k, i in enumerate(wanted):
                    diffs = {j: float((ours[k] - theirs[j]).abs().mean()) for j in (i - 1, i, i + 1)}
                    worst = max(worst, diffs[i])
                    if min(diffs, key=diffs.get) != i:
                        misaligned.append((ref.key, i, min(diffs, key=diffs.get)))
                    frames += 1
        finally:
            scratch.close()
            decoder.close()
        return {"frames": frames, "max mean |diff| (0-255)": worst, "misaligned": misaligned,
                "ok": not misaligned and worst < 8.0}

    def _corrupt_sample(self) -> dict:
        """A copy of the default set's first shard with one sample's video header overwritten: the stream skips
        it, reports it, and delivers every other sample once, in order."""
        from mae_st.data.clip_stream import ClipStream

        source = list_shards(self._set("default")).tars[0]
        folder = self.work / "corrupt"
        folder.mkdir(exist_ok=True)
        tar = str(folder / Path(source).name)
        shutil.copyfile(source, tar)
        shutil.copyfile(index_name_for(source), index_name_for(tar))
        samples = [ref for refs in read_shard_indexes([tar], [index_name_for(tar)]) for ref in refs][:10]
        victim = samples[3]
        offset, size, _ = next(v for e, v in sample_members(victim).items() if e != "json")
        with open(tar, "r+b") as f:
            f.seek(offset)
            f.write(b"\x00 not a video \x00" * 8)
        cfg = self._cfg(finetune=True, threads=4)
        reported = []
        with ClipStream(samples, 4, cfg, training=False, mode="eval", seed=0, epoch=0, device=self.device,
                        decoder=self.args.decoder, on_failure=reported.append) as stream:
            keys = [meta["key"] for _, metas in stream for meta in metas]
        expected = [ref.key for ref in samples if ref.key != victim.key]
        return {"corrupted": victim.key, "reported": [(f.key, f.reason[:100]) for f in reported],
                "delivered in order": keys == expected,
                "ok": keys == expected and [f.key for f in reported] == [victim.key]}

    # ---- throughput -------------------------------------------------------------------------------------------

    def run_throughput(self, rows: List[dict]) -> None:
        plan = self.plan
        finetune = {}
        for threads in plan.finetune_threads:
            finetune[threads] = self.row(rows, {"what": "finetune stream", "set": "default", "threads": threads},
                                         lambda: self._stream_rate("default", "finetune", threads))
        for threads in plan.pretrain_threads:
            self.row(rows, {"what": "pretrain stream", "set": "default", "threads": threads},
                     lambda: self._stream_rate("default", "pretrain", threads))
        top = max(plan.finetune_threads)
        self.row(rows, {"what": "eval stream 10x3 views", "set": "default", "threads": top},
                 lambda: self._stream_rate("default", "eval", top))
        mixed = self.row(rows, {"what": "finetune stream", "set": "mixed", "threads": top},
                         lambda: self._stream_rate("mixed", "finetune", top))
        dali = {}
        for pipes in plan.dali_pipelines:
            dali[pipes] = self.row(rows, {"what": "DALI reader graph, finetune", "set": "default",
                                          "threads": plan.dali_threads, "pipelines": pipes},
                                   lambda: self._dali_rate(pipes))
        ours = finetune.get(top, {}).get("clips/s")
        best_dali = max((r.get("clips/s") or 0.0 for r in dali.values()), default=0.0)
        if ours and best_dali:
            rows.append({"what": "ratio finetune stream / best DALI graph", "ratio": ours / best_dali,
                         "stream clips/s": ours, "DALI clips/s": best_dali})
        if ours and mixed.get("clips/s"):
            rows.append({"what": "ratio mixed-size set / one-size set (finetune)", "ratio": mixed["clips/s"] / ours})

    def _cfg(self, finetune: bool, threads: int, **overrides) -> DataConfig:
        plan = self.plan
        base = dict(num_frames=plan.num_frames, img_size=plan.img_size, num_threads=threads, decoder_threads=threads,
                    prefetch_queue_depth=2,
                    test_num_ensemble_views=10, test_num_spatial_crops=3)
        if finetune:
            base.update(sampling_rate=plan.finetune_rate, repeat_aug=1, rand_aug=True,
                        jitter_scales_relative=(0.08, 1.0))
        else:
            base.update(sampling_rate=plan.pretrain_rate, repeat_aug=plan.repeat_aug)
        return DataConfig(**{**base, **overrides})

    def _decoder_factory(self):
        from mae_st.data.clip_stream import decoder_factory

        return decoder_factory(self.args.decoder, self.device)

    def _stream_rate(self, set_name: str, mode: str, threads: int) -> dict:
        """Clips/s of ClipStream over the set, repeated so that one stream (one pipeline build) lasts the row."""
        from mae_st.data.clip_reader import ClipReader
        from mae_st.data.clip_stream import ClipStream

        plan = self.plan
        training = mode != "eval"
        cfg = self._cfg(finetune=mode != "pretrain", threads=threads)
        batch = {"finetune": plan.finetune_batch, "pretrain": plan.pretrain_batch, "eval": plan.eval_batch}[mode]
        samples = self._samples(self._set(set_name)) * 50
        per_video = cfg.repeat_aug if training else cfg.test_num_ensemble_views * cfg.test_num_spatial_crops
        reader = ClipReader(self._decoder_factory(), threads, max(cfg.prefetch_queue_depth * batch, threads))
        streams = []

        def epoch(e: int):
            streams.append(ClipStream(samples, batch, cfg, training=training, mode=mode if training else "eval",
                                      seed=0, epoch=e, device=self.device, decoder=self.args.decoder,
                                      half=self.device.type == "cuda", reader=reader))
            return streams[-1]

        try:
            measured = self._timed(epoch, lambda b: b[0].shape[0] * per_video)
            measured["threads alive"] = threading.active_count()
            measured["bad"] = sum(len(s.failures) for s in streams)
            measured["decoded videos"] = sum(getattr(d, "videos", 0) for d in reader.decoders)
            measured["SimpleDecoders created"] = sum(getattr(d, "decoders_created", 0) for d in reader.decoders) or None
        finally:
            for stream in streams:
                stream.close()
            reader.close()
        if not training:
            measured["videos/s"] = measured["clips/s"] / per_video
        return measured

    def _dali_rate(self, pipelines: int) -> dict:
        """Clips/s of DALI's reader graph (reader + decoders.video + the same augmentation) on the finetuning work:
        `pipelines` graphs over the default set, taken in turn, sharing the threads."""
        from mae_st.data.clip_stream import dali_batch_to_torch
        from mae_st.data.pipeline import ReaderSpec, build_train_pipeline

        plan = self.plan
        shards = list_shards(self._set("default"))
        cfg = self._cfg(finetune=True, threads=max(1, plan.dali_threads // pipelines))
        device_id = 0 if self.device.type == "cuda" else None
        pipes = [build_train_pipeline(ReaderSpec(tars=shards.tars, index_paths=shards.index_paths,
                                                 batch_size=plan.finetune_batch, device_id=device_id, seed=j,
                                                 shuffle=True, initial_fill=16, half=device_id is not None),
                                      cfg, "finetune") for j in range(pipelines)]

        def batches(_epoch: int):
            while True:
                for pipe in pipes:
                    yield dali_batch_to_torch(pipe.run()[0], self.device)

        try:
            return self._timed(batches, lambda b: b.shape[0])
        finally:
            del pipes

    def _timed(self, epoch_batches, clips_in) -> dict:
        plan, device = self.plan, self.device
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        baseline = gpu_monitor.memory_used_mib()
        with gpu_monitor.GpuMonitor() as monitor:
            timing = time_batches(epoch_batches, clips_in, warmup=plan.warmup, steps=plan.max_steps,
                                  max_seconds=plan.measure_seconds, sync=sync)
            end = time.time()
        usage = monitor.window(end - timing.seconds, end, baseline)
        return {"clips/s": timing.clips_per_s, "steps": timing.steps, "s/step": timing.seconds_per_step,
                "torch peak MiB": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
                "smi MiB": usage["mem MiB"], "nvdec %": usage["nvdec %"], "sm %": usage["sm %"]}

    # ---- loader: what train.py runs ----------------------------------------------------------------------------

    def run_loader(self, rows: List[dict]) -> None:
        """Clips/s of the VideoLoader train.py builds (DataConfig.decoder nvdec vs dali, the batch transform of
        finetuning applied as the Trainer applies it), over the default set listed 20 times so that an epoch
        lasts the row as a real set's would."""
        plan = self.plan
        for mode in ("finetune", "pretrain", "eval"):
            for decoder in (self.args.decoder, "dali"):
                self.row(rows, {"what": f"loader {mode}", "decoder": decoder, "threads": plan.dali_threads},
                         lambda: self._loader_rate(mode, decoder))
            ours, dali = rows[-2].get("clips/s"), rows[-1].get("clips/s")
            if ours and dali:
                rows.append({"what": f"ratio loader {mode}: {self.args.decoder} / dali", "ratio": ours / dali})

    def _loader_rate(self, mode: str, decoder: str) -> dict:
        from mae_st.data.augment import build_batch_transform
        from mae_st.data.loader import VideoLoader
        from mae_st.data.shards import ShardSet

        plan, training = self.plan, mode != "eval"
        batch = {"finetune": plan.finetune_batch, "pretrain": plan.pretrain_batch, "eval": plan.eval_batch}[mode]
        cfg = self._cfg(finetune=mode != "pretrain", threads=plan.dali_threads, decoder=decoder,
                        batch_size_per_gpu=batch, reprob=0.25, mixup=0.8, cutmix=1.0,
                        decoder_threads=DataConfig().decoder_threads)  # train.py's default
        one = list_shards(self._set("default"))
        shards = ShardSet(one.tars * 20, one.index_paths * 20, one.counts * 20)
        loader = VideoLoader(cfg, shards, training=training, mode=mode if training else "eval", rank=0,
                             world_size=1, device=self.device, seed=0,
                             dtype=torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        transform = build_batch_transform(cfg, mode, num_classes=1000) if mode == "finetune" else None
        per_video = cfg.repeat_aug if training else cfg.test_num_ensemble_views * cfg.test_num_spatial_crops

        def epoch(e: int):
            loader.set_epoch(e)
            for clips, labels, *_ in loader:
                yield transform(clips, labels) if transform is not None else (clips, labels)

        try:
            measured = self._timed(epoch, lambda b: b[0].shape[0])
            measured["decoder used"] = loader.decoder or "dali"
            measured["bad"] = len(loader.registry)
        finally:
            loader.close()
        if not training:
            measured["videos/s"] = measured["clips/s"] / per_video
        return measured

    # ---- report ---------------------------------------------------------------------------------------------

    def print_tables(self) -> None:
        print(f"\n==== bench_nvdec ({self.args.decoder}, {self.device}) in {self.report['total_seconds']} s ====")
        for name, section in self.report["sections"].items():
            print(f"\n[{name}] {section['status']} ({section.get('seconds')} s)")
            for row in section["rows"]:
                shown = {k: v for k, v in row.items() if k not in ("error", "log", "path")}
                print("  " + " | ".join(f"{k}: {_short(v)}" for k, v in shown.items()))
                if "error" in row:
                    print("    error: " + str(row["error"]).strip().splitlines()[-1])
        print(f"\nJSON: {self.out / 'bench_nvdec.json'}")


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return text if len(text) <= 90 else text[:87] + "..."


if __name__ == "__main__":
    main()

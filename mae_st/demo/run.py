"""The built-in demo, end to end, through the same programs a user runs:

    Camera-Motion videos -> tools' packer (shards) -> `train.py --mode pretrain` -> finetune from the export, and
    the same classifier from scratch -> their evaluations -> tools/visualize.py reconstruction PNG.

    python -m mae_st.demo --out_dir demo_out [--quick]

MAE pretraining pays off when labels are few: it pretrains on every training video (labels unused) and finetunes
on a small labelled subset, so "pretrained vs from scratch" shows what the unlabelled videos taught the encoder.
Uses every GPU there is (one process on one GPU, DeepSpeed's launcher for several); without one, DeepSpeed's CPU
accelerator in one process (see `child_env`). train.py and tools/visualize.py ship inside the package
(mae_st/demo/scripts/, links in the repository), so the demo also runs from a plain `pip install .`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

import mae_st
from mae_st.data.packing import PackOptions, pack_videos
from mae_st.demo.camera_motion import DEFAULT_CLASSES, generate_camera_motion, video_path

SCRIPTS = Path(__file__).resolve().parent / "scripts"  # package data: train.py and tools/visualize.py
TRAIN_SCRIPT, VISUALIZE_SCRIPT = SCRIPTS / "train.py", SCRIPTS / "visualize.py"
PACKAGE_PARENT = Path(mae_st.__file__).resolve().parents[1]  # the checkout, or site-packages: children import it
# NVDEC decodes no VP9 frame smaller than 128x128 (the NVDEC programming guide's capability table; the decoder
# reports it as CUVIDDECODECAPS.nMinWidth/nMinHeight), so smaller demo videos decode on DALI's CPU decoder
NVDEC_MIN_VP9_SIDE = 128
CHANCE = 1.0 / len(DEFAULT_CLASSES)
PROGRESS_EVERY_S = 20.0
SUMMARY_NAME = "summary.json"


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo run: data, clip geometry, model and the training budget of each stage."""

    num_train: int  # every one pretrains (labels unused)
    num_val: int
    labelled_per_class: int  # the first this many training videos of each class finetune
    video_frames: int
    video_size: int
    num_frames: int  # clip length the models see
    sampling_rate: int
    img_size: int
    mae_model: str
    classifier: str
    decoder_embed_dim: int
    decoder_depth: int
    mask_ratio: float
    norm_pix_loss: bool  # off: plain pixel loss; per-patch normalised targets of these clips are mostly noise
    pretrain_epochs: int
    pretrain_batch: int  # videos per step; each gives `repeat_aug` clips
    pretrain_blr: float
    finetune_epochs: int
    finetune_batch: int
    finetune_blr: float
    repeat_aug: int
    max_steps_per_epoch: int = 0  # 0: whole epochs
    eval_views: int = 2  # temporal views per validation video


# Chosen with a plain-PyTorch sweep of the same models on the same videos (2026-11-28): 2,000 pretraining steps of
# 32 clips at lr 2.5e-3 gave 71-75 % val top-1 after finetuning (three finetuning seeds) against 52-65 % from
# scratch; 700 steps of 32 at lr 1.25e-3, or 2,000 steps of 16, left the encoder a worse start than random
# (55 % and 40 % vs 65 %). Finetuning uses repeat_aug 2 like the original's recipe, and no layer decay (4 blocks).
FULL = DemoPlan(
    num_train=1200, num_val=300, labelled_per_class=20, video_frames=32, video_size=64, num_frames=8,
    sampling_rate=2, img_size=64, mae_model="mae_vit_mini_patch16", classifier="vit_mini_patch16",
    decoder_embed_dim=64, decoder_depth=2, mask_ratio=0.75, norm_pix_loss=False, pretrain_epochs=27,
    pretrain_batch=16, pretrain_blr=2e-2, finetune_epochs=40, finetune_batch=8, finetune_blr=1.6e-2, repeat_aug=2,
)
# CI: the whole chain on tiny data, a few steps a stage
QUICK = DemoPlan(
    num_train=24, num_val=12, labelled_per_class=2, video_frames=16, video_size=32, num_frames=4,
    sampling_rate=2, img_size=32, mae_model="mae_vit_tiny_patch8", classifier="vit_tiny_patch8",
    decoder_embed_dim=32, decoder_depth=1, mask_ratio=0.75, norm_pix_loss=False, pretrain_epochs=1, pretrain_batch=4,
    pretrain_blr=1.5e-3, finetune_epochs=1, finetune_batch=4, finetune_blr=5e-3, repeat_aug=2,
    max_steps_per_epoch=3, eval_views=1,
)


@dataclass(frozen=True)
class Layout:
    """Where each stage writes under --out_dir."""

    root: Path

    @property
    def videos(self) -> Path:
        return self.root / "videos"

    def shards(self, name: str) -> Path:
        return self.root / "shards" / name

    def run(self, name: str) -> Path:
        return self.root / "runs" / name

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    @property
    def reconstruction(self) -> Path:
        return self.root / "reconstruction.png"


# ---- data ------------------------------------------------------------------------------------------------------


def make_videos(layout: Layout, plan: DemoPlan) -> Dict:
    return generate_camera_motion(layout.videos, num_train=plan.num_train, num_val=plan.num_val,
                                  num_frames=plan.video_frames, size=plan.video_size)


def write_labelled_subset(layout: Layout, plan: DemoPlan) -> Path:
    """A `path,label` CSV naming the first `labelled_per_class` training videos of each class (labels cycle)."""
    num_classes = len(DEFAULT_CLASSES)
    count = min(plan.num_train, plan.labelled_per_class * num_classes)
    rows = [(video_path(layout.videos, "train", DEFAULT_CLASSES[i % num_classes], i).relative_to(layout.videos),
             DEFAULT_CLASSES[i % num_classes]) for i in range(count)]
    path = layout.videos / "labelled_subset.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows((str(p), label) for p, label in rows)
    return path


def pack_all(layout: Layout, plan: DemoPlan) -> Dict[str, str]:
    """Packs the three shard sets as a user would; VP9 demo videos are stored as they are (--codec copy)."""
    sets = {
        "pretrain": PackOptions(out_dir="", data_dirs=[str(layout.videos / "train")], no_labels=True),
        "labelled": PackOptions(out_dir="", file_list=str(write_labelled_subset(layout, plan))),
        "val": PackOptions(out_dir="", data_dirs=[str(layout.videos / "val")]),
    }
    lines = {}
    for name, options in sets.items():
        options.out_dir, options.prefix, options.codec, options.progress = str(layout.shards(name)), name, "copy", False
        result = pack_videos(options)
        if not result.samples or result.rejected:
            raise RuntimeError(f"packing the demo's {name} set went wrong: {result.summary_line()}")
        lines[name] = result.summary_line()
    return lines


# ---- launching train.py ----------------------------------------------------------------------------------------


def geometry_flags(plan: DemoPlan) -> List[str]:
    return ["--num_frames", str(plan.num_frames), "--sampling_rate", str(plan.sampling_rate),
            "--img_size", str(plan.img_size), "--t_patch_size", "2", "--repeat_aug", str(plan.repeat_aug),
            "--max_steps_per_epoch", str(plan.max_steps_per_epoch), *hardware_flags(plan, gpu_count())]


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def hardware_flags(plan: DemoPlan, gpus: int) -> List[str]:
    if not gpus:
        return ["--num_threads", "2"]
    return ["--decode_device", "cpu"] if decodes_on_cpu(plan, gpus) else []


def decodes_on_cpu(plan: DemoPlan, gpus: int) -> bool:
    """Whether the demo's videos are decoded by DALI's CPU decoder: always without a GPU, and on a GPU machine
    when they are smaller than NVDEC decodes (the models still train on the GPU)."""
    return not gpus or plan.video_size < NVDEC_MIN_VP9_SIDE


def decoding_note(plan: DemoPlan, gpus: int) -> str:
    if not gpus:
        return "decoding: DALI's CPU decoder (no GPU)"
    if decodes_on_cpu(plan, gpus):
        return (f"decoding: the demo's {plan.video_size}x{plan.video_size} VP9 videos are below NVDEC's "
                f"{NVDEC_MIN_VP9_SIDE}x{NVDEC_MIN_VP9_SIDE} minimum, so DALI decodes them on the CPU "
                "(--decode_device cpu); the models train on the GPU")
    return "decoding: NVDEC (GPU)"


def pretrain_flags(layout: Layout, plan: DemoPlan) -> List[str]:
    return ["--mode", "pretrain", "--model", plan.mae_model, "--train_shards", str(layout.shards("pretrain")),
            "--mask_ratio", str(plan.mask_ratio), "--norm_pix_loss" if plan.norm_pix_loss else "--no_norm_pix_loss",
            "--pred_t_dim", str(plan.num_frames // 2),
            "--decoder_embed_dim", str(plan.decoder_embed_dim), "--decoder_depth", str(plan.decoder_depth),
            "--decoder_num_heads", "4", "--batch_size", str(plan.pretrain_batch),
            "--epochs", str(plan.pretrain_epochs), "--warmup_epochs", str(max(1, plan.pretrain_epochs // 10)),
            "--blr", str(plan.pretrain_blr), "--checkpoint_period", str(plan.pretrain_epochs),
            "--num_checkpoint_del", "1", "--log_interval", "5", "--output_dir", str(layout.run("pretrain")),
            *geometry_flags(plan)]


def finetune_flags(layout: Layout, plan: DemoPlan, name: str, pretrained: Optional[Path]) -> List[str]:
    """The same classifier, data and budget for both finetunes; only the starting weights differ."""
    return ["--mode", "finetune", "--model", plan.classifier, "--num_classes", str(len(DEFAULT_CLASSES)),
            "--train_shards", str(layout.shards("labelled")), "--val_shards", str(layout.shards("val")),
            "--batch_size", str(plan.finetune_batch), "--epochs", str(plan.finetune_epochs),
            "--warmup_epochs", str(max(1, plan.finetune_epochs // 10)), "--blr", str(plan.finetune_blr),
            # 4 blocks: no layer decay; 64 px clips: the pretraining crop range and no random erasing
            "--layer_decay", "1.0", "--jitter_scales_relative", "0.5", "1.0", "--reprob", "0",
            "--test_num_ensemble_views", str(plan.eval_views), "--test_num_spatial_crops", "1",
            "--checkpoint_period", str(plan.finetune_epochs), "--num_checkpoint_del", "1", "--log_interval", "5",
            "--output_dir", str(layout.run(name)), *geometry_flags(plan),
            *(["--finetune", str(pretrained)] if pretrained else [])]


def launch_command(args: Sequence[str], gpus: int) -> List[str]:
    """train.py through this interpreter: one process on one GPU or the CPU (train.py makes a world of one),
    DeepSpeed's launcher as a module for several GPUs, so no `deepspeed` executable has to be on PATH."""
    if gpus <= 1:
        return [sys.executable, str(TRAIN_SCRIPT), *args]
    from mae_st.engine.distributed import free_port  # lazy: it imports DeepSpeed

    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(gpus),
            "--master_port", str(free_port()), str(TRAIN_SCRIPT), *args]


def child_env() -> Dict[str, str]:
    """Environment of train.py and tools/ runs: the mae_st this demo runs importable, DeepSpeed's CPU setup."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_PARENT), env.get("PYTHONPATH")]))
    # the venv's bin goes last: DeepSpeed JIT-builds its CPU comm op with the first `ninja` on PATH (see tests)
    env["PATH"] = f"{env.get('PATH', '')}{os.pathsep}{Path(sys.executable).parent}"
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
        # tiny matrices: one thread per rank; two threads on a 2-core machine wait on each other for
        # milliseconds per op as soon as anything else runs there
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def launch(name: str, args: Sequence[str], layout: Layout, plan_epochs: int) -> float:
    """Runs one train.py launch, its output in logs/<name>.log; prints progress from its log.jsonl."""
    log_path = layout.log(name)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = launch_command(args, gpu_count())
    started = time.perf_counter()
    with open(log_path, "w") as log_file:
        log_file.write(" ".join(command) + "\n\n")
        log_file.flush()
        proc = subprocess.Popen(command, cwd=layout.root, env=child_env(), stdout=log_file,
                                stderr=subprocess.STDOUT)
        try:
            while True:
                try:
                    proc.wait(timeout=PROGRESS_EVERY_S)
                    break
                except subprocess.TimeoutExpired:
                    print(f"    {progress_line(layout.run(name), plan_epochs)}  "
                          f"[{time.perf_counter() - started:.0f} s]", flush=True)
        finally:
            if proc.poll() is None:  # interrupted: train.py (or the launcher, for its ranks) stops on SIGTERM
                proc.terminate()
                proc.wait()
    if proc.returncode != 0:
        tail = log_path.read_text().splitlines()[-40:]
        raise RuntimeError(f"{name}: train.py exited with {proc.returncode}; the end of {log_path}:\n"
                           + "\n".join(tail))
    return time.perf_counter() - started


def read_records(run_dir: Path, kind: str) -> List[dict]:
    log = run_dir / "log.jsonl"
    if not log.exists():
        return []
    return [r for r in map(json.loads, log.read_text().splitlines()) if r.get("kind") == kind]


def progress_line(run_dir: Path, epochs: int) -> str:
    train, evals = read_records(run_dir, "train"), read_records(run_dir, "eval")
    if not train:
        return "starting (DeepSpeed start-up; its first launch builds a CPU op)"
    last = train[-1]
    line = f"epoch {last['epoch'] + 1}/{epochs} step {last['global_step']}: loss {last['loss']:.3f}"
    return line + (f", val top-1 {evals[-1]['acc1']:.1f}%" if evals else "")


# ---- results ---------------------------------------------------------------------------------------------------


def pretrain_losses(run_dir: Path) -> Dict[str, float]:
    """First and last logged loss, and the means of the first and last tenth of the run (less noisy)."""
    losses = [r["loss"] for r in read_records(run_dir, "train")]
    if not losses or not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"{run_dir}/log.jsonl: pretraining logged no or non-finite losses: {losses}")
    tenth = max(1, len(losses) // 10)
    return {"first": losses[0], "last": losses[-1], "first_tenth_mean": sum(losses[:tenth]) / tenth,
            "last_tenth_mean": sum(losses[-tenth:]) / tenth, "records": len(losses)}


def finetune_result(run_dir: Path) -> Dict[str, float]:
    evals = read_records(run_dir, "eval")
    if not evals:
        raise RuntimeError(f"{run_dir}/log.jsonl: finetuning wrote no evaluation")
    return {"top1": evals[-1]["acc1"], "best_top1": evals[-1]["best_acc1"], "videos": evals[-1]["videos"],
            "epochs": len(evals)}


def visualize(layout: Layout) -> float:
    started = time.perf_counter()
    command = [sys.executable, str(VISUALIZE_SCRIPT), "--checkpoint",
               str(layout.run("pretrain") / "model.safetensors"), "--shards", str(layout.shards("val")),
               "--num_clips", "4", "--scale", "3", "--out", str(layout.reconstruction)]
    done = subprocess.run(command, cwd=layout.root, env=child_env(), capture_output=True, text=True)
    layout.log("visualize").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"tools/visualize.py failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return time.perf_counter() - started


# ---- the demo --------------------------------------------------------------------------------------------------


def run_demo(out_dir: Path, plan: DemoPlan) -> Dict:
    """Every stage in order; returns (and writes to <out_dir>/summary.json) what the summary prints."""
    check_scripts()
    layout = Layout(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)  # a demo run starts clean: stale shards or checkpoints would be resumed
    out_dir.mkdir(parents=True)
    timings: Dict[str, float] = {}
    began = time.perf_counter()
    gpus = gpu_count()
    device = f"{gpus} GPU(s)" if gpus else "CPU (one process)"
    print(f"mae_st demo on {device}, writing to {out_dir}", flush=True)
    print(decoding_note(plan, gpus), flush=True)

    stage(f"1/6 generating Camera-Motion: {plan.num_train} train + {plan.num_val} val videos "
          f"({plan.video_frames} frames, {plan.video_size} px, {len(DEFAULT_CLASSES)} camera-motion classes)")
    timings["data"] = timed(lambda: make_videos(layout, plan))
    print(f"    -> {layout.videos}")

    stage("2/6 packing shards (tools/shard_videos.py's pack_videos, --codec copy)")
    lines: Dict[str, str] = {}
    timings["packing"] = timed(lambda: lines.update(pack_all(layout, plan)))
    for line in lines.values():
        print(f"    {line}")

    stage(f"3/6 pretraining {plan.mae_model} on all {plan.num_train} training videos (labels unused), "
          f"mask ratio {plan.mask_ratio}, {plan.pretrain_epochs} epochs")
    timings["pretrain"] = launch("pretrain", pretrain_flags(layout, plan), layout, plan.pretrain_epochs)
    losses = pretrain_losses(layout.run("pretrain"))
    exported = layout.run("pretrain") / "model.safetensors"
    print(f"    loss {losses['first']:.3f} -> {losses['last']:.3f}; exported {exported}")

    labelled = plan.labelled_per_class * len(DEFAULT_CLASSES)
    results = {}
    for step, name, weights in (("4/6", "finetune_pretrained", exported), ("5/6", "finetune_scratch", None)):
        start = "from the pretrained export" if weights else "from scratch (random init)"
        stage(f"{step} finetuning {plan.classifier} {start} on {labelled} labelled videos, "
              f"{plan.finetune_epochs} epochs, evaluated on {plan.num_val} val videos")
        timings[name] = launch(name, finetune_flags(layout, plan, name, weights), layout, plan.finetune_epochs)
        results[name] = finetune_result(layout.run(name))
        print(f"    val top-1 {results[name]['top1']:.1f}% (best epoch {results[name]['best_top1']:.1f}%)")

    stage("6/6 drawing masked-input reconstructions of val clips (tools/visualize.py)")
    timings["visualize"] = visualize(layout)
    print(f"    -> {layout.reconstruction}")
    timings["total"] = time.perf_counter() - began

    summary = {"plan": asdict(plan), "pretrain_loss": losses, "finetune_pretrained": results["finetune_pretrained"],
               "finetune_scratch": results["finetune_scratch"], "chance_top1": 100 * CHANCE,
               "labelled_videos": labelled, "seconds": {k: round(v, 1) for k, v in timings.items()},
               "paths": {"videos": str(layout.videos), "shards": str(layout.root / "shards"),
                         "runs": str(layout.root / "runs"), "logs": str(layout.root / "logs"),
                         "pretrained_weights": str(exported), "reconstruction": str(layout.reconstruction)}}
    (out_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary)
    return summary


def print_summary(summary: Dict) -> None:
    loss, pre, scratch = summary["pretrain_loss"], summary["finetune_pretrained"], summary["finetune_scratch"]
    paths, seconds = summary["paths"], summary["seconds"]
    print("\n==== summary ====")
    for what in ("videos", "shards", "runs", "logs", "pretrained_weights", "reconstruction"):
        print(f"{what:>20}: {paths[what]}")
    print(f"pretraining loss     : {loss['first']:.3f} -> {loss['last']:.3f} (mean of first/last tenth of the logged "
          f"steps: {loss['first_tenth_mean']:.3f} -> {loss['last_tenth_mean']:.3f}, "
          f"{100 * (1 - loss['last_tenth_mean'] / loss['first_tenth_mean']):.0f}% lower)")
    print(f"finetuned, pretrained: val top-1 {pre['top1']:.1f}% over {pre['videos']} videos "
          f"({summary['labelled_videos']} labelled training videos)")
    print(f"finetuned, scratch   : val top-1 {scratch['top1']:.1f}% (same classifier, data and budget)")
    print(f"chance               : {summary['chance_top1']:.1f}%")
    print("time (s)             : " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))


def stage(title: str) -> None:
    print(f"\n[{time.strftime('%H:%M:%S')}] {title}", flush=True)


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def check_scripts() -> None:
    missing = [str(path) for path in (TRAIN_SCRIPT, VISUALIZE_SCRIPT) if not path.is_file()]
    if missing:
        raise SystemExit(f"mae_st.demo runs train.py and tools/visualize.py shipped in {SCRIPTS}, but "
                         f"{', '.join(missing)} is missing: reinstall mae_st (pip install . or pip install -e .)")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mae_st.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", type=Path, default=Path("demo_out"),
                   help="everything goes here (emptied first)")
    p.add_argument("--quick", action="store_true", help="tiny data and a few steps a stage: checks the chain (CI)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = parse_args(argv)
    return run_demo(args.out_dir.resolve(), QUICK if args.quick else FULL)

"""End to end through the real `deepspeed` launcher on the CPU (2 ranks, ZeRO-3, gloo), tiny models, synthetic
clips. Launches are shared between tests through module fixtures: each costs DeepSpeed's start-up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from safetensors.torch import load_file

from mae_st.config import parse_job_config
from mae_st.models import build_model

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)
GEOMETRY = ["--num_frames", "4", "--img_size", "32", "--t_patch_size", "2"]
PRETRAIN = ["--mode", "pretrain", "--model", "mae_vit_tiny_patch8", "--pred_t_dim", "4", "--mask_ratio", "0.75",
            "--train_shards", "synthetic:16", "--batch_size", "2", "--repeat_aug", "2", "--epochs", "3",
            "--warmup_epochs", "1", "--lr", "4e-3", "--max_steps_per_epoch", "4", "--log_interval", "1",
            "--save_every_steps", "2", "--decoder_embed_dim", "32", "--decoder_depth", "1", "--decoder_num_heads", "4",
            *GEOMETRY]
FINETUNE = ["--mode", "finetune", "--model", "vit_tiny_patch8", "--num_classes", "4", "--val_shards", "synthetic:8",
            "--test_num_ensemble_views", "2", "--test_num_spatial_crops", "1", "--batch_size", "2", *GEOMETRY]


def launch_command(args: List[str], ranks: int = 2) -> List[str]:
    port = str(29500 + os.getpid() % 1000)
    return [os.path.join(VENV_BIN, "deepspeed"), "--num_gpus", str(ranks), "--master_port", port, "train.py", *args]


def launch_env() -> Dict[str, str]:
    # the venv's bin goes last: DeepSpeed JIT-builds its CPU comm op with the first `ninja` on PATH, and two
    # ninja versions alternating over one build folder rebuild it (~40 s) on every launch
    return {**os.environ, "PATH": f"{os.environ['PATH']}:{VENV_BIN}", "DS_ACCELERATOR": "cpu"}


def run_training(args: List[str], ranks: int = 2) -> subprocess.CompletedProcess:
    done = subprocess.run(launch_command(args, ranks), cwd=ROOT, env=launch_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def train_records(output_dir: Path, kind: str = "train") -> Dict[int, dict]:
    """log.jsonl records by global step (a resumed run's later record of a step replaces the earlier one)."""
    records = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]
    return {r["global_step"]: r for r in records if r["kind"] == kind}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrain")
    run_training(PRETRAIN + ["--output_dir", str(out)])
    return out


@pytest.fixture(scope="module")
def interrupted_then_resumed(tmp_path_factory) -> Path:
    """The same run as `pretrained`, SIGTERMed (the whole process group, as a scheduler does) after step 5, then
    continued with --resume auto."""
    out = tmp_path_factory.mktemp("resumed")
    proc = subprocess.Popen(launch_command(PRETRAIN + ["--output_dir", str(out)]), cwd=ROOT, env=launch_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log = out / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 5:
            os.killpg(proc.pid, signal.SIGTERM)
            break
        time.sleep(0.05)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0, "the run finished before it could be interrupted:\n" + output[-2000:]
    assert "stopped by SIGTERM after saving step" in output, output[-3000:]
    run_training(PRETRAIN + ["--output_dir", str(out), "--resume", "auto"])
    return out


def test_pretraining_loss_is_finite_and_falls(pretrained):
    records = train_records(pretrained)
    losses = [records[step]["loss"] for step in sorted(records)]
    assert len(losses) == 12
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses
    last = records[12]
    assert last["clips_per_s"] > 0 and 0 <= last["data_wait_frac"] <= 1 and last["skipped_steps"] == 0
    assert (pretrained / "checkpoints").is_dir()


def test_export_is_one_fp32_state_dict_plain_pytorch_loads(pretrained):
    weights = load_file(str(pretrained / "model.safetensors"))
    model = build_model(parse_job_config(PRETRAIN).model, img_size=32, num_frames=4)
    assert set(weights) == set(model.state_dict())
    assert all(w.dtype == torch.float32 for w in weights.values())
    model.load_state_dict(weights)
    untrained = build_model(parse_job_config(PRETRAIN).model, img_size=32, num_frames=4)
    assert not torch.equal(weights["blocks.0.mlp.fc1.weight"], untrained.state_dict()["blocks.0.mlp.fc1.weight"])


def test_sigterm_checkpoint_and_resume_auto_reproduce_the_loss_curve(pretrained, interrupted_then_resumed):
    reference, resumed = train_records(pretrained), train_records(interrupted_then_resumed)
    assert sorted(resumed) == sorted(reference)
    for step in reference:
        assert resumed[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-5, abs=1e-6), step
        assert resumed[step]["lr"] == pytest.approx(reference[step]["lr"])
    kept = sorted(p.name for p in (interrupted_then_resumed / "checkpoints").glob("step*"))
    assert len(kept) == 2  # --num_checkpoint_del default keeps the newest two


def test_finetune_from_export_then_eval_only(pretrained, tmp_path):
    out = tmp_path / "finetune"
    run_training(FINETUNE + ["--finetune", str(pretrained / "model.safetensors"), "--train_shards", "synthetic:16",
                             "--epochs", "2", "--warmup_epochs", "1", "--blr", "5e-2", "--output_dir", str(out)])
    evals = train_records(out, "eval")
    assert len(evals) == 2 and all(0 <= e["acc1"] <= 100 and e["videos"] == 8 for e in evals.values())
    best = out / "best.safetensors"
    assert best.is_file() and (out / "model.safetensors").is_file()

    done = run_training(FINETUNE + ["--eval", "--finetune", str(best), "--output_dir", str(tmp_path / "eval")])
    record = list(train_records(tmp_path / "eval", "eval").values())[0]
    assert record["acc1"] == pytest.approx(max(e["best_acc1"] for e in evals.values()))
    assert "eval: top-1" in done.stdout + done.stderr

"""train.py through the real launcher (2 CPU ranks, ZeRO-3, gloo) on real VP9 shards the tests write: a run over
damaged shards finishes and names what it lost; resumed runs, mid-epoch, repeat the uninterrupted loss curve
with every finetuning augmentation on."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from mae_st.data.format import index_name_for, shard_name
from tests.test_pipeline import write_shards
from tests.test_resilience import member_span, overwrite
from tests.test_train import GEOMETRY, run_training, train_records

TINY_MAE = ["--model", "mae_vit_tiny_patch8", "--pred_t_dim", "4", "--mask_ratio", "0.75", "--decoder_embed_dim",
            "32", "--decoder_depth", "1", "--decoder_num_heads", "4", "--norm_pix_loss"]
DATA = ["--sampling_rate", "3", "--num_threads", "2", "--pipelines_per_gpu", "2", "--pipeline_segment_batches", "2",
        "--log_interval", "1", "--save_every_steps", "3", "--num_checkpoint_del", "10", *GEOMETRY]
PRETRAIN = ["--mode", "pretrain", *TINY_MAE, "--batch_size", "1", "--repeat_aug", "2", "--epochs", "2",
            "--warmup_epochs", "1", "--lr", "4e-3", *DATA]
FINETUNE = ["--mode", "finetune", "--model", "vit_tiny_patch8", "--num_classes", "10", "--batch_size", "1",
            "--repeat_aug", "2", "--epochs", "2", "--warmup_epochs", "1", "--blr", "5e-3", "--rand_aug",
            "--mixup", "0.8", "--cutmix", "1.0", "--reprob", "0.25", "--smoothing", "0.1", "--drop_path_rate", "0.1",
            "--test_num_ensemble_views", "1", "--test_num_spatial_crops", "1", *DATA]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("shards"), [3, 3, 4], "video")


def losses(out: Path) -> dict:
    return {step: r["loss"] for step, r in train_records(out).items()}


def resumed_copy(out: Path, step: int, copy: Path) -> Path:
    """The run folder as it was when the checkpoint of `step` was the newest: later checkpoints and logs gone."""
    shutil.copytree(out, copy)
    for folder in (copy / "checkpoints").glob("step*"):
        if int(folder.name[len("step"):]) > step:
            shutil.rmtree(folder)
    (copy / "log.jsonl").unlink()
    return copy


@pytest.mark.parametrize("args", [PRETRAIN, FINETUNE], ids=["pretrain", "finetune"])
def test_a_run_resumed_mid_epoch_repeats_the_uninterrupted_losses(shards, tmp_path, args):
    out = tmp_path / "full"
    data = ["--train_shards", shards] + (["--val_shards", shards] if "finetune" in args else [])
    run_training(args + data + ["--output_dir", str(out)])
    full = losses(out)
    assert sorted(full) == list(range(1, 11))  # 5 steps an epoch (10 videos, 2 ranks, batch 1), 2 epochs
    copy = resumed_copy(out, 3, tmp_path / "resumed")  # step 3 is mid-epoch 0, and mid-segment on a stream
    run_training(args + data + ["--output_dir", str(copy), "--resume", "auto"])
    resumed = losses(copy)
    assert sorted(resumed) == list(range(4, 11))
    for step, loss in resumed.items():
        assert loss == pytest.approx(full[step], rel=1e-6), (step, loss, full[step])


def test_a_run_over_damaged_shards_finishes_and_names_what_it_lost(tmp_path):
    folder = Path(write_shards(tmp_path / "s", [3, 3, 4], "video", corrupt={"v8"}))
    tar1 = folder / shard_name("test", 1)
    os.truncate(tar1, tar1.stat().st_size // 2)  # an interrupted copy
    offset, size = member_span(folder, 0, "v1", "json")
    overwrite(folder / shard_name("test", 0), offset, b"#" * size)  # garbage where v1's metadata was
    os.remove(index_name_for(str(folder / shard_name("test", 2))))
    out = tmp_path / "run"
    done = run_training(PRETRAIN + ["--train_shards", str(folder), "--output_dir", str(out),
                                    "--max_bad_sample_fraction", "0.5"])
    output = done.stdout + done.stderr
    for key, why in (("v5", "truncated copy"), ("v1", "v1.json is unreadable"), ("v8", "v8.webm")):
        assert key in output and why in output, (key, why, output[-3000:])
    data = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    data = [r for r in data if r["kind"] == "data"]
    assert len(data) == 2  # one record an epoch, of rank 0 (which writes the log)
    bad_keys = {key.split(":")[-1] for r in data for key in r["bad_keys"]}
    assert "v5" in bad_keys and data[-1]["bad_samples"] == len(data[-1]["bad_keys"]) >= 1
    assert all(r["pipeline_builds"] >= 2 for r in data)  # counted when the epoch's iterator closes
    logged = {json.loads(line)["key"] for f in (out / "bad_samples").glob("rank*.jsonl")
              for line in f.read_text().splitlines()}
    assert {"v1", "v5", "v8"} <= logged  # every rank's finds, kept for a resumed run
    assert (out / "model.safetensors").is_file()

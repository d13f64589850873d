"""`python -m mae_st.demo --quick` end to end: the real packer, `deepspeed train.py` launches (pretrain, two
finetunes) and tools/visualize.py on tiny generated data. One demo run is shared by the tests (launches are slow)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file

from mae_st.demo.run import QUICK

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("visualize", REPO / "tools/visualize.py")
visualize = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(visualize)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple:
    out = tmp_path_factory.mktemp("demo") / "out"
    done = subprocess.run([sys.executable, "-m", "mae_st.demo", "--out_dir", str(out), "--quick"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout, json.loads((out / "summary.json").read_text())


def records(run_dir: Path, kind: str) -> list:
    return [r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_every_set_is_packed_into_shards_with_indexes(demo):
    out, _, summary = demo
    for name, count in (("pretrain", QUICK.num_train), ("labelled", summary["labelled_videos"]),
                        ("val", QUICK.num_val)):
        folder = out / "shards" / name
        assert sorted(folder.glob("*.tar")) and sorted(folder.glob("*.idx")), name
        assert len((folder / "manifest.csv").read_text().splitlines()) == count + 1, name  # header + samples
    labels = json.loads((out / "shards/val/labels.json").read_text())
    assert labels == json.loads((out / "shards/labelled/labels.json").read_text())  # same class numbering


def test_pretraining_logs_finite_losses_and_exports_the_mae(demo):
    out, _, summary = demo
    losses = [r["loss"] for r in records(out / "runs/pretrain", "train")]
    assert losses and all(math.isfinite(x) for x in losses)
    assert summary["pretrain_loss"]["last"] == losses[-1]
    weights = load_file(str(out / "runs/pretrain/model.safetensors"))
    assert any(key.startswith("decoder_") for key in weights)  # the whole MAE, decoder included


def test_both_finetunes_report_a_top1_and_only_one_starts_from_the_export(demo):
    out, stdout, summary = demo
    for name in ("finetune_pretrained", "finetune_scratch"):
        evals = records(out / "runs" / name, "eval")
        assert evals and evals[-1]["acc1"] == summary[name]["top1"] and evals[-1]["videos"] == QUICK.num_val
    launched = {name: (out / "logs" / f"{name}.log").read_text().splitlines()[0]
                for name in ("finetune_pretrained", "finetune_scratch")}
    assert "--finetune" in launched["finetune_pretrained"].split()
    assert "--finetune" not in launched["finetune_scratch"].split()
    assert "val top-1" in stdout and "chance" in stdout and "pretraining loss" in stdout


def test_reconstruction_png_has_the_grid_size(demo):
    out, _, summary = demo
    with Image.open(summary["paths"]["reconstruction"]) as png:
        size = png.size
    clips, columns = 4, QUICK.num_frames // 2  # --num_clips 4; one column per predicted frame (pred_t_dim)
    assert size == visualize.grid_size(clips, columns, QUICK.img_size * 3)  # --scale 3

"""What a new user meets first: `python train.py` without a launcher, `--help`, the progress bar, the demo's
launches and a plain (non-editable) install, each on the real program."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mae_st.config import FINETUNE_DEFAULTS, JobConfig, build_arg_parser
from mae_st.data.packing import PackOptions, pack_videos
from mae_st.demo.run import (FULL, NVDEC_MIN_VP9_SIDE, TRAIN_SCRIPT, decoding_note, hardware_flags,
                             launch_command)
from mae_st.engine.distributed import LAUNCHER_ENV
from mae_st.engine.metrics import RunLogger
from tests.video_factory import moving_square_frames, write_video

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)
SECTION_METAVAR = re.compile(r"\b(MODEL|DATA|OPTIM|RUN)\.[A-Z_]+")


# ---- python train.py without a launcher ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Real shards as a user makes them: PyAV-written videos in class folders, packed by the packer."""
    raw = tmp_path_factory.mktemp("raw")
    for i in range(6):
        write_video(raw / f"class{i % 2}" / f"v{i}.webm", moving_square_frames(16, 32, 32, seed=i), fps=10)
    out = tmp_path_factory.mktemp("shards")
    result = pack_videos(PackOptions(out_dir=str(out), data_dirs=[str(raw)], codec="copy", workers=2,
                                     progress=False))
    assert result.samples == 6
    return out


def without_launcher_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (*LAUNCHER_ENV, "MASTER_ADDR", "MASTER_PORT")}
    # the venv's bin last: DeepSpeed JIT-builds its CPU comm op with the first `ninja` on PATH (see test_train.py)
    return {**env, "PATH": f"{env['PATH']}:{VENV_BIN}", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def test_python_train_py_without_a_launcher_trains_as_world_size_one(shards, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "train.py", "--mode", "pretrain", "--model", "mae_vit_tiny_patch8",
               "--train_shards", str(shards), "--num_frames", "4", "--sampling_rate", "2", "--img_size", "32",
               "--t_patch_size", "2", "--pred_t_dim", "4", "--mask_ratio", "0.75", "--decoder_embed_dim", "32",
               "--decoder_depth", "1", "--decoder_num_heads", "4", "--batch_size", "2", "--repeat_aug", "2",
               "--epochs", "2", "--warmup_epochs", "1", "--log_interval", "1", "--num_threads", "1",
               "--output_dir", str(out)]
    done = subprocess.run(command, cwd=ROOT, env=without_launcher_env(), capture_output=True, text=True,
                          timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "running as a single process" in output and "world size 1" in output
    assert "mpi4py" not in output
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 2 * 3  # 6 videos / batch 2, two epochs, a record every step
    assert all(math.isfinite(r["loss"]) for r in train)
    assert (out / "model.safetensors").is_file()
    # the bar's last draw of each epoch carries the interval's throughput beside loss and lr
    assert re.search(r"loss=[\d.]+, lr=[\d.e-]+, clips/s=[\d.]+, data_wait=\d+%", done.stderr), done.stderr[-2000:]


# ---- --help -----------------------------------------------------------------------------------------------------

def visible_flags(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if a.option_strings and a.help is not argparse.SUPPRESS
            and not isinstance(a, argparse._HelpAction)]


def test_every_visible_flag_has_help_that_states_its_default():
    flags = visible_flags(build_arg_parser())
    assert len(flags) > 60
    for action in flags:
        assert action.help and action.help.strip(), action.option_strings
        assert "default:" in action.help or action.required, action.option_strings


def test_help_defaults_are_the_dataclass_defaults_and_finetune_ones():
    by_flag = {flag: a for a in visible_flags(build_arg_parser()) for flag in a.option_strings}
    defaults = JobConfig()
    assert f"default: {defaults.optim.blr}; finetune: {FINETUNE_DEFAULTS['optim.blr']}" in by_flag["--blr"].help
    assert f"default: {defaults.data.batch_size_per_gpu})" in by_flag["--batch_size"].help
    assert "default: on; --no_norm_pix_loss turns it off" in by_flag["--norm_pix_loss"].help


def test_help_output_has_plain_metavars_and_lists_the_ignored_flags():
    done = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not SECTION_METAVAR.search(done.stdout), SECTION_METAVAR.findall(done.stdout)
    assert "--blr X" in done.stdout and "--train_shards SHARDS" in done.stdout
    assert "python train.py --mode" in done.stdout and "--pin_mem" in done.stdout


# ---- the progress bar ---------------------------------------------------------------------------------------------

def test_bar_shows_loss_lr_clips_per_second_and_data_wait(tmp_path):
    logger = RunLogger(str(tmp_path), is_main=True, resumed=False)
    logger.start_epoch(0, total=4, done=0)
    logger.advance({"loss": 0.5, "lr": 1e-3})
    logger.write({"kind": "train", "global_step": 1, "loss": 0.5, "lr": 1e-3, "clips_per_s": 123.44,
                  "data_wait_frac": 0.25})
    logger.advance({"loss": 0.4, "lr": 1e-3})
    shown = str(logger.bar)
    logger.close()
    assert "loss=0.4" in shown and "lr=0.001" in shown and "clips/s=123.4" in shown and "data_wait=25%" in shown
    assert json.loads((tmp_path / "log.jsonl").read_text())["clips_per_s"] == 123.44


# ---- the demo's launches ------------------------------------------------------------------------------------------

def test_demo_launches_through_this_interpreter_and_says_how_it_decodes():
    one = launch_command(["--mode", "pretrain"], gpus=1)
    several = launch_command(["--mode", "pretrain"], gpus=4)
    assert one[:2] == [sys.executable, str(TRAIN_SCRIPT)]
    assert several[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"] and "--num_gpus" in several
    assert "deepspeed" not in Path(one[0]).name and TRAIN_SCRIPT.resolve() == (ROOT / "train.py").resolve()
    # the demo's 64 px VP9 videos are below NVDEC's minimum: a GPU machine decodes them on the CPU, and says so
    assert FULL.video_size < NVDEC_MIN_VP9_SIDE
    assert hardware_flags(FULL, gpus=1) == ["--decode_device", "cpu"]
    assert "below NVDEC's 128x128 minimum" in decoding_note(FULL, gpus=1)
    big = dataclasses.replace(FULL, video_size=NVDEC_MIN_VP9_SIDE, img_size=NVDEC_MIN_VP9_SIDE)
    assert hardware_flags(big, gpus=1) == [] and decoding_note(big, gpus=1) == "decoding: NVDEC (GPU)"


def test_deepspeed_launcher_as_a_module_runs_train_py_on_two_ranks(tmp_path):
    """The demo's several-GPU command, run on 2 CPU ranks: no `deepspeed` executable is involved."""
    out = tmp_path / "run"
    args = ["--mode", "pretrain", "--model", "mae_vit_tiny_patch8", "--train_shards", "synthetic:8",
            "--num_frames", "4", "--img_size", "32", "--t_patch_size", "2", "--pred_t_dim", "4",
            "--decoder_embed_dim", "32", "--decoder_depth", "1", "--decoder_num_heads", "4", "--batch_size", "2",
            "--epochs", "1", "--warmup_epochs", "0", "--log_interval", "1", "--output_dir", str(out)]
    done = subprocess.run(launch_command(args, gpus=2), cwd=tmp_path, env=without_launcher_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "world size 2" in done.stdout + done.stderr
    assert (out / "model.safetensors").is_file()


# ---- a plain (non-editable) install ---------------------------------------------------------------------------------

NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "build", "dist", "demo_out", ".devcarry", "__pycache__",
                                     "*.egg-info", ".pytest_cache", "output*")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel `pip install .` would build, installed into a folder of its own (a copy of the sources builds it,
    so the working tree gets no build/ folder)."""
    root = tmp_path_factory.mktemp("install")
    shutil.copytree(ROOT, root / "src", symlinks=True, ignore=NOT_SOURCES)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), "."],
                   cwd=root / "src", check=True, capture_output=True, timeout=300)
    wheel = next((root / "dist").glob("mae_st-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(root / "site"), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    return root


def test_wheel_ships_the_deepspeed_configs_and_the_demo_programs(installed):
    wheel = next((installed / "dist").glob("mae_st-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for json_file in sorted((ROOT / "ds_configs").glob("*.json")):
            assert archive.read(f"mae_st/ds_configs/{json_file.name}") == json_file.read_bytes()
        assert archive.read("mae_st/demo/scripts/train.py") == (ROOT / "train.py").read_bytes()
        assert archive.read("mae_st/demo/scripts/visualize.py") == (ROOT / "tools/visualize.py").read_bytes()
    assert "mae_st/ds_configs/pretrain_zero3_bf16.json" in names


def test_installed_package_finds_its_files_from_another_folder(installed, tmp_path):
    probe = ("import json, mae_st, mae_st.demo.run as demo\n"
             "from mae_st.engine.ds_config import default_ds_config_path, load_ds_config\n"
             "path = default_ds_config_path('pretrain')\n"
             "load_ds_config(path)\n"
             "print(json.dumps({'package': mae_st.__file__, 'ds_config': str(path),\n"
             "                  'scripts': [str(demo.TRAIN_SCRIPT), str(demo.VISUALIZE_SCRIPT)],\n"
             "                  'present': demo.TRAIN_SCRIPT.is_file() and demo.VISUALIZE_SCRIPT.is_file()}))\n")
    env = {**os.environ, "PYTHONPATH": str(installed / "site")}
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.splitlines()[-1])
    site = str(installed / "site")
    assert found["package"].startswith(site) and found["ds_config"].startswith(site), found
    assert all(path.startswith(site) for path in found["scripts"]) and found["present"], found
    # the shipped train.py runs from there
    help_run = subprocess.run([sys.executable, found["scripts"][0], "--help"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
    assert help_run.returncode == 0 and "--train_shards" in help_run.stdout, help_run.stderr[-2000:]

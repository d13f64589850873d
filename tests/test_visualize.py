"""tools/visualize.py: a tiny exported MAE and generated demo videos -> the reconstruction grid PNG."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from mae_st.config import DataConfig, JobConfig, ModelConfig
from mae_st.demo import generate_camera_motion
from mae_st.models import build_model

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("visualize", REPO / "tools/visualize.py")
visualize = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(visualize)

MODEL = ModelConfig(name="mae_vit_tiny_patch8", decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4,
                    pred_t_dim=4, mask_ratio=0.75)
DATA = DataConfig(num_frames=8, sampling_rate=2, img_size=32)
PREDICTED_FRAMES = [0, 2, 4, 7]  # pred_t_dim=4 of 8 frames, evenly spaced with the original's truncation


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """An output dir as the trainer leaves it: config.json + an exported random-init MAE, plus demo videos."""
    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = build_model(MODEL, DATA.img_size, DATA.num_frames)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "checkpoint.safetensors"))
    job = JobConfig(model=MODEL, data=DATA)
    (root / "config.json").write_text(json.dumps(dataclasses.asdict(job)))
    generate_camera_motion(root / "videos", num_train=2, num_val=0, num_frames=20, size=48, seed=0)
    return root


def _videos(run_dir: Path):
    return sorted((run_dir / "videos/train").rglob("*.webm"))


def _tile(image: np.ndarray, clip: int, row: int, column: int, tile: int) -> np.ndarray:
    x, y = visualize.tile_origin(clip, row, column, tile)
    return image[y : y + tile, x : x + tile]


def test_cli_draws_original_masked_and_reconstruction_rows(run_dir, tmp_path):
    out = tmp_path / "rec.png"
    subprocess.run(
        [sys.executable, str(REPO / "tools/visualize.py"), "--checkpoint", str(run_dir / "checkpoint.safetensors"),
         "--videos", *map(str, _videos(run_dir)), "--out", str(out), "--scale", "2", "--seed", "5"],
        check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    image = np.asarray(Image.open(out).convert("RGB"))
    tile = DATA.img_size * 2
    assert (image.shape[1], image.shape[0]) == visualize.grid_size(2, MODEL.pred_t_dim, tile)

    # the same masking, recomputed through the module, says which patches the PNG must show grey
    model = visualize.load_mae(run_dir / "checkpoint.safetensors", MODEL, DATA)
    clips = torch.stack([visualize.clip_from_frames(visualize.decode_frames(v), DATA) for v in _videos(run_dir)])
    expected = visualize.reconstruct(model, clips, DATA, seed=5)
    assert expected.mask.mean() == pytest.approx(0.75, abs=0.02)
    side = DATA.img_size // 8  # tiny model: 8 px patches, 2-frame tubes, 4 predicted frames of 8 -> 1 per tube
    token_grid = expected.mask.reshape(2, DATA.num_frames // MODEL.t_patch_size, side, side)
    frames_per_token = MODEL.pred_t_dim // (DATA.num_frames // MODEL.t_patch_size)
    for clip in range(2):
        for column in range(MODEL.pred_t_dim):
            original, masked, reconstruction = (_tile(image, clip, row, column, tile) for row in range(3))
            hidden = np.kron(token_grid[clip, column // frames_per_token], np.ones((8 * 2, 8 * 2))).astype(bool)
            assert hidden.any() and (~hidden).any()
            assert (masked[hidden] == visualize.MASK_GREY).all(), "masked patches must be grey in the masked row"
            np.testing.assert_array_equal(masked[~hidden], original[~hidden])
            np.testing.assert_array_equal(reconstruction[~hidden], original[~hidden])
            assert np.abs(reconstruction[hidden].astype(int) - original[hidden]).mean() > 1, "no prediction drawn"


def test_columns_are_the_predicted_frames_and_predictions_are_denormalised(run_dir):
    model = visualize.load_mae(run_dir / "checkpoint.safetensors", MODEL, DATA)
    torch.nn.init.zeros_(model.decoder_pred.weight)
    torch.nn.init.zeros_(model.decoder_pred.bias)  # predicts 0 = "the patch's own mean" under norm_pix_loss
    frames = visualize.decode_frames(_videos(run_dir)[0])
    clip = visualize.clip_from_frames(frames, DATA)
    result = visualize.reconstruct(model, clip[None], DATA, seed=1)

    whole_clip = visualize._to_pixels(clip[None], DATA)[0]
    np.testing.assert_array_equal(result.original[0], whole_clip[PREDICTED_FRAMES])
    patch = model.patch_embed.patch_size
    masked_index = int(np.argmax(result.mask[0]))
    t, rest = divmod(masked_index, (DATA.img_size // patch) ** 2)
    y, x = divmod(rest, DATA.img_size // patch)
    u = model.t_pred_patch_size
    region = (slice(t * u, (t + 1) * u), slice(y * patch, (y + 1) * patch), slice(x * patch, (x + 1) * patch))
    predicted = result.reconstruction[0][region].astype(float)
    assert predicted.std() < 1.0, "a zero prediction must come back as a flat patch"
    assert predicted.mean() == pytest.approx(result.original[0][region].astype(float).mean(), abs=1.5)


def test_shards_as_input_and_config_found_above_a_checkpoint_folder(run_dir, tmp_path):
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    with tarfile.open(shard_dir / "val-000000.tar", "w") as tar:
        for i, video in enumerate(_videos(run_dir)):
            tar.add(video, arcname=f"{i:06d}.webm")
            tar.add(run_dir / "config.json", arcname=f"{i:06d}.json")
    members = visualize.videos_in_shards(shard_dir, limit=1)
    assert [name for name, _ in members] == ["val-000000.tar:000000.webm"]
    assert visualize.decode_frames(members[0][1]).shape == (20, 48, 48, 3)

    tag_folder = run_dir / "checkpoints" / "step000000010"
    tag_folder.mkdir(parents=True)
    assert visualize.find_run_config(tag_folder) == run_dir / "config.json"
    model_cfg, data_cfg = visualize.load_run_config(run_dir / "config.json")
    assert model_cfg == MODEL and data_cfg == DATA


def test_checkpoint_folder_of_a_real_packed_run(run_dir, tmp_path):
    """`--checkpoint <run>/checkpoints/step...` (the DeepSpeed folder form its help shows) on a folder a real
    train.py run wrote with packed blocks: DeepSpeed consolidates it under the flat tensors' names, which a plain
    model must load (it failed with 'Unexpected key(s) ... blocks.0.fused_decay', blaming the config)."""
    from tests.test_train import GEOMETRY, run_training

    out = tmp_path / "pretrain"
    run_training(["--mode", "pretrain", "--model", MODEL.name, "--pred_t_dim", "4", "--decoder_embed_dim", "32",
                  "--decoder_depth", "1", "--decoder_num_heads", "4", "--train_shards", "synthetic:8",
                  "--batch_size", "2", "--epochs", "1", "--warmup_epochs", "1", "--max_steps_per_epoch", "4",
                  "--output_dir", str(out), *GEOMETRY], ranks=1)
    folder = out / "checkpoints" / "step000000004"
    assert folder.is_dir() and json.loads((out / "config.json").read_text())["run"]["fuse_block_params"]
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    with tarfile.open(shard_dir / "val-000000.tar", "w") as tar:
        for i, video in enumerate(_videos(run_dir)):
            tar.add(video, arcname=f"{i:06d}.webm")
    png = tmp_path / "rec.png"
    done = subprocess.run([sys.executable, str(REPO / "tools/visualize.py"), "--checkpoint", str(folder),
                           "--shards", str(shard_dir), "--out", str(png)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert png.is_file() and f"config: {out / 'config.json'}" in done.stdout

    # the folder's weights are the run's: the same values as its consolidated export
    run_model, run_data = visualize.load_run_config(out / "config.json")
    from_folder = visualize.load_mae(folder, run_model, run_data).state_dict()
    exported = load_file(str(out / "model.safetensors"))
    assert set(from_folder) == set(exported)
    assert all(torch.equal(from_folder[key], exported[key]) for key in exported)


def test_weights_of_another_size_are_refused_with_a_hint(run_dir):
    wrong = dataclasses.replace(MODEL, decoder_embed_dim=64)
    with pytest.raises(ValueError, match="--config"):
        visualize.load_mae(run_dir / "checkpoint.safetensors", wrong, DATA)


def test_picture_names_its_rows_and_each_clips_source_and_frames(run_dir):
    model = visualize.load_mae(run_dir / "checkpoint.safetensors", MODEL, DATA)
    positions = visualize.predicted_positions(model, DATA.num_frames)
    assert positions == PREDICTED_FRAMES
    # a 20-frame video's centre clip of 8 frames 2 apart starts at frame 2: columns show video frames 2, 6, 10, 16
    assert visualize.caption_for("a.webm", 20, positions, DATA).frames == [2, 6, 10, 16]

    clips = torch.stack([visualize.clip_from_frames(visualize.decode_frames(v), DATA) for v in _videos(run_dir)])
    result = visualize.reconstruct(model, clips, DATA, seed=0)
    captions = [visualize.ClipCaption(f"video{i}.webm", [2, 6, 10, 16]) for i in range(2)]
    labelled = np.asarray(visualize.render_grid(result, 2, captions))
    other = np.asarray(visualize.render_grid(result, 2, [visualize.ClipCaption("x.webm", [1, 2, 3, 4])] * 2))
    tile = DATA.img_size * 2
    assert (labelled.shape[1], labelled.shape[0]) == visualize.grid_size(2, MODEL.pred_t_dim, tile)

    left, top = visualize.tile_origin(0, 0, 0, tile)
    bare_width = visualize.GAP + MODEL.pred_t_dim * (tile + visualize.GAP)
    assert labelled.shape[1] > bare_width and top > visualize.GAP  # a label column and a caption band
    for row in range(visualize.ROWS_PER_CLIP):  # each row's name is drawn left of its tiles
        _, y = visualize.tile_origin(1, row, 0, tile)
        assert (labelled[y : y + tile, : left - visualize.GAP] < 128).any(), row
    caption_band = (slice(0, top), slice(0, labelled.shape[1]))
    assert (labelled[caption_band] < 128).any()
    assert (labelled[caption_band] != other[caption_band]).any(), "the caption text comes from the captions"
    for clip in range(2):  # the captions never cover a tile
        for row in range(visualize.ROWS_PER_CLIP):
            np.testing.assert_array_equal(_tile(labelled, clip, row, 0, tile), _tile(other, clip, row, 0, tile))

"""The Camera Motion demo set: motion defines the class, videos are deterministic, files decode (PyAV and DALI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mae_st.demo import DEFAULT_CLASSES, generate_camera_motion, render_split, render_video

REPO = Path(__file__).resolve().parent.parent
GAP = 4  # frames between the two frames compared
SHIFTS = range(-18, 19, 2)  # pixels: covers the fastest pan or tilt (4 px a frame) over GAP frames
SCALES = (0.7, 0.8, 0.9, 1.1, 1.25, 1.4)  # zooming 3-5 % a frame magnifies by 0.81-0.89 or 1.13-1.23 over GAP
# the camera motions a pair of frames is tested against: (magnification, dx, dy) of the picture
CANDIDATES = ([(1.0, 0, 0)] + [(1.0, d, 0) for d in SHIFTS if d] + [(1.0, 0, d) for d in SHIFTS if d]
              + [(s, 0, 0) for s in SCALES])


def _grey(videos: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, H, W) grey, box-blurred so per-frame noise does not favour blurring warps."""
    grey = torch.from_numpy(videos.astype(np.float32).mean(axis=-1))[:, None]
    return F.avg_pool2d(grey, 3, stride=1, padding=1, count_include_pad=False)[:, 0]


def _warp(frames: torch.Tensor, scale: float, dx: float, dy: float) -> torch.Tensor:
    """The picture magnified by `scale` about the frame's centre, then moved by (dx, dy) pixels."""
    n, h, w = frames.shape
    theta = torch.tensor([[1 / scale, 0, -2 * dx / w], [0, 1 / scale, -2 * dy / h]]).expand(n, 2, 3)
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
    return F.grid_sample(frames[:, None], grid, align_corners=False)[:, 0]


def _camera_motion(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """(N, 3): the candidate (magnification, dx, dy) that maps each first frame best onto its second frame,
    judged on the central half of the frame (which every candidate keeps inside the picture)."""
    a, b = _grey(first), _grey(second)
    h, w = a.shape[-2:]
    centre = (slice(h // 4, 3 * h // 4), slice(w // 4, 3 * w // 4))
    errors = torch.stack([(_warp(a, *c)[:, centre[0], centre[1]] - b[:, centre[0], centre[1]]).abs().mean((1, 2))
                          for c in CANDIDATES], dim=1)
    return np.asarray(CANDIDATES, np.float32)[errors.argmin(dim=1).numpy()]


def _motion_features(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """(log magnification, |dx|, dy): a pan is one class whichever way it goes (training mirrors clips)."""
    scale, dx, dy = _camera_motion(first, second).T
    return np.stack([np.log(scale), np.abs(dx), dy], axis=1)


def _held_out_accuracy(train_features: np.ndarray, train_labels, val_features: np.ndarray, val_labels) -> float:
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    classifier.fit(train_features.reshape(len(train_features), -1), train_labels)
    return classifier.score(val_features.reshape(len(val_features), -1), val_labels)


@pytest.fixture(scope="module")
def short_splits():
    """360 train / 180 val videos of GAP + 1 frames as arrays (a few seconds to render)."""
    return render_split("train", 360, num_frames=GAP + 1), render_split("val", 180, num_frames=GAP + 1)


def test_one_frame_is_not_enough_but_two_frames_are(short_splits):
    (train, y_train), (val, y_val) = short_splits
    chance = 1.0 / len(DEFAULT_CLASSES)

    def pooled(frames):
        return _grey(frames).reshape(len(frames), 16, 4, 16, 4).mean(dim=(2, 4)).numpy()

    pixels = _held_out_accuracy(pooled(train[:, 0]), y_train, pooled(val[:, 0]), y_val)
    # the same motion estimate as below, from one frame only: it can only see that nothing moved
    one_frame = _held_out_accuracy(_motion_features(train[:, 0], train[:, 0]), y_train,
                                   _motion_features(val[:, 0], val[:, 0]), y_val)
    two_frames = _held_out_accuracy(_motion_features(train[:, 0], train[:, GAP]), y_train,
                                    _motion_features(val[:, 0], val[:, GAP]), y_val)
    assert pixels < chance + 0.1, f"a single frame's pixels classify at {pixels:.2f} (chance {chance:.2f})"
    assert one_frame < chance + 0.1, f"a single frame's motion estimate classifies at {one_frame:.2f}"
    assert two_frames > 0.85, f"two frames classify at only {two_frames:.2f}"


def test_each_class_moves_the_way_its_name_says(short_splits):
    (frames, labels), _ = short_splits
    motion = _camera_motion(frames[:, 0], frames[:, GAP])
    scale, dx, dy = motion[:, 0], motion[:, 1], motion[:, 2]
    # the camera moving one way moves the picture the other way, >= 2 px a frame
    expected = {
        "still": (scale == 1) & (dx == 0) & (dy == 0),
        "pan": (scale == 1) & (np.abs(dx) >= 6) & (dy == 0),
        "tilt_up": (scale == 1) & (dx == 0) & (dy >= 6),
        "tilt_down": (scale == 1) & (dx == 0) & (dy <= -6),
        "zoom_in": scale > 1,
        "zoom_out": scale < 1,
    }
    for label, name in enumerate(DEFAULT_CLASSES):
        share = expected[name][labels == label].mean()
        assert share >= 0.9, f"{name}: only {share:.0%} of its videos move that way; motions: {motion[labels == label]}"


def test_videos_depend_only_on_seed_split_and_index():
    first, label = render_video("train", 7, num_frames=4, size=32, seed=3)
    again, label_again = render_video("train", 7, num_frames=4, size=32, seed=3)
    np.testing.assert_array_equal(first, again)
    assert label == label_again == 7 % len(DEFAULT_CLASSES)
    many, _ = render_split("train", 9, num_frames=4, size=32, seed=3)
    np.testing.assert_array_equal(many[7], first)
    assert not np.array_equal(render_video("train", 7, num_frames=4, size=32, seed=4)[0], first)
    assert not np.array_equal(render_video("val", 7, num_frames=4, size=32, seed=3)[0], first)


def test_unknown_class_is_refused_with_the_known_names():
    with pytest.raises(ValueError, match="zoom_in"):
        render_video("train", 0, classes=("still", "spinning"))


def _decode_with_pyav(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def test_generator_writes_class_folders_of_videos_that_match_the_arrays(tmp_path):
    classes = ("still", "tilt_up", "pan")
    summary = generate_camera_motion(tmp_path, num_train=7, num_val=3, num_frames=8, size=48, seed=1,
                                     classes=classes)

    assert summary["counts"] == {
        "train": {"still": 3, "tilt_up": 2, "pan": 2}, "val": {"still": 1, "tilt_up": 1, "pan": 1}
    }
    assert json.loads((tmp_path / "camera_motion.json").read_text())["classes"] == list(classes)
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.webm"))
    assert len(written) == 10 and "train/tilt_up/train_00004.webm" in written and "val/pan/val_00002.webm" in written
    decoded = _decode_with_pyav(tmp_path / "train/tilt_up/train_00004.webm")
    expected, _ = render_video("train", 4, num_frames=8, size=48, seed=1, classes=classes)
    assert decoded.shape == expected.shape
    assert np.abs(decoded.astype(float) - expected).mean() < 12, "encoded video differs from the rendered frames"


def test_cli_writes_the_set_and_dali_cpu_decodes_it(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(
        [sys.executable, str(REPO / "tools/make_demo_data.py"), "--out_dir", str(tmp_path), "--num_train", "2",
         "--num_val", "1", "--num_frames", "6", "--classes", "tilt_down", "zoom_in"],
        check=True, env=env, capture_output=True,
    )
    video = tmp_path / "train/zoom_in/train_00001.webm"
    assert video.is_file() and (tmp_path / "val/tilt_down/val_00000.webm").is_file()

    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def decode():
        return fn.decoders.video(fn.external_source(lambda: [np.fromfile(video, np.uint8)], dtype=types.UINT8),
                                 device="cpu")

    pipe = decode()
    pipe.build()
    (frames,) = pipe.run()
    assert np.asarray(frames[0]).shape == (6, 64, 64, 3)

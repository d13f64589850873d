"""The Moving Digits demo set: motion defines the class, videos are deterministic, files decode (PyAV and DALI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mae_st.demo import DEFAULT_CLASSES, generate_moving_digits, render_split, render_video

REPO = Path(__file__).resolve().parent.parent
MAX_LAG = 5  # pixels; covers the fastest digit over the frame gap used below


def _grey(videos: np.ndarray) -> np.ndarray:
    return videos.astype(np.float32).mean(axis=-1)


def _pooled(frames: np.ndarray) -> np.ndarray:
    """(N, 64, 64) -> (N, 16, 16) means of 4x4 blocks: a small pixel vector for the linear model."""
    return frames.reshape(len(frames), 16, 4, 16, 4).mean(axis=(2, 4))


def _cross_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Circular cross-correlation of frames a, b (N, H, W) at lags within +-MAX_LAG, normalised by lag 0: (N, K, K)."""
    a = a - a.mean(axis=(-2, -1), keepdims=True)
    b = b - b.mean(axis=(-2, -1), keepdims=True)
    corr = np.fft.fftshift(np.fft.ifft2(np.conj(np.fft.fft2(a)) * np.fft.fft2(b)).real, axes=(-2, -1))
    mid = corr.shape[-1] // 2
    corr = corr[:, mid - MAX_LAG : mid + MAX_LAG + 1, mid - MAX_LAG : mid + MAX_LAG + 1]
    return corr / corr[:, MAX_LAG : MAX_LAG + 1, MAX_LAG : MAX_LAG + 1]


def _held_out_accuracy(train_features: np.ndarray, train_labels, val_features: np.ndarray, val_labels) -> float:
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    classifier.fit(train_features.reshape(len(train_features), -1), train_labels)
    return classifier.score(val_features.reshape(len(val_features), -1), val_labels)


@pytest.fixture(scope="module")
def short_splits():
    """600 train / 300 val five-frame videos as arrays (about a second to render)."""
    return render_split("train", 600, num_frames=5), render_split("val", 300, num_frames=5)


def test_one_frame_is_not_enough_but_two_frames_are(short_splits):
    (train, y_train), (val, y_val) = short_splits
    chance = 1.0 / len(DEFAULT_CLASSES)
    g_train, g_val = _grey(train), _grey(val)

    pixels = _held_out_accuracy(_pooled(g_train[:, 0]), y_train, _pooled(g_val[:, 0]), y_val)
    # the same quadratic statistic as below, computed on one frame only: it sees appearance, not motion
    one_frame = _held_out_accuracy(
        _cross_correlation(g_train[:, 2], g_train[:, 2]), y_train, _cross_correlation(g_val[:, 2], g_val[:, 2]), y_val
    )
    two_frames = _held_out_accuracy(
        _cross_correlation(g_train[:, 0], g_train[:, 4]), y_train, _cross_correlation(g_val[:, 0], g_val[:, 4]), y_val
    )
    assert pixels < chance + 0.1, f"a single frame's pixels classify at {pixels:.2f} (chance {chance:.2f})"
    assert one_frame < chance + 0.1, f"a single frame's autocorrelation classifies at {one_frame:.2f}"
    assert two_frames > 0.85, f"two frames classify at only {two_frames:.2f}"


def test_each_class_moves_the_way_its_name_says():
    frames, labels = render_split("train", 60, num_frames=5)
    corr = _cross_correlation(_grey(frames[:, 0]), _grey(frames[:, 4]))
    # the digit is the only moving thing; with the static background removed, the peak lag is its displacement
    motion = corr - _cross_correlation(_grey(frames[:, 0]), _grey(frames[:, 0]))
    peaks = np.stack(np.unravel_index(motion.reshape(len(motion), -1).argmax(1), motion.shape[1:]), 1) - MAX_LAG
    for (dy, dx), label, video in zip(peaks, labels, frames):
        name = DEFAULT_CLASSES[label]
        if name == "still":  # only the per-frame noise changes: no peak to find
            assert np.abs(video[0].astype(float) - video[4]).mean() < 9, "a still digit moved"
            continue
        vertical = {"up": -1, "diagonal_up": -1, "down": 1, "diagonal_down": 1}.get(name, 0)
        horizontal = name in ("sideways", "diagonal_up", "diagonal_down")
        # the slowest digit moves >= 2.1 px per axis over the 4-frame gap; the peak may be 1 px off
        assert (dy <= -2) if vertical < 0 else (dy >= 2) if vertical > 0 else abs(dy) <= 1, f"{name}: dy={dy}"
        assert abs(dx) >= 2 if horizontal else abs(dx) <= 1, f"{name}: dx={dx}"


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
    with pytest.raises(ValueError, match="sideways"):
        render_video("train", 0, classes=("still", "spinning"))


def _decode_with_pyav(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def test_generator_writes_class_folders_of_videos_that_match_the_arrays(tmp_path):
    classes = ("still", "up", "sideways")
    summary = generate_moving_digits(tmp_path, num_train=7, num_val=3, num_frames=8, size=48, seed=1, classes=classes)

    assert summary["counts"] == {
        "train": {"still": 3, "up": 2, "sideways": 2}, "val": {"still": 1, "up": 1, "sideways": 1}
    }
    assert json.loads((tmp_path / "moving_digits.json").read_text())["classes"] == list(classes)
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.webm"))
    assert len(written) == 10 and "train/up/train_00004.webm" in written and "val/sideways/val_00002.webm" in written
    decoded = _decode_with_pyav(tmp_path / "train/up/train_00004.webm")
    expected, _ = render_video("train", 4, num_frames=8, size=48, seed=1, classes=classes)
    assert decoded.shape == expected.shape
    assert np.abs(decoded.astype(float) - expected).mean() < 8, "encoded video differs from the rendered frames"


def test_cli_writes_the_set_and_dali_cpu_decodes_it(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(
        [sys.executable, str(REPO / "tools/make_demo_data.py"), "--out_dir", str(tmp_path), "--num_train", "2",
         "--num_val", "1", "--num_frames", "6", "--classes", "down", "diagonal_up"],
        check=True, env=env, capture_output=True,
    )
    video = tmp_path / "train/diagonal_up/train_00001.webm"
    assert video.is_file() and (tmp_path / "val/down/val_00000.webm").is_file()

    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def decode():
        return fn.decoders.video(fn.external_source(lambda: [np.fromfile(video, np.uint8)], dtype=types.UINT8),
                                 device="cpu")

    pipe = decode()
    pipe.build()
    (frames,) = pipe.run()
    assert np.asarray(frames[0]).shape == (6, 64, 64, 3)

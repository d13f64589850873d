"""Camera Motion: short videos of a camera panning, tilting and zooming over scikit-learn's two sample photographs
(shipped with the package, no download); the class is the camera's MOTION, never the content.

Why one frame cannot tell the classes apart: every class draws the photograph, the window's centre and size and
the colour gain from the same distributions, so a single frame is a random crop of a photograph whatever the
motion. Only comparing frames reveals the class.

Why MAE pretraining pays off here: natural images are predictable from their neighbours (in space and, under a
smooth camera motion, in time), so a small MAE learns real structure quickly, and a classifier trained from
scratch on a few labelled videos has to learn that structure too. (An earlier demo set, digits drifting over a
texture, was too sparse: its MAE learned little more than the mean colour and pretraining did not help.)

Why the classes are symmetric under a left-right flip: the training pipeline mirrors clips at random (as the
original MAE-ST), which turns a pan to the left into one to the right; so "pan" is one class (either sign).
Tilts and zooms are unchanged by a left-right flip.

Every video is a pure function of (seed, split, index): counts can change without changing the videos already
made, and the writer and the arrays used by tests are the same pixels.
"""

from __future__ import annotations

import json
import time
from functools import lru_cache
from pathlib import Path
from typing import Dict, Sequence, Tuple

import numpy as np
from PIL import Image

from mae_st.demo.video_writer import write_webm

# class name -> (horizontal, vertical) pan direction and zoom direction (+1 in, -1 out); y points down
CLASS_MOTIONS: Dict[str, Tuple[Tuple[float, float], int]] = {
    "still": ((0.0, 0.0), 0),
    "pan": ((1.0, 0.0), 0),  # either sign: one is drawn per video
    "tilt_up": ((0.0, -1.0), 0),
    "tilt_down": ((0.0, 1.0), 0),
    "zoom_in": ((0.0, 0.0), 1),
    "zoom_out": ((0.0, 0.0), -1),
}
DEFAULT_CLASSES: Tuple[str, ...] = tuple(CLASS_MOTIONS)
SPLITS = ("train", "val")
VIDEO_EXT = "webm"
SUMMARY_NAME = "camera_motion.json"

WINDOW_SIDE = (90.0, 200.0)  # photograph pixels shown across the first frame
SPEED_PER_FRAME = (2.0, 4.0)  # pan/tilt speed in output pixels per frame at 64 px; scaled with the frame size
ZOOM_PER_FRAME = (0.03, 0.05)  # relative change of the window side per frame
COLOUR_GAIN = (0.7, 1.2)
FRAME_NOISE_STD = 3.0


@lru_cache(maxsize=None)
def _canvases() -> Tuple[Tuple[Image.Image, int, int], ...]:
    """Each photograph mirrored twice its size on every side, so a moving window never leaves the picture."""
    from sklearn.datasets import load_sample_images  # sklearn is the demo's optional dependency; import when used

    canvases = []
    for photo in load_sample_images().images:
        h, w = photo.shape[:2]
        canvas = np.pad(photo, ((2 * h, 2 * h), (2 * w, 2 * w), (0, 0)), mode="symmetric")
        canvases.append((Image.fromarray(canvas), h, w))
    return tuple(canvases)


def _check_request(split: str, num_frames: int, size: int, classes: Sequence[str]) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    unknown = [name for name in classes if name not in CLASS_MOTIONS]
    if unknown or len(classes) < 2 or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be >= 2 distinct names from {DEFAULT_CLASSES}, got {list(classes)}")
    if num_frames < 2 or size < 16 or size % 2:
        raise ValueError(
            f"need num_frames >= 2 and an even size >= 16 (VP9 wants even sides), got {num_frames}, {size}"
        )


def render_video(
    split: str, index: int, num_frames: int = 32, size: int = 64, seed: int = 0,
    classes: Sequence[str] = DEFAULT_CLASSES,
) -> Tuple[np.ndarray, int]:
    """Video `index` of `split`: (frames (T, size, size, 3) uint8 RGB, label). Labels cycle, so classes balance."""
    _check_request(split, num_frames, size, classes)
    label = index % len(classes)
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    canvases = _canvases()
    canvas, h, w = canvases[rng.integers(len(canvases))]
    side = rng.uniform(*WINDOW_SIDE)
    centre = np.array([2 * w + rng.uniform(0, w), 2 * h + rng.uniform(0, h)])  # (x, y) over the photograph
    (dx, dy), zoom_sign = CLASS_MOTIONS[classes[label]]
    sign = rng.choice([-1.0, 1.0]) if dx else 1.0
    speed = rng.uniform(*SPEED_PER_FRAME) * side / 64  # photograph pixels per frame
    zoom = 1.0 - zoom_sign * rng.uniform(*ZOOM_PER_FRAME) if zoom_sign else 1.0
    gain = rng.uniform(*COLOUR_GAIN, 3).astype(np.float32)

    frames = np.empty((num_frames, size, size, 3), np.uint8)
    for t in range(num_frames):
        x, y = centre + t * speed * np.array([sign * dx, dy])
        half = side * zoom**t / 2
        window = canvas.transform((size, size), Image.EXTENT, (x - half, y - half, x + half, y + half),
                                  Image.BILINEAR)
        frame = np.asarray(window, np.float32) * gain + rng.normal(0.0, FRAME_NOISE_STD, (size, size, 1))
        frames[t] = frame.clip(0.0, 255.0).astype(np.uint8)
    return frames, label


def render_split(
    split: str, num_videos: int, num_frames: int = 32, size: int = 64, seed: int = 0,
    classes: Sequence[str] = DEFAULT_CLASSES,
) -> Tuple[np.ndarray, np.ndarray]:
    """The first `num_videos` videos of `split` as arrays, unencoded: (N, T, H, W, 3) uint8 and labels (N,)."""
    videos = [render_video(split, i, num_frames, size, seed, classes) for i in range(num_videos)]
    frames = np.stack([v for v, _ in videos]) if videos else np.empty((0, num_frames, size, size, 3), np.uint8)
    return frames, np.asarray([label for _, label in videos], dtype=np.int64)


def video_path(out_dir: str | Path, split: str, class_name: str, index: int) -> Path:
    """Where video `index` of `split` lives: `<out>/<split>/<class>/<split>_<index>.webm`."""
    return Path(out_dir) / split / class_name / f"{split}_{index:05d}.{VIDEO_EXT}"


def generate_camera_motion(
    out_dir: str | Path, num_train: int = 400, num_val: int = 100, num_frames: int = 32, size: int = 64,
    seed: int = 0, fps: float = 12.0, classes: Sequence[str] = DEFAULT_CLASSES,
) -> Dict:
    """Renders and encodes the demo set as class folders of VP9 videos under `out_dir`; returns a summary dict,
    also written to `<out_dir>/camera_motion.json`. Existing files of the same names are overwritten."""
    classes = tuple(classes)
    began = time.perf_counter()
    counts: Dict[str, Dict[str, int]] = {}
    for split, num_videos in (("train", num_train), ("val", num_val)):
        _check_request(split, num_frames, size, classes)
        counts[split] = {name: 0 for name in classes}
        for index in range(num_videos):
            frames, label = render_video(split, index, num_frames, size, seed, classes)
            write_webm(video_path(out_dir, split, classes[label], index), frames, fps)
            counts[split][classes[label]] += 1
    summary = dict(
        dataset="camera_motion", out_dir=str(out_dir), classes=list(classes), counts=counts,
        num_train=num_train, num_val=num_val, num_frames=num_frames, size=size, fps=fps, seed=seed,
        codec="vp9", seconds=round(time.perf_counter() - began, 2),
    )
    Path(out_dir, SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    return summary

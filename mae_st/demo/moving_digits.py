"""Moving Digits: short videos of a handwritten digit (scikit-learn's 8x8 `load_digits`, shipped with the package,
no download) drifting over a textured background; the class is the MOTION, never the appearance.

Why one frame cannot tell the classes apart: every class draws the digit, its size, colour, background and start
position from the same distributions, and positions wrap around the frame (a torus), so the digit's position in
any single frame is uniform whatever the motion. Only comparing frames reveals the class.

Why the classes are symmetric under a left-right flip: the training pipeline mirrors clips at random (as the
original MAE-ST), which turns "left" into "right"; so horizontal motion is one class ("sideways", either sign) and
the diagonals are told apart only by their vertical part.

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

_DIAGONAL = float(np.sqrt(0.5))
# class name -> the unit velocities (dx, dy) a video of it may have (y points down); one is drawn per video
CLASS_MOTIONS: Dict[str, Tuple[Tuple[float, float], ...]] = {
    "still": ((0.0, 0.0),),
    "up": ((0.0, -1.0),),
    "down": ((0.0, 1.0),),
    "sideways": ((-1.0, 0.0), (1.0, 0.0)),
    "diagonal_up": ((-_DIAGONAL, -_DIAGONAL), (_DIAGONAL, -_DIAGONAL)),
    "diagonal_down": ((-_DIAGONAL, _DIAGONAL), (_DIAGONAL, _DIAGONAL)),
}
DEFAULT_CLASSES: Tuple[str, ...] = tuple(CLASS_MOTIONS)
SPLITS = ("train", "val")
VIDEO_EXT = "webm"
SUMMARY_NAME = "moving_digits.json"

# appearance ranges, as fractions of the frame side where sizes are concerned
DIGIT_SIDE = (0.35, 0.5)
SPEED_PER_FRAME = (0.75, 2.0)  # pixels per frame at 64 px; scaled with the frame size
BACKGROUND_LEVELS = (10.0, 90.0)
FRAME_NOISE_STD = 6.0
# every 5th of the 1797 digit images is kept for validation, so val videos show unseen handwriting
VAL_DIGIT_EVERY = 5


@lru_cache(maxsize=None)
def _digit_images(split: str) -> np.ndarray:
    """(N, 8, 8) float32 in [0, 1]: the sklearn digits of this split (val: every 5th image, train: the rest)."""
    from sklearn.datasets import load_digits  # sklearn is the demo's optional dependency; import only when used

    images = load_digits().images.astype(np.float32) / 16.0
    is_val = np.arange(len(images)) % VAL_DIGIT_EVERY == 0
    return images[is_val] if split == "val" else images[~is_val]


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


def _upscale(image: np.ndarray, side: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((side, side), Image.BILINEAR)).clip(0.0, 1.0)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random texture (H, W, 3): coarse noise upscaled, so it has structure the model must ignore."""
    low, high = BACKGROUND_LEVELS
    coarse = rng.uniform(low, high, (6, 6, 3)).astype(np.float32)
    channels = [Image.fromarray(np.ascontiguousarray(coarse[..., c])).resize((size, size), Image.BICUBIC)
                for c in range(3)]
    return np.stack([np.asarray(channel) for channel in channels], axis=-1)


def _wrapped_shift(image: np.ndarray, dy: float, dx: float) -> np.ndarray:
    """`image` moved by a sub-pixel (dy, dx) on a torus: a bilinear blend of four whole-pixel rolls."""
    iy, ix = int(np.floor(dy)), int(np.floor(dx))
    fy, fx = dy - iy, dx - ix

    def rolled(oy: int, ox: int) -> np.ndarray:
        return np.roll(image, (iy + oy, ix + ox), axis=(0, 1))

    return ((1 - fy) * (1 - fx) * rolled(0, 0) + (1 - fy) * fx * rolled(0, 1)
            + fy * (1 - fx) * rolled(1, 0) + fy * fx * rolled(1, 1))


def render_video(
    split: str, index: int, num_frames: int = 32, size: int = 64, seed: int = 0,
    classes: Sequence[str] = DEFAULT_CLASSES,
) -> Tuple[np.ndarray, int]:
    """Video `index` of `split`: (frames (T, size, size, 3) uint8 RGB, label). Labels cycle, so classes balance."""
    _check_request(split, num_frames, size, classes)
    label = index % len(classes)
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    digits = _digit_images(split)
    side = int(round(size * rng.uniform(*DIGIT_SIDE)))
    sprite = np.zeros((size, size), np.float32)
    sprite[:side, :side] = _upscale(digits[rng.integers(len(digits))], side)
    colour = rng.uniform(150.0, 255.0, 3).astype(np.float32)
    background = _background(rng, size)
    motions = CLASS_MOTIONS[classes[label]]
    velocity = np.asarray(motions[rng.integers(len(motions))]) * rng.uniform(*SPEED_PER_FRAME) * size / 64
    start = rng.uniform(0.0, size, 2)  # (x, y), uniform on the torus

    frames = np.empty((num_frames, size, size, 3), np.uint8)
    for t in range(num_frames):
        x, y = start + t * velocity
        alpha = _wrapped_shift(sprite, y, x)[..., None]
        frame = background * (1.0 - alpha) + colour * alpha + rng.normal(0.0, FRAME_NOISE_STD, (size, size, 1))
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


def generate_moving_digits(
    out_dir: str | Path, num_train: int = 400, num_val: int = 100, num_frames: int = 32, size: int = 64,
    seed: int = 0, fps: float = 12.0, classes: Sequence[str] = DEFAULT_CLASSES,
) -> Dict:
    """Renders and encodes the demo set as class folders of VP9 videos under `out_dir`; returns a summary dict,
    also written to `<out_dir>/moving_digits.json`. Existing files of the same names are overwritten."""
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
        dataset="moving_digits", out_dir=str(out_dir), classes=list(classes), counts=counts,
        num_train=num_train, num_val=num_val, num_frames=num_frames, size=size, fps=fps, seed=seed,
        codec="vp9", seconds=round(time.perf_counter() - began, 2),
    )
    Path(out_dir, SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    return summary

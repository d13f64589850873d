"""Real video files for the tests, written with PyAV.

`frame_index_frames` paints each frame's index into its pixels so a test can read back which source frames a
decoded clip came from, even through lossy VP9/H.264 compression and a resize.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

CODEC_BY_SUFFIX = {".webm": "libvpx-vp9", ".mkv": "libvpx-vp9", ".mp4": "libx264", ".avi": "mjpeg"}


def write_video(path: str | Path, frames: np.ndarray, fps: float = 30, codec: str | None = None,
                gop: int | None = None) -> Path:
    """Encode `frames` (T, H, W, 3) uint8 RGB into `path`; the codec follows the suffix unless given; `gop`: frames
    between keyframes (the encoder's default when None)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = codec or CODEC_BY_SUFFIX[path.suffix]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if codec == "libvpx-vp9":
            stream.options = {"deadline": "realtime", "cpu-used": "8", "crf": "30", "b": "0",
                              **({"g": str(gop), "keyint_min": str(gop)} if gop else {})}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def frame_index_frames(num_frames: int, height: int = 64, width: int = 64) -> np.ndarray:
    """Frames whose brightness encodes their index: frame i is a flat grey of level 8 * (i % 32) + 4."""
    levels = (8 * (np.arange(num_frames) % 32) + 4).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (num_frames, height, width, 3)).copy()


def decode_frame_index(level: float) -> int:
    """Inverse of `frame_index_frames` for one frame's mean level in 0..255 (index modulo 32)."""
    return int(round((level - 4) / 8)) % 32


def moving_square_frames(num_frames: int, height: int = 64, width: int = 64, seed: int = 0) -> np.ndarray:
    """A textured square sliding across a noisy background: learnable content for tiny training runs."""
    rng = np.random.default_rng(seed)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    background = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    side = height // 3
    colour = rng.integers(120, 255, 3, dtype=np.uint8)
    for t in range(num_frames):
        frames[t] = background
        x = (t * 3) % (width - side)
        y = (height - side) // 2
        frames[t, y : y + side, x : x + side] = colour
    return frames

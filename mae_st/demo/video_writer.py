"""Writes uint8 RGB frames as a VP9 .webm with PyAV: the codec DALI's CPU decoder reads."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

# Fastest libvpx settings: demo clips are tiny, and quality at crf 30 is plenty for 64x64 frames.
VP9_OPTIONS = {"deadline": "realtime", "cpu-used": "8", "crf": "30", "b": "0"}


def write_webm(path: str | Path, frames: np.ndarray, fps: float) -> Path:
    """Encodes `frames` (T, H, W, 3) uint8 RGB into a VP9 WebM file at `path` (even H and W)."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="webm") as container:
        stream = container.add_stream("libvpx-vp9", rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = "yuv420p"
        stream.options = dict(VP9_OPTIONS)
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path

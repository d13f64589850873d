"""The `FrameDecoder` of `mae_st.data.clip_reader` on the CPU, with PyAV (FFmpeg's software decoders).

It decodes from the start of the video up to the last requested frame, in decode order, and keeps the requested
ones: exact frame indices without depending on seek accuracy. The CPU tests run the reader and the pipeline above
it on this decoder, and `decoder="pyav"` uses it on machines without NVDEC.
"""

from __future__ import annotations

from typing import Dict, Sequence

import av
import numpy as np
import torch


class PyAVDecoder:
    """Decodes chosen frames of a video file to a (len(indices), H, W, 3) uint8 CPU tensor; one per thread."""

    def __init__(self, threads: int = 1):
        self.threads = threads  # FFmpeg threads per video; the reader already decodes several videos at once
        self.videos = 0  # decode calls so far (what tests count: one per video, whatever its clip count)
        self.frames = 0  # frames decoded so far, requested or passed over

    def decode(self, path: str, frame_indices: Sequence[int]) -> torch.Tensor:
        """Frames `frame_indices` (any order, repeats allowed) of `path`; an index past the last frame gives the
        last frame, as the DALI graphs pad a clip. Raises on a file FFmpeg cannot read or that has no frames."""
        self.videos += 1
        wanted = set(int(i) for i in frame_indices)
        if not wanted:
            raise ValueError("no frame indices requested")
        kept: Dict[int, np.ndarray] = {}
        last_wanted = max(wanted)
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_count = self.threads
            index, frame = -1, None
            for index, frame in enumerate(container.decode(stream)):
                self.frames += 1
                if index in wanted:
                    kept[index] = frame.to_ndarray(format="rgb24")
                if index >= last_wanted:
                    break
            if frame is None:
                raise ValueError(f"{path}: no video frames decoded")
            # requested frames past the real end (a container that over-counts) repeat the last one
            end = kept[index] if index in kept else frame.to_ndarray(format="rgb24")
        return torch.from_numpy(np.stack([kept.get(int(i), end) for i in frame_indices]))

    def close(self) -> None:
        """Nothing to release: PyAV opens and closes a container per video."""

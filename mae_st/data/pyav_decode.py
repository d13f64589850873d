"""The `FrameDecoder` of `mae_st.data.clip_reader` on the CPU, with PyAV (FFmpeg's software decoders).

It seeks to the keyframe at or before the first requested frame, decodes forward in decode order up to the last
requested one and keeps the requested ones. A frame's index is its position in the video: the first frame after
the seek gets it from its timestamp, the frames after it count on from there, so the indices match decoding from
the start on constant-rate video (the packer writes nothing else). When the container cannot seek there (no
timestamps, a failed seek, or one that lands after the frame asked for) it decodes from the start instead. For a
finetuning clip at stride 4 in 10 s videos it decodes ~75 frames instead of ~178, 1.5x faster (docs/performance.md).

The CPU tests run the reader and the pipeline above it on this decoder, and `decoder="pyav"` uses it on machines
without NVDEC. Beside NVDEC threads on a GPU machine it measured slower, not faster: its threads hold the GIL
long enough to stall the NVDEC ones (docs/performance.md).
"""

from __future__ import annotations

import itertools
from fractions import Fraction
from typing import Dict, Iterator, Optional, Sequence, Tuple

import av
import numpy as np
import torch


class PyAVDecoder:
    """Decodes chosen frames of a video file to a (len(indices), H, W, 3) uint8 CPU tensor; one per thread."""

    def __init__(self, threads: int = 1, seek: bool = True):
        self.threads = threads  # FFmpeg threads per video; the reader already decodes several videos at once
        self.seek = seek
        self.videos = 0  # decode calls so far (what tests count: one per video, whatever its clip count)
        self.frames = 0  # frames decoded so far, requested or passed over
        self.seeks = 0  # videos whose decoding started at a keyframe after the first frame

    def decode(self, path: str, frame_indices: Sequence[int]) -> torch.Tensor:
        """Frames `frame_indices` (any order, repeats allowed) of `path`; an index past the last frame gives the
        last frame, as the DALI graphs pad a clip. Raises on a file FFmpeg cannot read or that has no frames."""
        self.videos += 1
        wanted = set(int(i) for i in frame_indices)
        if not wanted:
            raise ValueError("no frame indices requested")
        decoded = self._decode_from_keyframe(path, wanted) if self.seek and min(wanted) > 0 else None
        if decoded is None:
            with av.open(path) as container:
                decoded = self._decode_on(container, container.decode(self._stream(container)), 0, wanted)
        kept, last = decoded  # requested frames past the real end (a container that over-counts) repeat the last
        return torch.from_numpy(np.stack([kept.get(int(i), last) for i in frame_indices]))

    def _stream(self, container):
        stream = container.streams.video[0]
        stream.thread_count = self.threads
        return stream

    def _decode_from_keyframe(self, path: str, wanted: set) -> Optional[Tuple[Dict[int, np.ndarray], np.ndarray]]:
        """Seeks to the keyframe at or before min(wanted) and decodes on; None when the container cannot."""
        with av.open(path) as container:
            stream = self._stream(container)
            rate, start = stream.average_rate or stream.guessed_rate, stream.start_time or 0
            if not rate or stream.time_base is None:
                return None
            first = min(wanted)
            try:
                container.seek(start + int(Fraction(first) / Fraction(rate) / stream.time_base), stream=stream,
                               backward=True, any_frame=False)
                frames = container.decode(stream)
                frame = next(frames, None)
            except av.error.FFmpegError:  # a container without a usable index: decoding from the start still may work
                return None
            if frame is None or frame.pts is None:
                return None
            index = round(float((frame.pts - start) * stream.time_base * rate))
            if not 0 <= index <= first:
                return None  # the seek went past the first frame asked for
            self.seeks += index > 0
            return self._decode_on(container, itertools.chain([frame], frames), index, wanted)

    def _decode_on(self, container, frames: Iterator, index: int, wanted: set) -> Tuple[Dict[int, np.ndarray],
                                                                                      np.ndarray]:
        """Decodes `frames` (the first is frame `index`) up to the last wanted one: ({index: rgb}, last rgb)."""
        kept: Dict[int, np.ndarray] = {}
        last_wanted, frame = max(wanted), None
        for index, frame in enumerate(frames, start=index):
            self.frames += 1
            if index in wanted:
                kept[index] = frame.to_ndarray(format="rgb24")
            if index >= last_wanted:
                break
        if frame is None:
            raise ValueError(f"{container.name}: no video frames decoded")
        return kept, kept[index] if index in kept else frame.to_ndarray(format="rgb24")

    def close(self) -> None:
        """Nothing to release: PyAV opens and closes a container per video."""

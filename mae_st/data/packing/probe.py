"""What a video file holds (PyAV): codec, size, frame rate, frame count, duration, rotation; or why it is unusable."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

import av


class RejectedVideo(Exception):
    """The file cannot be packed; the message is the reason written to failures.csv."""


@dataclass(frozen=True)
class VideoInfo:
    codec: str
    width: int  # as stored (before rotation)
    height: int
    fps: float
    frames: int
    duration: float  # seconds
    rotation: int  # degrees counter-clockwise to display upright (0, 90, 180, 270)
    container: str  # demuxer name, e.g. "matroska,webm"


def probe_video(path: str, count_frames: bool) -> VideoInfo:
    """Probe `path`; `count_frames` decodes every frame (the count is then exact and the file known to decode)."""
    try:
        with av.open(path, metadata_errors="ignore") as container:
            if not container.streams.video:
                raise RejectedVideo("no video stream (audio-only or not a video)")
            stream = container.streams.video[0]
            if stream.codec_context is None or not stream.codec_context.name:
                raise RejectedVideo("video stream has no decoder in this FFmpeg build")
            first = _first_frame(container, stream)
            fps = _frame_rate(stream)
            if count_frames:
                container.seek(0)
                frames, last_time = _decode_all(container, stream)
                duration = (last_time + 1 / fps) if last_time is not None else frames / fps
            else:
                frames = stream.frames or _count_packets(container, stream)
                duration = _declared_duration(container, stream) or frames / fps
            return VideoInfo(codec=stream.codec_context.name, width=first.width, height=first.height, fps=fps,
                             frames=frames, duration=round(duration, 6), rotation=_rotation(first),
                             container=container.format.name)
    except RejectedVideo:
        raise
    except (av.FFmpegError, OSError, ValueError, IndexError) as err:
        raise RejectedVideo(f"cannot decode: {err}") from err


def display_size(info: VideoInfo) -> tuple:
    """(width, height) after applying the rotation."""
    return (info.height, info.width) if info.rotation in (90, 270) else (info.width, info.height)


def _first_frame(container, stream) -> av.VideoFrame:
    for frame in container.decode(stream):
        return frame
    raise RejectedVideo("no decodable video frame")


def _decode_all(container, stream):
    frames, last_time = 0, None
    for frame in container.decode(stream):
        frames += 1
        if frame.time is not None:
            last_time = frame.time if last_time is None else max(last_time, frame.time)
    first_time = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    return frames, (last_time - first_time if last_time is not None else None)


def _count_packets(container, stream) -> int:
    container.seek(0)
    return sum(1 for packet in container.demux(stream) if packet.size)


def _frame_rate(stream) -> float:
    rate: Optional[Fraction] = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate or rate <= 0:
        raise RejectedVideo("video stream declares no frame rate")
    return float(rate)


def _declared_duration(container, stream) -> float:
    if stream.duration is not None and stream.time_base:
        return float(stream.duration * stream.time_base)
    return container.duration / av.time_base if container.duration else 0.0


def _rotation(frame) -> int:
    return int(round(frame.rotation / 90.0)) % 4 * 90

"""What a worker process does for one input file: probe it, then copy or transcode it into its staging folder,
and leave a result.json saying what was produced (or why the file was rejected)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from mae_st.data.format import VIDEO_EXTS
from mae_st.data.packing.probe import RejectedVideo, VideoInfo, probe_video
from mae_st.data.packing.transcode import COPY, EncodedPiece, EncodeSettings, transcode_video

RESULT_NAME = "result.json"


@dataclass(frozen=True)
class WorkItem:
    input_id: int
    source: str
    settings: EncodeSettings
    staging_dir: str  # this input's own folder


def process_input(item: WorkItem) -> None:
    """Entry point of a worker process; never raises for a bad file (the reason goes into result.json)."""
    folder = Path(item.staging_dir)
    if folder.exists():
        shutil.rmtree(folder)  # leftovers of an interrupted attempt
    folder.mkdir(parents=True)
    try:
        info, codec, pieces = _pack_one(item)
        result = {"status": "ok", "info": asdict(info), "codec": codec, "pieces": [asdict(p) for p in pieces]}
    except RejectedVideo as err:
        result = {"status": "failed", "reason": str(err)}
    except Exception as err:  # noqa: BLE001 - a decoder error of any kind rejects this file, not the run
        result = {"status": "failed", "reason": f"{type(err).__name__}: {err}"}
    write_result(folder, result)


def write_result(folder: Path, result: dict) -> None:
    """Write result.json atomically: its presence means this input is finished (resume skips it)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (RESULT_NAME + ".tmp")
    tmp.write_text(json.dumps(result, sort_keys=True))
    os.replace(tmp, folder / RESULT_NAME)


def read_result(folder: Path):
    path = Path(folder) / RESULT_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def _pack_one(item: WorkItem):
    settings = item.settings
    if settings.codec == COPY:
        info = probe_video(item.source, count_frames=True)  # stored as-is, so it must decode to the end
        _check_length(info.frames, settings.min_frames)
        return info, info.codec, [_copied_piece(item.source, info)]
    info = probe_video(item.source, count_frames=False)
    pieces = transcode_video(item.source, info, settings, str(Path(item.staging_dir) / "piece"))
    if not pieces:
        raise RejectedVideo(f"too short: fewer than --min_frames {settings.min_frames} decodable frames "
                            f"(the container declares {info.frames})")
    return info, settings.codec, pieces


def _check_length(frames: int, min_frames: int) -> None:
    if frames < min_frames:
        raise RejectedVideo(f"too short: {frames} decodable frames (< --min_frames {min_frames})")


def _copied_piece(source: str, info: VideoInfo) -> EncodedPiece:
    ext = Path(source).suffix.lower().lstrip(".")
    if ext not in VIDEO_EXTS:
        raise RejectedVideo(f"container .{ext} cannot be stored as-is (readers take {', '.join(VIDEO_EXTS)}); "
                            "transcode it with --codec vp9/h264/hevc")
    return EncodedPiece(file=os.path.abspath(source), segment=0, start_sec=0.0, end_sec=info.duration,
                        frames=info.frames, fps=info.fps, width=info.width, height=info.height)

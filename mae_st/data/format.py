"""The shard format, shared by the writer (`tools/shard_videos.py`) and the reader (`mae_st.data`).

A shard set is a folder holding:
  <prefix>-000000.tar ...   WebDataset tars; each sample is `<key>.<video ext>` + `<key>.json`, or for the
                            jpeg payload `<key>.000000.jpg`, `<key>.000001.jpg`, ... (one per frame) + `<key>.json`
  <prefix>-000000.idx ...   DALI index file of each tar (lets `fn.readers.webdataset` seek without a scan)
  manifest.csv              one row per packed sample (the "datafile" of the original repo)
  labels.json               label name -> index
  summary.json              counts, settings, tool version
  failures.csv              path, reason for every input that was not packed
Keeping these names and the metadata schema here means writer and reader cannot drift apart.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from typing import Optional

FORMAT_VERSION = 1

# Container extensions a video member may carry; DALI maps all of them to one output ("a;b;c").
VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov", "m4v")
META_EXT = "json"
# jpeg payload: frame i of a sample is the member `<key>.<i:06d>.jpg`
FRAME_EXT = "jpg"
_FRAME_MEMBER_EXT = re.compile(r"\d{6}\." + FRAME_EXT)

MANIFEST_NAME = "manifest.csv"
LABELS_NAME = "labels.json"
SUMMARY_NAME = "summary.json"
FAILURES_NAME = "failures.csv"
SHARD_SUFFIX = ".tar"
INDEX_SUFFIX = ".idx"

NO_LABEL = -1  # pretraining sets carry no labels

MANIFEST_COLUMNS = (
    "key", "shard", "label", "label_name", "source", "segment", "start_sec", "end_sec",
    "frames", "fps", "width", "height", "duration", "codec", "bytes",
)


def frame_file_name(index: int) -> str:
    """Frame `index`'s file name; the tar member is `<key>.<this>`, so its WebDataset extension is this."""
    return f"{index:06d}.{FRAME_EXT}"


def is_frame_ext(ext: str) -> bool:
    return _FRAME_MEMBER_EXT.fullmatch(ext) is not None


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}{SHARD_SUFFIX}"


def index_name_for(shard_path: str) -> str:
    """`.../train-000003.tar` -> `.../train-000003.idx`."""
    base = shard_path[: -len(SHARD_SUFFIX)] if shard_path.endswith(SHARD_SUFFIX) else shard_path
    return base + INDEX_SUFFIX


@dataclass
class SampleMeta:
    """The JSON member stored beside every video in a shard."""

    key: str
    label: int
    label_name: str
    source: str  # path of the original file, as given to the packer
    frames: int
    fps: float
    width: int
    height: int
    duration: float  # seconds
    codec: str
    segment: int = 0  # index of this piece when a long recording was split, else 0
    start_sec: float = 0.0
    end_sec: Optional[float] = None
    # degrees counter-clockwise the stored frames must turn to display upright; the packer's transcode
    # applies it (0), copy mode stores the original bytes and records it here
    rotation: int = 0

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "SampleMeta":
        data = json.loads(raw)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

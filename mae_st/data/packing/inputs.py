"""Which files to pack and their labels: class folders under `--data_dirs`, or a `--file_list` CSV."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from mae_st.data.format import NO_LABEL

# what a recursive scan packs; every other file under the data dirs is reported as skipped, with the reason
SCANNED_VIDEO_EXTS = frozenset({
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp", ".ts", ".mts",
    ".m2ts", ".ogv",
})


@dataclass(frozen=True)
class VideoInput:
    """One file to pack, with its label (NO_LABEL when unlabelled); `problem` says why it cannot be packed."""

    path: str
    label: int = NO_LABEL
    label_name: str = ""
    problem: str = ""


class Scan(NamedTuple):
    """What a scan of the data dirs found: the inputs, the label map, and every other entry with why it is
    not packed (path, reason), so nothing in the folders goes unmentioned."""

    inputs: List[VideoInput]
    labels: Dict[str, int]
    skipped: List[Tuple[str, str]]


def scan_data_dirs(data_dirs: Sequence[str], labelled: bool) -> Scan:
    """Video files under `data_dirs` (recursive, sorted) labelled by their first folder below the data dir."""
    found: List[Tuple[str, str]] = []  # (path, class name or "")
    skipped: List[Tuple[str, str]] = []
    for data_dir in data_dirs:
        root = Path(data_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"--data_dirs {data_dir}: not a folder")
        videos, others = _scan_folder(root)
        skipped += others
        for path in videos:
            parts = path.relative_to(root).parts
            found.append((str(path), parts[0] if len(parts) > 1 else ""))
    if not labelled:
        return Scan([VideoInput(path) for path, _ in found], {}, skipped)
    labels = {name: i for i, name in enumerate(sorted({name for _, name in found if name}))}
    inputs = [VideoInput(path, labels[name], name) if name else
              VideoInput(path, problem="not inside a class folder (labels come from the first sub-folder of "
                                       "--data_dirs; pass --no_labels for unlabelled footage)")
              for path, name in found]
    return Scan(inputs, labels, skipped)


def read_file_list(file_list: str, labelled: bool) -> Tuple[List[VideoInput], Dict[str, int]]:
    """Rows `path[,label]` of a CSV (or the original repo's `path label` lines); relative paths are taken
    from the CSV's folder. Labels are all indices or all names (names are numbered in sorted order)."""
    base = Path(file_list).parent
    rows = [_split_row(row) for row in _csv_rows(file_list)]
    if rows and rows[0][0].strip().lower() == "path":
        rows = rows[1:]  # a header
    paths = [str(Path(p) if os.path.isabs(p) else base / p) for p, _ in rows]
    if not labelled:
        return [VideoInput(p) for p in paths], {}
    missing = [i + 1 for i, (_, label) in enumerate(rows) if label is None]
    if missing:
        raise ValueError(f"--file_list {file_list}: rows {missing[:5]} have no label; give `path,label` or "
                         "pass --no_labels")
    labels = _label_indices([label for _, label in rows], file_list)
    return [VideoInput(p, labels[label], label) for p, (_, label) in zip(paths, rows)], labels


def mark_missing_files(inputs: Sequence[VideoInput]) -> List[VideoInput]:
    """Inputs whose path does not exist get a problem (they end in failures.csv, not as a crash)."""
    return [i if i.problem or os.path.lexists(i.path) else
            VideoInput(i.path, i.label, i.label_name, problem="file not found") for i in inputs]


def _scan_folder(root: Path) -> Tuple[List[Path], List[Tuple[str, str]]]:
    """The video files under `root` (sorted), and every other file or unscanned folder with its reason."""
    videos: List[Path] = []
    skipped: List[Tuple[str, str]] = []
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            reason = _unscanned_folder_reason(Path(folder) / name)
            if reason:
                skipped.append((str(Path(folder) / name), reason))
        dirs[:] = [d for d in dirs if not _unscanned_folder_reason(Path(folder) / d)]
        for name in files:
            reason = _skipped_file_reason(name)
            if reason:
                skipped.append((str(Path(folder) / name), reason))
            else:
                videos.append(Path(folder) / name)
    return sorted(videos), sorted(skipped)


def _unscanned_folder_reason(path: Path) -> str:
    if path.name.startswith("."):
        return "hidden folder (its name starts with '.'): not scanned"
    if path.is_symlink():  # os.walk does not follow links; say so rather than leave the folder out silently
        return "link to a folder: not followed; pass its target in --data_dirs to pack it"
    return ""


def _skipped_file_reason(name: str) -> str:
    if name.startswith("."):
        return "hidden file (its name starts with '.')"
    suffix = Path(name).suffix.lower()
    if suffix not in SCANNED_VIDEO_EXTS:
        return (f"not a video by its extension ({suffix or 'none'}); name it in --file_list to try packing it "
                "anyway")
    return ""


def _csv_rows(file_list: str) -> List[List[str]]:
    with open(file_list, newline="") as f:
        return [row for row in csv.reader(f) if row and any(cell.strip() for cell in row)]


def _split_row(row: List[str]) -> Tuple[str, Optional[str]]:
    if len(row) >= 2:
        return row[0].strip(), row[1].strip()
    fields = row[0].rsplit(maxsplit=1)
    if len(fields) == 2 and fields[1].lstrip("-").isdigit():  # the original repo's "path label" lines
        return fields[0], fields[1]
    return row[0].strip(), None


def _label_indices(labels: List[str], file_list: str) -> Dict[str, int]:
    numeric = [label.lstrip("-").isdigit() for label in labels]
    if all(numeric):
        return {label: int(label) for label in labels}
    if any(numeric):
        raise ValueError(f"--file_list {file_list}: labels mix indices and names (e.g. {labels[numeric.index(True)]!r}"
                         f" and {labels[numeric.index(False)]!r}); use one kind")
    return {name: i for i, name in enumerate(sorted(set(labels)))}

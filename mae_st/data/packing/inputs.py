"""Which files to pack and their labels: class folders under `--data_dirs`, or a `--file_list` CSV."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from mae_st.data.format import NO_LABEL

# what a recursive scan picks up; anything else under the data dirs is not considered an input
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


def scan_data_dirs(data_dirs: Sequence[str], labelled: bool) -> Tuple[List[VideoInput], Dict[str, int]]:
    """Video files under `data_dirs` (recursive, sorted) labelled by their first folder below the data dir."""
    found: List[Tuple[str, str]] = []  # (path, class name or "")
    for data_dir in data_dirs:
        root = Path(data_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"--data_dirs {data_dir}: not a folder")
        for path in sorted(_video_files(root)):
            parts = path.relative_to(root).parts
            found.append((str(path), parts[0] if len(parts) > 1 else ""))
    if not labelled:
        return [VideoInput(path) for path, _ in found], {}
    labels = {name: i for i, name in enumerate(sorted({name for _, name in found if name}))}
    inputs = [VideoInput(path, labels[name], name) if name else
              VideoInput(path, problem="not inside a class folder (labels come from the first sub-folder of "
                                       "--data_dirs; pass --no_labels for unlabelled footage)")
              for path, name in found]
    return inputs, labels


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


def _video_files(root: Path):
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and Path(name).suffix.lower() in SCANNED_VIDEO_EXTS:
                yield Path(folder) / name


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

"""Samples that cannot be read: found by the shard check at start-up, by a decoder, or by an unreadable metadata
member. Each is logged with its key, shard and reason, counted against DataConfig.max_bad_sample_fraction and,
when the run has an output folder, appended to `<output_dir>/bad_samples/rank<r>.jsonl`, so a resumed run leaves
out every sample any rank found bad instead of meeting it again.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Set, Tuple

log = logging.getLogger(__name__)

BAD_SAMPLES_DIR = "bad_samples"
# the bad-sample share is judged only once this many samples were read (one early failure is not "most")
MIN_SAMPLES_FOR_BAD_FRACTION = 20


@dataclass(frozen=True)
class BadSample:
    tar: str
    key: str
    reason: str

    @property
    def id(self) -> Tuple[str, str]:
        return os.path.abspath(self.tar), self.key


class BadSampleRegistry:
    """The bad samples one rank knows of, and the share of bad samples among those read."""

    def __init__(self, max_fraction: float, rank: int, folder: Optional[str] = None):
        self.max_fraction, self.rank = max_fraction, rank
        self._file = Path(folder, BAD_SAMPLES_DIR, f"rank{rank}.jsonl") if folder else None
        self._known: Dict[Tuple[str, str], BadSample] = {}
        self.found: List[BadSample] = []  # in the order this process met them
        self._found_ids: Set[Tuple[str, str]] = set()
        for sample in _read_logged(self._file.parent) if self._file else []:
            self._known.setdefault(sample.id, sample)
        if self._known:
            log.info("%d bad samples known from %s are left out", len(self._known), self._file.parent)

    def __contains__(self, ref) -> bool:
        return (os.path.abspath(ref.tar), ref.key) in self._known

    def __len__(self) -> int:
        return len(self.found)

    def add(self, sample: BadSample) -> bool:
        """Records a bad sample this rank met; False if it met it already. Samples another rank (or an earlier
        run) logged count here too, but are not logged twice."""
        if sample.id in self._found_ids:
            return False
        self._found_ids.add(sample.id)
        self.found.append(sample)
        log.warning("skipping unreadable sample %s in %s (%d bad so far on rank %d): %s", sample.key, sample.tar,
                    len(self.found), self.rank, sample.reason)
        logged = sample.id in self._known
        self._known[sample.id] = sample
        if self._file is not None and not logged:
            self._file.parent.mkdir(parents=True, exist_ok=True)
            with open(self._file, "a") as f:
                f.write(json.dumps(asdict(sample)) + "\n")
        return True

    def known_ids(self) -> Set[Tuple[str, str]]:
        return set(self._known)

    def check_fraction(self, read: int, final: bool = False) -> None:
        """Stops the run when more than max_fraction of the samples read (good + bad) were bad."""
        bad = len(self.found)
        seen = read + bad
        if not bad or (not final and seen < MIN_SAMPLES_FOR_BAD_FRACTION):
            return
        if bad > self.max_fraction * seen:
            raise RuntimeError(
                f"{bad} of {seen} samples read on rank {self.rank} could not be read (more than "
                f"DataConfig.max_bad_sample_fraction={self.max_fraction}); first: "
                f"{[f'{s.key} in {s.tar}: {s.reason}' for s in self.found[:5]]}. Check the shards with "
                "`python tools/shard_videos.py --verify <folder>` and re-pack or re-copy them.")


def _read_logged(folder: Path) -> Iterable[BadSample]:
    """Every rank's logged bad samples (a line cut off by a killed run is ignored)."""
    for path in sorted(folder.glob("rank*.jsonl")) if folder.is_dir() else []:
        for line in path.read_text().splitlines():
            try:
                yield BadSample(**json.loads(line))
            except (ValueError, TypeError):
                continue

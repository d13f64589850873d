"""Multi-view evaluation: average each video's view predictions, then score top-1/top-5.

Views of one video may arrive in different batches and, with several ranks, on different ranks. The aggregator
keeps per-video sums and counts; `state()` gives plain tensors a trainer can all_gather, and `merge_state()`
folds gathered states together (sums add, so the split between batches and ranks does not matter).
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.distributed as dist


class MultiViewAggregator:
    """Collect logits per video id; `accuracy()` returns top-1/top-5 (%) of the view-averaged predictions."""

    def __init__(self, num_classes: int, average: str = "softmax"):
        if average not in ("softmax", "logits"):
            raise ValueError(f"average={average!r}: expected 'softmax' or 'logits'")
        self.num_classes, self.average = num_classes, average
        self._sums: Dict[str, torch.Tensor] = {}
        self._counts: Dict[str, int] = {}
        self._labels: Dict[str, int] = {}

    def update(self, logits: torch.Tensor, labels: torch.Tensor, video_ids: Sequence[str]) -> None:
        """Add one batch of views: logits (N, classes), labels (N,), one video id per view."""
        scores = logits.detach().float()
        scores = scores.softmax(dim=-1) if self.average == "softmax" else scores
        scores, labels = scores.cpu(), labels.cpu().tolist()
        for row, label, vid in zip(scores, labels, video_ids):
            self._add(vid, row, 1, int(label))

    def state(self) -> dict:
        """Everything collected, as tensors and a list of ids (what a rank sends to the others)."""
        ids = sorted(self._sums)
        return {
            "ids": ids,
            "sums": torch.stack([self._sums[i] for i in ids]) if ids else torch.zeros(0, self.num_classes),
            "counts": torch.tensor([self._counts[i] for i in ids], dtype=torch.long),
            "labels": torch.tensor([self._labels[i] for i in ids], dtype=torch.long),
        }

    def merge_state(self, state: dict) -> None:
        """Fold in another aggregator's `state()` (another rank's views)."""
        for vid, row, count, label in zip(state["ids"], state["sums"], state["counts"].tolist(),
                                          state["labels"].tolist()):
            self._add(vid, row, count, label)

    def all_gather(self) -> None:
        """Merge every rank's views into this one (no-op without torch.distributed); call on all ranks."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        states: List[dict] = [None] * dist.get_world_size()
        dist.all_gather_object(states, self.state())
        own = dist.get_rank()
        for rank, state in enumerate(states):
            if rank != own:
                self.merge_state(state)

    def predictions(self) -> dict:
        """Per video id: view-averaged scores, number of views, label."""
        return {vid: (self._sums[vid] / self._counts[vid], self._counts[vid], self._labels[vid]) for vid in self._sums}

    def accuracy(self) -> Dict[str, float]:
        """top-1 / top-5 accuracy (%) over videos, plus how many videos were scored."""
        state = self.state()
        if not state["ids"]:
            return {"acc1": 0.0, "acc5": 0.0, "videos": 0}
        mean = state["sums"] / state["counts"].unsqueeze(1)
        k = min(5, self.num_classes)
        top = mean.topk(k, dim=1).indices
        hits = top == state["labels"].unsqueeze(1)
        return {"acc1": 100.0 * hits[:, 0].float().mean().item(),
                "acc5": 100.0 * hits.any(dim=1).float().mean().item(), "videos": len(state["ids"])}

    def _add(self, vid: str, row: torch.Tensor, count: int, label: int) -> None:
        if vid in self._sums:
            if self._labels[vid] != label:
                raise ValueError(f"video {vid!r} arrived with labels {self._labels[vid]} and {label}; "
                                 "the shard metadata is inconsistent")
            self._sums[vid] += row
            self._counts[vid] += count
        else:
            self._sums[vid] = row.clone()
            self._counts[vid] = count
            self._labels[vid] = label

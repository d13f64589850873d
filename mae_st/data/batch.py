"""The unit every data source hands the trainer (shard loader, synthetic clips)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch


@dataclass
class Batch:
    """Clips (B * clips per video, C, T, H, W) on the training device, their labels, and (evaluation) the video
    each clip belongs to."""

    clips: torch.Tensor
    labels: torch.Tensor
    video_ids: Optional[List[str]] = None

    def __iter__(self):
        """Unpacks as `clips, labels` (training) or `clips, labels, video_ids` (evaluation)."""
        yield self.clips
        yield self.labels
        if self.video_ids is not None:
            yield self.video_ids

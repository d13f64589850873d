"""The offline packer behind `tools/shard_videos.py`: raw videos in, WebDataset shards (+ DALI indexes) out.

inputs (find videos, labels) -> worker (probe, copy or transcode, one isolated process per file) ->
tar_writer (deterministic tars and index files) -> packer (plan, resume, manifest and reports).
"""

from mae_st.data.packing.packer import PackOptions, PackResult, pack_videos

__all__ = ["PackOptions", "PackResult", "pack_videos"]

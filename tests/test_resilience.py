"""What a week-long run meets, on real shards the tests write and damage, read by the real DALI CPU pipelines:
a truncated shard, garbage inside a shard, a missing index, a shard deleted mid-run, an unreadable metadata
member; the bad-sample list kept for a resume; an epoch started at any step without reading its way there; and
`tools/shard_videos.py --verify`. End-to-end runs of train.py on damaged and resumed sets are in
tests/test_train_resilience.py."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from mae_st.data.format import index_name_for, shard_name
from mae_st.data.index import members_of, read_index
from mae_st.data.loader import build_eval_loader, build_train_loader
from tests.test_pipeline import DEVICE, tiny_config, write_shards

ROOT = Path(__file__).resolve().parents[1]
SHARDS = [3, 3, 2]  # v0-v2, v3-v5, v6-v7
ALL = set(range(sum(SHARDS)))


def tar_of(folder: Path, shard: int) -> Path:
    return folder / shard_name("test", shard)


def member_span(folder: Path, shard: int, key: str, ext: str):
    """(data offset, size) of a sample's member, from the packer-style index."""
    tar = str(tar_of(folder, shard))
    sample = next(s for s in read_index(tar, index_name_for(tar)) if s.key == key)
    return next((offset, size) for e, offset, size, _ in members_of(sample.index_line) if e == ext)


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def epoch_labels(loader, epoch: int = 0) -> list:
    """Every video a training epoch delivered (one clip per video: repeat_aug 1), in order."""
    loader.set_epoch(epoch)
    return [int(x) for _, labels in loader for x in labels]


@pytest.fixture(params=["dali", "pyav"])
def decoder(request) -> str:
    """DALI's reader graphs, and reused decoders (ClipStream; PyAV stands in for NVDEC sessions on the CPU)."""
    return request.param


def loader_for(folder, tmp_path=None, **overrides):
    cfg = tiny_config(str(folder), repeat_aug=1, batch_size_per_gpu=1, max_bad_sample_fraction=0.5, **overrides)
    return build_train_loader(cfg, "pretrain", num_classes=8, rank=0, world_size=1, device=DEVICE, seed=3,
                              state_dir=str(tmp_path) if tmp_path else None)


def assert_each_good_once(delivered: list, bad: set) -> None:
    """Every good sample delivered, none twice, except that an epoch's fixed step count (set at start-up) is
    filled from another pass when samples turn bad during it."""
    counts = Counter(delivered)
    assert set(counts) == ALL - bad, counts
    assert len(delivered) - len(counts) == (len(bad) if len(delivered) == len(ALL) else 0), counts


def test_truncated_shard_loses_only_the_samples_it_cut(tmp_path, caplog, decoder):
    folder = Path(write_shards(tmp_path / "s", SHARDS, "video"))
    tar = tar_of(folder, 1)
    os.truncate(tar, tar.stat().st_size // 2)
    caplog.set_level(logging.WARNING)
    loader = loader_for(folder, decoder=decoder)
    cut = {int(b.key[1:]) for b in loader.registry.found}
    assert cut and cut <= {3, 4, 5} and 3 not in cut  # the shard's first sample lies in its first half
    assert len(loader) == (8 - len(cut)) // 1
    assert_each_good_once(epoch_labels(loader), cut)
    assert loader.stats_record()["bad_samples"] == len(cut)
    assert "truncated copy" in caplog.text and "v5" in caplog.text


def test_unreadable_metadata_member_is_a_bad_sample_not_a_crash(tmp_path, caplog, decoder):
    folder = Path(write_shards(tmp_path / "s", SHARDS, "video"))
    offset, size = member_span(folder, 0, "v1", "json")
    overwrite(tar_of(folder, 0), offset, b"\x00{garbage" + b"#" * (size - 10))
    caplog.set_level(logging.WARNING)
    loader = loader_for(folder, pipelines_per_gpu=2, decoder=decoder)
    assert_each_good_once(epoch_labels(loader), {1})
    assert [b.key for b in loader.registry.found] == ["v1"]
    assert "metadata member v1.json is unreadable" in caplog.text


def test_garbage_inside_a_shard_skips_what_it_hit_and_delivers_the_rest(tmp_path, decoder):
    folder = Path(write_shards(tmp_path / "s", [8], "video"))
    tar = tar_of(folder, 0)
    middle = tar.stat().st_size // 2
    overwrite(tar, middle, os.urandom(4096))
    hit = set()
    for sample in read_index(str(tar), index_name_for(str(tar))):
        if any(o - 512 < middle + 4096 and middle < o + s for _, o, s, _ in members_of(sample.index_line)):
            hit.add(int(sample.key[1:]))
    loader = loader_for(folder, decoder=decoder)
    delivered = epoch_labels(loader)
    bad = {int(b.key[1:]) for b in loader.registry.found}
    assert bad <= hit  # only what the garbage touched is lost (a garbled video may still decode)
    assert_each_good_once(delivered, bad)


def test_missing_index_is_rebuilt_from_the_tar(tmp_path, caplog, decoder):
    folder = Path(write_shards(tmp_path / "s", SHARDS, "video"))
    os.remove(index_name_for(str(tar_of(folder, 2))))
    caplog.set_level(logging.WARNING)
    loader = loader_for(folder, decoder=decoder)
    assert_each_good_once(epoch_labels(loader), set())
    assert "rebuilt from the tar's headers (2 samples)" in caplog.text


def test_shard_deleted_mid_run_loses_its_samples_from_the_next_epoch_on(tmp_path, caplog, decoder):
    folder = Path(write_shards(tmp_path / "s", SHARDS, "video"))
    loader = loader_for(folder, decoder=decoder)
    assert_each_good_once(epoch_labels(loader, 0), set())
    os.remove(tar_of(folder, 1))
    caplog.set_level(logging.WARNING)
    delivered = epoch_labels(loader, 1)
    assert set(delivered) == ALL - {3, 4, 5}  # the steps of the epoch are refilled from a second pass
    assert {b.key for b in loader.registry.found} == {"v3", "v4", "v5"}
    assert "deleted or moved during the run" in caplog.text


def test_bad_samples_found_are_kept_for_a_resumed_run(tmp_path, decoder):
    folder = Path(write_shards(tmp_path / "s", SHARDS, "video", corrupt={"v4"}))
    first = loader_for(folder, tmp_path / "run", decoder=decoder)
    assert_each_good_once(epoch_labels(first), {4})
    resumed = loader_for(folder, tmp_path / "run", decoder=decoder)
    assert "v4" in {key for _, key in resumed.registry.known_ids()}
    assert_each_good_once(epoch_labels(resumed), {4})
    assert len(resumed.registry) == 0  # never met again
    if decoder == "dali":  # no failed batch, so no rebuild of its pipeline
        assert resumed.stats.pipeline_builds == first.stats.pipeline_builds - 1


@pytest.mark.parametrize("mode", ["pretrain", "finetune"])
def test_an_epoch_started_at_a_step_repeats_the_uninterrupted_one_without_reading_its_way_there(tmp_path, mode,
                                                                                                decoder):
    folder = write_shards(tmp_path / "s", [3, 3, 4], "video")
    cfg = tiny_config(folder, repeat_aug=2, batch_size_per_gpu=1, pipelines_per_gpu=2, pipeline_segment_batches=3,
                      rand_aug=mode == "finetune", jitter_scales_relative=(0.3, 1.0), decoder=decoder)

    def epoch_from(step: int) -> list:
        loader = build_train_loader(cfg, mode, num_classes=10, rank=0, world_size=1, device=DEVICE, seed=5)
        loader.set_epoch(1, step)
        return [(clips, labels) for clips, labels in loader], loader.stats.resume_dropped_batches

    full, _ = epoch_from(0)
    assert len(full) == 10
    for step in (3, 5, 8):
        tail, dropped = epoch_from(step)
        assert len(tail) == 10 - step
        for (clips, labels), (want_clips, want_labels) in zip(tail, full[step:]):
            assert torch.equal(labels, want_labels) and torch.equal(clips, want_clips)
        # each of the 2 streams decodes at most segment - 1 batches it drops, wherever the resume lands
        assert dropped <= 2 * (3 - 1)


def test_two_ranks_with_damaged_shards_still_read_disjoint_parts(tmp_path):
    folder = Path(write_shards(tmp_path / "s", SHARDS, "video", corrupt={"v1"}))
    os.truncate(tar_of(folder, 2), tar_of(folder, 2).stat().st_size // 2)
    seen = []
    for rank in range(2):
        cfg = tiny_config(str(folder), repeat_aug=1, batch_size_per_gpu=1, max_bad_sample_fraction=0.5)
        loader = build_train_loader(cfg, "pretrain", 8, rank=rank, world_size=2, device=DEVICE, seed=3)
        seen.append(epoch_labels(loader))
    assert not set(seen[0]) & set(seen[1]) and 1 not in set(seen[0]) | set(seen[1])


def test_evaluation_skips_a_truncated_shard_and_counts_every_other_video_once(tmp_path):
    folder = Path(write_shards(tmp_path / "s", SHARDS, "video"))
    os.truncate(tar_of(folder, 0), tar_of(folder, 0).stat().st_size // 2)
    cfg = tiny_config(str(folder), test_num_ensemble_views=1, test_num_spatial_crops=1, batch_size_per_gpu=2,
                      max_bad_sample_fraction=0.5)
    loader = build_eval_loader(cfg, 0, 1, DEVICE)
    ids = [vid for _, _, video_ids in loader for vid in video_ids]
    cut = {b.key for b in loader.registry.found}
    assert cut and Counter(ids) == Counter({f"v{i}" for i in ALL} - cut)


def test_mostly_damaged_set_stops_at_start_up_naming_the_samples(tmp_path):
    folder = Path(write_shards(tmp_path / "s", [2, 6], "video"))
    os.truncate(tar_of(folder, 1), 1024)
    with pytest.raises(ValueError, match=r"6 of 8 samples of the shard set are damaged.*v2 in .*--verify"):
        loader_for(folder)


def run_verify(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/shard_videos.py", "--verify", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_verify_command_names_what_is_damaged_and_exits_non_zero(tmp_path):
    folder = Path(write_shards(tmp_path / "s", SHARDS, "video", corrupt={"v7"}))
    clean = run_verify(str(folder))
    assert clean.returncode == 0 and "0 damaged of 8 samples" in clean.stdout
    decoded = run_verify(str(folder), "--decode")  # v7's bytes are not a video: only decoding finds it
    assert decoded.returncode == 1 and "damaged: v7 in" in decoded.stdout
    os.truncate(tar_of(folder, 1), tar_of(folder, 1).stat().st_size // 2)
    offset, _ = member_span(folder, 0, "v0", "json")
    overwrite(tar_of(folder, 0), offset - 512, b"\xff" * 64)  # v0's metadata member's tar header
    os.remove(index_name_for(str(tar_of(folder, 2))))
    damaged = run_verify(str(folder))
    assert damaged.returncode == 1, damaged.stdout + damaged.stderr
    assert "damaged: v0 in" in damaged.stdout and "damaged: v5 in" in damaged.stdout
    assert "truncated copy" in damaged.stdout and "index missing or unreadable" in damaged.stdout


def test_each_pipeline_builds_index_files_are_deleted_when_it_ends(tmp_path):
    folder = write_shards(tmp_path / "s", SHARDS, "video")
    loader = loader_for(folder, pipelines_per_gpu=2, pipeline_segment_batches=1)
    root = Path(loader._index_root.name)
    alive = [len(list(root.iterdir())) for _ in loader]
    assert loader.stats.pipeline_builds == 8 and max(alive) <= 2  # a build a batch, at most one a stream alive
    assert not list(root.iterdir())


def test_augmenting_ahead_on_a_thread_gives_the_batches_of_augmenting_inline(tmp_path):
    folder = write_shards(tmp_path / "s", SHARDS, "video", corrupt={"v2"})
    epochs = []
    for ahead in (0, 2):
        loader = loader_for(folder, decoder="pyav", augment_ahead=ahead, rand_aug=True, pipeline_segment_batches=3)
        epochs.append([(clips, labels) for clips, labels in loader])
        loader.close()
    assert len(epochs[0]) == len(epochs[1]) == 8
    for (clips, labels), (ahead_clips, ahead_labels) in zip(*epochs):
        assert torch.equal(labels, ahead_labels) and torch.equal(clips, ahead_clips)

"""The DALI video pipeline over real shards the tests write: VP9 on the CPU backend by default, and every test
again on the jpeg payload (one JPEG per frame, `--codec jpeg` in the packer).

The same tests check the GPU path (NVDEC/nvJPEG through DALI's "mixed" decoders) with
`MAE_ST_TEST_DECODE=gpu MAE_ST_TEST_CODEC=h264|vp9` (benchmarks/bench.py runs both).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from torchvision.io import encode_jpeg
from wds2idx import IndexCreator

from mae_st.config import DataConfig
from mae_st.data.augment import build_batch_transform
from mae_st.data.format import SampleMeta, frame_file_name, index_name_for, shard_name
from mae_st.data.frames import FRAMES, VIDEO, random_starts, shard_payload, uniform_starts
from mae_st.data.index import read_shard_indexes
from mae_st.data.loader import NVDEC_PIPELINES, build_eval_loader, build_train_loader, resolve_pipelines_per_gpu
from mae_st.data.shards import list_shards
from mae_st.data.views import MultiViewAggregator
from tests.video_factory import decode_frame_index, frame_index_frames, write_video

DECODE = os.environ.get("MAE_ST_TEST_DECODE", "cpu")  # cpu | gpu
CODEC = os.environ.get("MAE_ST_TEST_CODEC", "vp9")  # vp9 | h264 (h264 needs gpu: DALI's CPU decoder lacks it)
VIDEO_EXT = {"vp9": "webm", "h264": "mp4"}[CODEC]
DEVICE = torch.device("cuda" if DECODE == "gpu" else "cpu")
# NVDEC decodes nothing smaller than 128x128 (VP9); the CPU runs keep frames small
HEIGHT, WIDTH = (144, 192) if DECODE == "gpu" else (48, 64)
LONG, SHORT = 40, 6  # frames per test video


def video_frames(num_frames: int, video_id: int) -> np.ndarray:
    """Green encodes the frame index (video_factory levels); blue encodes which video it is."""
    frames = frame_index_frames(num_frames, HEIGHT, WIDTH)
    frames[..., 0] = 128
    frames[..., 2] = blue_level(video_id)
    return frames


def blue_level(video_id: int) -> int:
    return 30 + 25 * video_id


def write_shards(folder: Path, videos_per_shard: list, payload: str, corrupt: set = frozenset()) -> str:
    """Shards of CODEC samples (or, for the frames payload, a JPEG per frame); sample i has key v<i>, label i
    and LONG frames (SHORT when i % 4 == 3)."""
    folder.mkdir(parents=True, exist_ok=True)
    vid = 0
    for shard, count in enumerate(videos_per_shard):
        tar = str(folder / shard_name("test", shard))
        with wds.TarWriter(tar) as writer:
            for _ in range(count):
                key = f"v{vid}"
                frames = SHORT if vid % 4 == 3 else LONG
                meta = SampleMeta(key=key, label=vid, label_name=f"class{vid}", source=key, frames=frames,
                                  fps=30.0, width=WIDTH, height=HEIGHT, duration=frames / 30, codec=CODEC)
                sample = {"__key__": key, "json": meta.to_json()}
                if payload == FRAMES:
                    sample.update(jpeg_members(video_frames(frames, vid), corrupt=key in corrupt))
                else:
                    path = write_video(folder / "src" / f"{key}.{VIDEO_EXT}", video_frames(frames, vid))
                    sample[VIDEO_EXT] = b"\x1aE\xdf\xa3 not a video" * 50 if key in corrupt else path.read_bytes()
                writer.write(sample)
                vid += 1
        with IndexCreator(tar, index_name_for(tar), verbose=False) as creator:
            creator.create_index()
    return str(folder)


def jpeg_members(frames: np.ndarray, corrupt: bool) -> dict:
    """The frames payload: member `<i:06d>.jpg` per frame; a corrupt sample's frames are not JPEGs (only the
    frames a clip reads are decoded, so all of them are broken)."""
    members = {}
    for i, frame in enumerate(frames):
        data = encode_jpeg(torch.from_numpy(frame).permute(2, 0, 1).contiguous(), quality=95).numpy().tobytes()
        members[frame_file_name(i)] = b"\xff\xd8\xff not a jpeg" * 20 if corrupt else data
    return members


@pytest.fixture(scope="module", params=[VIDEO, FRAMES])
def payload(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def shards(tmp_path_factory, payload) -> str:
    return write_shards(tmp_path_factory.mktemp("shards"), [5, 3], payload)


def tiny_config(shards: str, **overrides) -> DataConfig:
    base = DataConfig(train_shards=shards, val_shards=shards, num_frames=4, sampling_rate=3, img_size=32,
                      repeat_aug=3, batch_size_per_gpu=2, num_threads=2, decoder_threads=2, shuffle_buffer=4,
                      test_num_ensemble_views=2, test_num_spatial_crops=3, decode_device=DECODE)
    return dataclasses.replace(base, **overrides)


def pixel_levels(clips: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """Per clip, channel and frame: the mean level back in 0..255 units."""
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1, 1)
    return ((clips.float().cpu() * std + mean) * 255).mean(dim=(3, 4))  # (N, C, T)


def frame_indices(clip_levels: torch.Tensor) -> list:
    return [decode_frame_index(float(level)) for level in clip_levels[1]]


def video_id_of(clip_levels: torch.Tensor) -> int:
    return int(round((float(clip_levels[2].mean()) - 30) / 25))


def value_range(cfg: DataConfig) -> tuple:
    return (0 - max(cfg.mean)) / min(cfg.std) - 1e-3, (1 - min(cfg.mean)) / min(cfg.std) + 1e-3


def test_pretrain_batches_have_clip_geometry_and_stride(shards):
    cfg = tiny_config(shards)
    loader = build_train_loader(cfg, "pretrain", num_classes=8, rank=0, world_size=1, device=DEVICE)
    assert len(loader) == 8 // 2
    batches = list(loader)
    assert len(batches) == len(loader)
    for clips, labels in batches:
        assert clips.shape == (2 * 3, 3, 4, 32, 32) and clips.dtype == torch.float32
        assert labels.shape == (6,) and labels.dtype == torch.int64
        low, high = value_range(cfg)
        assert low <= clips.min() and clips.max() <= high
        for levels, label in zip(pixel_levels(clips, cfg), labels):
            assert video_id_of(levels) == label  # the clip's pixels come from the labelled video
            steps = np.diff(frame_indices(levels)) % 32
            if label % 4 == 3:  # SHORT video: frames past its end repeat the last one (edge padding)
                assert frame_indices(levels) == [0, 3, 5, 5]
            else:
                assert list(steps) == [3, 3, 3]


def test_repeat_aug_clips_are_different_views_of_one_video(shards):
    cfg = tiny_config(shards, repeat_aug=4)
    loader = build_train_loader(cfg, "pretrain", num_classes=8, rank=0, world_size=1, device=DEVICE)
    clips, labels = next(iter(loader))
    for video in range(2):
        group = clips[4 * video : 4 * (video + 1)]
        assert len(set(labels[4 * video : 4 * (video + 1)].tolist())) == 1
        levels = pixel_levels(group, cfg)
        assert len({video_id_of(lv) for lv in levels}) == 1
        starts = {frame_indices(lv)[0] for lv in levels}
        distinct_pixels = not all(torch.equal(group[0], g) for g in group[1:])
        # a SHORT video has one start only, and its flat frames look alike under every crop and flip
        assert (distinct_pixels and len(starts) > 1) or labels[4 * video] % 4 == 3


def test_epochs_differ_and_repeat_with_the_same_epoch(shards):
    cfg = tiny_config(shards, repeat_aug=1)
    loader = build_train_loader(cfg, "pretrain", num_classes=8, rank=0, world_size=1, device=DEVICE, seed=1)
    orders = []
    for epoch in (0, 1, 0):
        loader.set_epoch(epoch)
        orders.append([int(x) for _, labels in loader for x in labels])
    assert orders[0] == orders[2] and orders[0] != orders[1]
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(8))


@pytest.mark.parametrize("pipelines", [1, 4])  # 4: more pipelines than a rank's part has batches (2)
def test_two_ranks_read_disjoint_parts_that_cover_the_epoch(shards, pipelines):
    cfg = tiny_config(shards, repeat_aug=1, pipelines_per_gpu=pipelines)
    seen = []
    for rank in range(2):
        loader = build_train_loader(cfg, "pretrain", num_classes=8, rank=rank, world_size=2, device=DEVICE)
        assert len(loader) == (8 // 2) // 2
        seen.append({int(x) for _, labels in loader for x in labels})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(8))


def test_finetune_gives_soft_targets_with_mixup_and_rand_augment(shards):
    cfg = tiny_config(shards, rand_aug=True, reprob=0.5, mixup=0.8, cutmix=1.0, repeat_aug=2)
    loader = build_train_loader(cfg, "finetune", num_classes=8, rank=0, world_size=1, device=DEVICE,
                                dtype=torch.bfloat16)
    clips, labels = next(iter(loader))
    clips, targets = build_batch_transform(cfg, "finetune", num_classes=8)(clips, labels)
    assert clips.shape == (4, 3, 4, 32, 32) and clips.dtype == torch.bfloat16
    assert targets.shape == (4, 8) and targets.dtype == torch.float32
    assert torch.allclose(targets.sum(dim=1).cpu(), torch.ones(4))
    assert (targets > 0).sum(dim=1).min() >= 2  # smoothing/mixing spreads every target


def test_eval_views_are_uniform_in_time_and_cover_every_video_once(shards):
    cfg = tiny_config(shards)
    loader = build_eval_loader(cfg, rank=0, world_size=1, device=DEVICE)
    assert len(loader) == 4
    ids = []
    for clips, labels, video_ids in loader:
        views = cfg.test_num_ensemble_views * cfg.test_num_spatial_crops
        assert clips.shape == (len(video_ids), 3, 4, 32, 32) and len(video_ids) == 2 * views
        levels = pixel_levels(clips, cfg)
        for v in range(0, len(video_ids), views):
            label = int(labels[v])
            starts = [frame_indices(levels[v + t * 3 + s])[0] for t in range(2) for s in range(3)]
            last_start = (SHORT if label % 4 == 3 else LONG) - 1 - 9
            assert starts == [0] * 3 + [max(last_start, 0) % 32] * 3
        ids += video_ids[::views]
    assert sorted(ids) == sorted(f"v{i}" for i in range(8))


def test_eval_ranks_split_videos_without_gaps(shards):
    cfg = tiny_config(shards, test_num_ensemble_views=1, test_num_spatial_crops=1, batch_size_per_gpu=3)
    per_rank = [{vid for _, _, ids in build_eval_loader(cfg, rank, 3, DEVICE) for vid in ids} for rank in range(3)]
    assert sum(len(s) for s in per_rank) == 8 and set().union(*per_rank) == {f"v{i}" for i in range(8)}


@pytest.mark.parametrize("pipelines, batch", [(2, 2), (3, 1)])  # sub-parts of 4+4 and of 2+3+3 samples
def test_concurrent_pipelines_train_on_distinct_videos_and_replay_an_epoch(shards, pipelines, batch):
    cfg = tiny_config(shards, repeat_aug=2, batch_size_per_gpu=batch, pipelines_per_gpu=pipelines)
    loader = build_train_loader(cfg, "pretrain", num_classes=8, rank=0, world_size=1, device=DEVICE, seed=1)
    assert len(loader) == 8 // batch
    epochs = []
    for _ in range(2):
        batches = list(loader)
        assert len(batches) == len(loader)
        for clips, labels in batches:
            assert clips.shape == (batch * 2, 3, 4, 32, 32) and labels.shape == (batch * 2,)
            assert [video_id_of(levels) for levels in pixel_levels(clips, cfg)] == labels.tolist()
        epochs.append([int(x) for _, labels in batches for x in labels[::2]])
    assert sorted(epochs[0]) == list(range(8))  # sub-part sizes are multiples of the batch: no video twice
    assert epochs[0] == epochs[1]  # same seed and epoch: same batches in the same order (resume)
    assert loader.stats.pipeline_builds == 2 * pipelines


def test_default_pipeline_count_is_several_on_nvdec_and_one_on_the_cpu_decoder():
    cfg = DataConfig()
    assert cfg.pipelines_per_gpu == 0 and NVDEC_PIPELINES == 4
    assert resolve_pipelines_per_gpu(cfg, decode_device_id=0) == NVDEC_PIPELINES
    assert resolve_pipelines_per_gpu(cfg, decode_device_id=None) == 1
    assert resolve_pipelines_per_gpu(cfg, decode_device_id=0, payload=FRAMES) == 1
    assert resolve_pipelines_per_gpu(dataclasses.replace(cfg, pipelines_per_gpu=3), None) == 3
    with pytest.raises(ValueError, match="pipelines_per_gpu=-1"):
        resolve_pipelines_per_gpu(dataclasses.replace(cfg, pipelines_per_gpu=-1), None)


@pytest.mark.parametrize("pipelines", [2, 3])
def test_concurrent_pipelines_evaluate_every_video_once(shards, pipelines):
    cfg = tiny_config(shards, test_num_ensemble_views=1, test_num_spatial_crops=1, batch_size_per_gpu=3,
                      pipelines_per_gpu=pipelines)
    loader = build_eval_loader(cfg, rank=0, world_size=1, device=DEVICE)
    batches = [video_ids for _, _, video_ids in loader]
    assert len(batches) == len(loader)  # 3 batches of 3: 2 pipelines read 3 and 3+2 videos, 3 read 3, 3 and 2
    assert sorted(vid for ids in batches for vid in ids) == sorted(f"v{i}" for i in range(8))


@pytest.mark.parametrize("pipelines", [1, 2])
def test_corrupt_sample_is_skipped_counted_and_logged(tmp_path, caplog, pipelines, payload):
    folder = write_shards(tmp_path, [4], payload, corrupt={"v1"})
    cfg = tiny_config(folder, batch_size_per_gpu=2, test_num_ensemble_views=1, test_num_spatial_crops=1,
                      max_bad_sample_fraction=0.5, pipelines_per_gpu=pipelines)
    loader = build_eval_loader(cfg, rank=0, world_size=1, device=DEVICE)
    with caplog.at_level(logging.WARNING):
        ids = [vid for _, _, video_ids in loader for vid in video_ids]
    assert sorted(ids) == ["v0", "v2", "v3"]
    assert loader.stats.bad_samples == 1 and loader.stats.bad_keys == ["v1"]
    assert "v1" in caplog.text


@pytest.mark.parametrize("pipelines", [1, 2])
def test_training_skips_corrupt_sample_and_keeps_step_count(tmp_path, pipelines, payload):
    folder = write_shards(tmp_path, [4], payload, corrupt={"v2"})
    cfg = tiny_config(folder, repeat_aug=1, batch_size_per_gpu=1, max_bad_sample_fraction=0.5,
                      pipelines_per_gpu=pipelines)
    loader = build_train_loader(cfg, "pretrain", num_classes=4, rank=0, world_size=1, device=DEVICE)
    labels = [int(x) for _, batch in loader for x in batch]
    assert len(labels) == len(loader) == 4 and 2 not in labels and {0, 1, 3} <= set(labels)
    assert loader.stats.bad_keys == ["v2"]


def test_mostly_corrupt_shards_stop_with_a_clear_error(tmp_path, payload):
    folder = write_shards(tmp_path, [4], payload, corrupt={"v0", "v1", "v2"})
    cfg = tiny_config(folder, test_num_ensemble_views=1, test_num_spatial_crops=1)
    with pytest.raises(RuntimeError, match="max_bad_sample_fraction"):
        list(build_eval_loader(cfg, rank=0, world_size=1, device=DEVICE))


def test_aggregator_averages_views_split_across_batches_and_ranks():
    logits = {"a": torch.tensor([[4.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0]]),  # views disagree; mean favours 0
              "b": torch.tensor([[0, 0, 2.0], [0, 0, 2.0], [2.0, 0, 0]])}
    labels = {"a": 0, "b": 1}
    rank0, rank1 = MultiViewAggregator(3), MultiViewAggregator(3)
    rank0.update(logits["a"][:2], torch.tensor([0, 0]), ["a", "a"])
    rank0.update(logits["b"][:1], torch.tensor([1]), ["b"])
    rank1.update(torch.cat([logits["a"][2:], logits["b"][1:]]), torch.tensor([0, 1, 1]), ["a", "b", "b"])
    rank0.merge_state(rank1.state())
    predictions = rank0.predictions()
    for vid, rows in logits.items():
        mean, views, label = predictions[vid]
        assert views == 3 and label == labels[vid]
        assert torch.allclose(mean, rows.softmax(dim=1).mean(dim=0))
    result = rank0.accuracy()
    assert result == {"acc1": 50.0, "acc5": 100.0, "videos": 2}


def test_random_clip_start_is_uniform_over_every_valid_start():
    """DALI's float -> int cast rounds to nearest; the start must be floored, or the first start gets half the odds
    and the last one and a half times."""
    from nvidia.dali import fn, pipeline_def, types

    from mae_st.data.pipeline import _random_start

    cfg = DataConfig(num_frames=4, sampling_rate=1)  # span 4: a 7-frame video has starts 0..3

    @pipeline_def(batch_size=1000, num_threads=1, device_id=None, seed=1)
    def starts():
        return _random_start(fn.cast(fn.random.uniform(values=[7.0]), dtype=types.INT32), cfg)

    pipe = starts()
    pipe.build()
    drawn = np.concatenate([np.asarray(pipe.run()[0].as_tensor()).ravel() for _ in range(4)])
    counts = np.bincount(drawn, minlength=4)
    assert len(counts) == 4 and counts.min() > 880 and counts.max() < 1120, counts  # 1000 each, +-4 sigma


def test_frames_payload_draws_uniform_starts_and_refuses_a_mixed_set(tmp_path):
    cfg = DataConfig(num_frames=4, sampling_rate=1, test_num_ensemble_views=3)  # span 4
    counts = np.bincount(random_starts(7, cfg, 4000, np.random.default_rng(0)), minlength=4)
    assert len(counts) == 4 and counts.min() > 880 and counts.max() < 1120, counts
    assert uniform_starts(40, cfg) == [0, 18, 36] and uniform_starts(3, cfg) == [0, 0, 0]
    video_set, frames_set = (list_shards(write_shards(tmp_path / p, [1], p)) for p in (VIDEO, FRAMES))
    video = read_shard_indexes(video_set.tars, video_set.index_paths)
    frames = read_shard_indexes(frames_set.tars, frames_set.index_paths)
    assert shard_payload(video) == VIDEO and shard_payload(frames) == FRAMES
    with pytest.raises(ValueError, match="mixes video samples .* with jpeg-frame samples"):
        shard_payload(video + frames)
    with pytest.raises(ValueError, match="jpeg_decode_device='nvjpeg': expected gpu or cpu"):
        build_train_loader(DataConfig(train_shards=frames_set.tars[0], jpeg_decode_device="nvjpeg"), "pretrain",
                           num_classes=1, rank=0, world_size=1, device=DEVICE)

"""The reused-decoder backend: ClipReader threads over real VP9 shards the tests write, and ClipStream's DALI
external_source augmentation, on PyAV and DALI's CPU backend.

`MAE_ST_TEST_DECODER=nvdec` runs the same tests through PyNvVideoCodec on the GPU (benchmarks/bench_nvdec.py
does, as its correctness check).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from wds2idx import IndexCreator

from mae_st.config import DataConfig, parse_job_config
from mae_st.data.clip_reader import ClipReader, DecodedSample, SampleFailure, SampleRequest
from mae_st.data.clip_stream import ClipPlan, ClipStream
from mae_st.data.format import SampleMeta, index_name_for, shard_name
from mae_st.data.frames import sample_clip_indices, sample_members, sample_rng, uniform_starts
from mae_st.data.nvdec import fallback_message, nvdec_unavailable_reason
from mae_st.data.pyav_decode import PyAVDecoder
from mae_st.data.shards import list_samples
from tests.video_factory import decode_frame_index, frame_index_frames, write_video

DECODER = os.environ.get("MAE_ST_TEST_DECODER", "pyav")  # pyav | nvdec
DEVICE = torch.device("cpu" if DECODER == "pyav" else "cuda")
# two frame sizes, alternating by video; NVDEC decodes no VP9 smaller than 128x128
SIZES = [(48, 64), (60, 80)] if DECODER == "pyav" else [(144, 192), (176, 240)]
LONG, SHORT = 40, 6  # frames per test video; v3 and v7 are SHORT


def make_decoder():
    if DECODER == "pyav":
        return PyAVDecoder()
    from mae_st.data.clip_stream import decoder_factory

    return decoder_factory(DECODER, torch.device("cuda", 0))()


def video_frames(num_frames: int, video_id: int) -> np.ndarray:
    """Green encodes the frame index (video_factory levels); blue encodes which video it is."""
    height, width = SIZES[video_id % 2]
    frames = frame_index_frames(num_frames, height, width)
    frames[..., 0] = 128
    frames[..., 2] = 30 + 25 * video_id
    return frames


def write_shard(folder: Path, frames_by_key: dict, broken: dict = None) -> str:
    """One shard of VP9 samples `key -> frames`; `broken[key]` replaces that sample's "video" or "json" member."""
    folder.mkdir(parents=True, exist_ok=True)
    tar = str(folder / shard_name("test", 0))
    with wds.TarWriter(tar) as writer:
        for key, frames in frames_by_key.items():
            meta = SampleMeta(key=key, label=int(key[1:]), label_name=key, source=key, frames=len(frames),
                              fps=30.0, width=frames.shape[2], height=frames.shape[1], duration=len(frames) / 30,
                              codec="vp9")
            video = write_video(folder / "src" / f"{key}.webm", frames).read_bytes()
            sample = {"__key__": key, "webm": video, "json": meta.to_json()}
            for member, data in (broken or {}).get(key, {}).items():
                sample[member] = data
            writer.write(sample)
    with IndexCreator(tar, index_name_for(tar), verbose=False) as creator:
        creator.create_index()
    return str(folder)


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> str:
    frames = {f"v{i}": video_frames(SHORT if i % 4 == 3 else LONG, i) for i in range(8)}
    return write_shard(tmp_path_factory.mktemp("shard"), frames)


@pytest.fixture(scope="module")
def bad_shard(tmp_path_factory) -> str:
    """v1: not a video; v3: metadata is not JSON; v5 (the last sample): the tar is cut inside its video."""
    frames = {f"v{i}": video_frames(LONG, i) for i in range(6)}
    folder = write_shard(tmp_path_factory.mktemp("bad"), frames,
                         broken={"v1": {"webm": b"\x1aE\xdf\xa3 not a video" * 50}, "v3": {"json": b"{not json"}})
    last = list_samples(folder)[-1]
    offset, size, _ = sample_members(last)["webm"]
    os.truncate(last.tar, offset + size // 2)
    return folder


def tiny_config(**overrides) -> DataConfig:
    base = DataConfig(num_frames=4, sampling_rate=3, img_size=32, repeat_aug=3, batch_size_per_gpu=2,
                      num_threads=2, decoder_threads=2, prefetch_queue_depth=2, test_num_ensemble_views=2,
                      test_num_spatial_crops=3)
    return dataclasses.replace(base, **overrides)


def raw_indices(clips: torch.Tensor) -> list:
    """Frame indices read back from the green level of decoded uint8 clips (clips, T, H, W, 3)."""
    levels = clips[..., 1].float().mean(dim=(2, 3)).cpu()
    return [[decode_frame_index(float(v)) for v in clip] for clip in levels]


def stream_levels(clips: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """Per video, clip, channel and frame of a stream batch: the mean level back in 0..255 units."""
    mean = torch.tensor(cfg.mean).view(1, 1, 3, 1, 1, 1)
    std = torch.tensor(cfg.std).view(1, 1, 3, 1, 1, 1)
    return ((clips.float().cpu() * std + mean) * 255).mean(dim=(4, 5))  # (B, clips, C, T)


def fixed_clips(*clips):
    return lambda meta: [list(c) for c in clips]


def read_all(reader: ClipReader, requests) -> list:
    return list(reader.read(requests))


def test_frames_read_back_from_pixels_are_the_requested_ones(shard):
    refs = list_samples(shard)
    with ClipReader(make_decoder, num_threads=2, ahead=4) as reader:
        long_video, short_video = read_all(reader, [SampleRequest(refs[0], fixed_clips([0, 3, 6, 9], [33, 35, 37, 39])),
                                                    SampleRequest(refs[3], fixed_clips([0, 3, 6, 9]))])
    assert raw_indices(long_video.clips) == [[0, 3, 6, 9], [1, 3, 5, 7]]  # levels repeat every 32 frames
    assert long_video.meta["key"] == "v0" and long_video.clips.dtype == torch.uint8
    # past the end of a 6-frame video the last frame repeats (frames 6, 9 -> 5), as the DALI graphs pad
    assert raw_indices(short_video.clips) == [[0, 3, 5, 5]]


def test_training_clips_follow_seed_epoch_and_key_with_the_graph_stride(shard):
    cfg = tiny_config(repeat_aug=4)
    refs = list_samples(shard)
    plan = ClipPlan(cfg, training=True, seed=3, epoch=1)
    with ClipReader(make_decoder, num_threads=2, ahead=4) as reader:
        forward = read_all(reader, [plan.request(ref) for ref in refs])
        backward = read_all(reader, [plan.request(ref) for ref in reversed(refs)])
    for sample in forward:
        expected = sample_clip_indices(sample.meta["frames"], cfg, sample_rng(3, 1, sample.ref.key))
        assert sample.frame_indices == expected  # drawn from (seed, epoch, key), whatever the read order
        assert raw_indices(sample.clips) == [[i % 32 for i in clip] for clip in expected]
        if sample.meta["frames"] == LONG:
            assert all(np.diff(clip).tolist() == [3, 3, 3] for clip in expected)
    assert [s.frame_indices for s in forward] == [s.frame_indices for s in reversed(backward)]


def test_repeat_aug_clips_and_eval_views_decode_each_video_once(shard):
    refs = list_samples(shard)
    runs = ((tiny_config(repeat_aug=4), True, 4), (tiny_config(test_num_ensemble_views=3), False, 3))
    for cfg, training, clips in runs:
        plan = ClipPlan(cfg, training=training, seed=0, epoch=0)
        with ClipReader(make_decoder, num_threads=2, ahead=4) as reader:
            results = read_all(reader, [plan.request(ref) for ref in refs])
            assert sum(decoder.videos for decoder in reader.decoders) == len(refs)  # one decode call a video
        assert [r.ref.key for r in results] == [f"v{i}" for i in range(8)]
        assert all(r.clips.shape[:2] == (clips, cfg.num_frames) for r in results)
        if not training:
            for r in results:
                starts = uniform_starts(r.meta["frames"], cfg)
                assert [clip[0] for clip in raw_indices(r.clips)] == [s % 32 for s in starts]


def test_bad_samples_are_reported_and_every_good_one_delivered_once_in_order(bad_shard, caplog):
    cfg = tiny_config(test_num_ensemble_views=1, test_num_spatial_crops=1, batch_size_per_gpu=2)
    reported = []
    stream = ClipStream(list_samples(bad_shard), 2, cfg, training=False, mode="eval", seed=0, epoch=0,
                        device=DEVICE, decoder=DECODER, on_failure=reported.append)
    with stream, caplog.at_level(logging.WARNING):
        batches = list(stream)
    keys = [meta["key"] for _, metas in batches for meta in metas]
    assert keys == ["v0", "v2", "v4"]  # in order, once each; the short last batch is cut, not padded
    assert [clips.shape[0] for clips, _ in batches] == [2, 1]
    assert [(f.key, Path(f.tar).name) for f in reported] == [("v1", "test-000000.tar"), ("v3", "test-000000.tar"),
                                                           ("v5", "test-000000.tar")]
    assert "metadata member v3.json is unreadable" in reported[1].reason
    assert "truncated" in reported[2].reason
    assert stream.failures == reported and "skipping" not in caplog.text  # the callback owns the logging


class HangingDecoder:
    """Our test double of the FrameDecoder interface: the first decode call of the process hangs until released."""

    release = threading.Event()
    calls = 0
    lock = threading.Lock()

    def __init__(self):
        self.inner = make_decoder()

    def decode(self, path, frame_indices):
        with HangingDecoder.lock:
            HangingDecoder.calls += 1
            first = HangingDecoder.calls == 1
        if first:
            HangingDecoder.release.wait()
            raise RuntimeError("released by the test")
        return self.inner.decode(path, frame_indices)

    def close(self):
        self.inner.close()


def test_a_hanging_decoder_call_fails_its_sample_without_hanging_the_read(shard):
    refs = list_samples(shard)[:4]
    reader = ClipReader(HangingDecoder, num_threads=2, ahead=4, timeout_s=1.0)
    try:
        results = read_all(reader, [SampleRequest(ref, fixed_clips([0, 1])) for ref in refs])
        hung = [r for r in results if isinstance(r, SampleFailure)]
        assert len(hung) == 1 and "did not return within 1 s" in hung[0].reason
        good = [r.ref.key for r in results if isinstance(r, DecodedSample)]
        assert good == [ref.key for ref in refs if ref.key != hung[0].key]
        assert len(reader.workers) == 2 and len(reader.abandoned) == 1  # the stuck thread was replaced
    finally:
        HangingDecoder.release.set()
        reader.close()
    reader.abandoned[0].join(timeout=30)
    assert not reader.abandoned[0].is_alive()  # once its call returned, it left and released its decoder


def test_close_joins_every_reader_thread(shard):
    reader = ClipReader(make_decoder, num_threads=3, ahead=2)
    results = reader.read([SampleRequest(ref, fixed_clips([0])) for ref in list_samples(shard)])
    next(results)  # leave work queued and in flight
    threads = list(reader.workers)
    reader.close()
    assert threads and not any(t.is_alive() for t in threads)
    assert not any(t.name.startswith("clip-reader") and t in threads for t in threading.enumerate())


def test_training_stream_gives_normalised_crops_of_mixed_resolution_videos(shard):
    cfg = tiny_config(repeat_aug=3)
    stream = ClipStream(list_samples(shard), 2, cfg, training=True, mode="pretrain", seed=0, epoch=0,
                        device=DEVICE, decoder=DECODER)
    with stream:
        batches = list(stream)
    assert len(batches) == 4 and stream.delivered == 8
    for clips, metas in batches:
        assert clips.shape == (2, 3, 3, 4, 32, 32) and clips.dtype == torch.float32
        assert {(m["height"], m["width"]) for m in metas} == set(SIZES)  # each batch mixes both sizes
        for video, meta in zip(stream_levels(clips, cfg), metas):
            for clip in video:
                assert round((float(clip[2].mean()) - 30) / 25) == meta["label"]  # blue: the right video
                indices = [decode_frame_index(float(v)) for v in clip[1]]
                if meta["frames"] == LONG:
                    assert (np.diff(indices) % 32).tolist() == [3, 3, 3]  # levels wrap every 32 frames


def test_eval_stream_gives_every_view_and_crop_of_each_video(shard):
    cfg = tiny_config(test_num_ensemble_views=2, test_num_spatial_crops=3)
    stream = ClipStream(list_samples(shard), 3, cfg, training=False, mode="eval", seed=0, epoch=0, device=DEVICE,
                        decoder=DECODER, half=True)
    with stream:
        batches = list(stream)
    assert [clips.shape for clips, _ in batches] == [(3, 6, 3, 4, 32, 32)] * 2 + [(2, 6, 3, 4, 32, 32)]
    assert batches[0][0].dtype == torch.float16
    for clips, metas in batches:
        for video, meta in zip(stream_levels(clips, cfg), metas):
            starts = [decode_frame_index(float(view[1][0])) for view in video]
            expected = uniform_starts(meta["frames"], cfg)
            assert starts == [s % 32 for s in expected for _ in range(3)]  # temporal-major, 3 crops each


def test_finetune_stream_runs_rand_augment(shard):
    cfg = tiny_config(repeat_aug=1, rand_aug=True)
    with ClipStream(list_samples(shard)[:4], 2, cfg, training=True, mode="finetune", seed=0, epoch=0,
                    device=DEVICE, decoder=DECODER) as stream:
        shapes = [clips.shape for clips, _ in stream]
    assert shapes == [(2, 1, 3, 4, 32, 32)] * 2


@pytest.fixture(scope="module")
def ramp_shard(tmp_path_factory) -> str:
    """Frames that brighten from left to right: any crop keeps that order, a flip reverses it."""
    height, width = SIZES[0]
    ramp = np.linspace(20, 235, width).astype(np.uint8)
    frames = np.broadcast_to(ramp[None, None, :, None], (12, height, width, 3)).copy()
    return write_shard(tmp_path_factory.mktemp("ramp"), {f"v{i}": frames for i in range(4)})


def test_flip_prob_zero_never_flips_and_one_always_does(ramp_shard):
    left_darker = {}
    for flip_prob in (0.0, 1.0):
        cfg = tiny_config(repeat_aug=4, sampling_rate=1, flip_prob=flip_prob)
        with ClipStream(list_samples(ramp_shard), 2, cfg, training=True, mode="pretrain", seed=0, epoch=0,
                        device=DEVICE, decoder=DECODER) as stream:
            clips = torch.cat([c for c, _ in stream]).flatten(0, 1).float().cpu()  # (16 clips, C, T, H, W)
        half = clips.shape[-1] // 2
        left_darker[flip_prob] = (clips[..., :half].mean(dim=(1, 2, 3, 4)) < clips[..., half:].mean(dim=(1, 2, 3, 4)))
    assert left_darker[0.0].all() and not left_darker[1.0].any()


def test_flip_prob_flag_and_its_range():
    argv = ["--mode", "pretrain", "--train_shards", "x", "--flip_prob", "0"]
    assert parse_job_config(argv).data.flip_prob == 0.0
    assert DataConfig().flip_prob == 0.5
    with pytest.raises(SystemExit):
        parse_job_config(argv[:-1] + ["1.5"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reason given on a machine without a GPU")
def test_nvdec_reports_why_it_is_unavailable_and_how_to_get_it():
    reason = nvdec_unavailable_reason()
    assert reason is not None and "GPU" in reason
    message = fallback_message(reason)
    assert "pip install pynvvideocodec==2.2.4" in message and "NVIDIA_DRIVER_CAPABILITIES" in message
    with pytest.raises(ValueError, match="use 'pyav'"):
        ClipStream([], 1, tiny_config(), training=True, mode="pretrain", seed=0, epoch=0,
                   device=torch.device("cpu"), decoder="nvdec")


def test_decode_processes_benchmark_runs_its_thread_and_process_rows(shard, tmp_path):
    """benchmarks/decode_processes.py (the GPU measurement that kept decoding in threads) on PyAV: every row kind
    (threads, processes, clips handed over between processes) decodes clips and reports them."""
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, "benchmarks/decode_processes.py", "--shards", shard, "--decoder", "pyav",
                           "--seconds", "1", "--rows", "finetune:1x2,pretrain:2x1:ipc", "--out", str(out)],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["mode"], r["procs"], r["threads"], r["ipc"]) for r in rows] == [("finetune", 1, 2, False),
                                                                             ("pretrain", 2, 1, True)]
    assert all(r["clips/s"] > 0 for r in rows) and rows[1]["received/s"] > 0


@pytest.mark.parametrize("preset", [None, "TRACE"])
def test_pynvvideocodec_is_imported_with_its_per_video_warnings_off_unless_the_user_chose(monkeypatch, preset):
    """The library's C++ logger warns once per webm video; the import sets its level to ERROR first, keeping a
    level the user set. (On this CPU machine the import itself fails: that is what callers catch.)"""
    from mae_st.data import nvdec

    if preset is None:
        monkeypatch.delenv("LOGGER_LEVEL", raising=False)
    else:
        monkeypatch.setenv("LOGGER_LEVEL", preset)
    try:
        nvdec._import_pynvvideocodec()
    except Exception:  # noqa: BLE001 - ImportError without the package, RuntimeError without the driver's libraries
        pass
    assert os.environ["LOGGER_LEVEL"] == (preset or "ERROR")


# ---- the CPU decoder's seek ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyframe_video(tmp_path_factory) -> str:
    """64 frames with a keyframe every 8: a late clip needs only the frames from the keyframe before it."""
    return str(write_video(tmp_path_factory.mktemp("gop") / "gop8.webm", video_frames(64, 0), gop=8))


def test_pyav_seeks_to_the_keyframe_before_a_late_clip_and_reads_the_same_frames(keyframe_video):
    seeking, from_start = PyAVDecoder(), PyAVDecoder(seek=False)
    wanted = [41, 45, 49, 53]
    frames = seeking.decode(keyframe_video, wanted)
    assert raw_indices(frames[None]) == [[i % 32 for i in wanted]]
    assert torch.equal(frames, from_start.decode(keyframe_video, wanted))
    assert seeking.seeks == 1 and seeking.frames == 53 - 40 + 1 and from_start.frames == 54
    # from the first keyframe, and past the end (the last frame repeats), nothing changes either
    for indices in ([0, 2, 4], [3, 60, 70], [63, 90]):
        assert torch.equal(seeking.decode(keyframe_video, indices), from_start.decode(keyframe_video, indices))


def test_nvdec_cost_benchmark_times_each_pattern_and_shows_what_the_seek_saves(tmp_path):
    """benchmarks/nvdec_cost.py's calls section on PyAV with the tiny footage it films: a row per decoder and frame
    pattern, and the seeking decoder passes over fewer frames than decoding from the start for a late frame."""
    done = subprocess.run([sys.executable, "benchmarks/nvdec_cost.py", "--decoder", "pyav", "--quick", "--gops", "30",
                           "--sections", "calls", "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "out")],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "out" / "nvdec_cost.json").read_text())["calls"]
    assert "error" not in rows[0], rows[0]
    by = {(r["decoder"], r["pattern"]): r for r in rows}
    assert len(by) == 10 and all(r["ms/video"] > 0 for r in rows)
    passed_over = {kind: by[(kind, "1 frame")]["decoder frames/video"] for kind in ("pyav", "pyav from the start")}
    assert passed_over["pyav"] < passed_over["pyav from the start"]

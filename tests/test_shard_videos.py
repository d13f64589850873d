"""The packer (`tools/shard_videos.py` / `pack_videos`) on real videos the tests write: inputs and labels,
transcodes, segments, bad files, isolation of crashing/hanging workers, determinism, resume, and read-back
with webdataset and DALI's `fn.readers.webdataset` through the packer's index files."""

from __future__ import annotations

import csv
import faulthandler
import io
import json
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import webdataset as wds
from wds2idx import IndexCreator

from mae_st.data.format import FAILURES_NAME, LABELS_NAME, MANIFEST_COLUMNS, MANIFEST_NAME, SUMMARY_NAME, SampleMeta
from mae_st.data.packing import PackOptions, pack_videos
from mae_st.data.packing.isolation import run_isolated
from mae_st.data.packing.packer import SKIPPED_NAME
from tests.video_factory import decode_frame_index, frame_index_frames, moving_square_frames, write_video

REPO = Path(__file__).resolve().parents[1]
PACKER = REPO / "tools" / "shard_videos.py"


# ---- inputs the tests film ---------------------------------------------------------------------------------------

def write_class_folders(root: Path, classes=("cat", "dog"), per_class=4, frames=12) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            write_video(root / name / f"{name}{i}.webm", moving_square_frames(frames + i, 32, 48, seed=10 * c + i),
                        fps=10)
    return root


def write_audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = np.zeros((1, 1024), np.float32)
        for i in range(5):
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def write_rotated(path: Path, degrees: int = 90) -> Path:
    """A 48x32 (w x h) H.264 video whose left third is white, with a display rotation of `degrees` (CCW)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        stream.set_display_rotation(degrees)
        frame = np.zeros((32, 48, 3), np.uint8)
        frame[:, :16] = 255
        for _ in range(10):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def write_variable_rate(path: Path, times_ms) -> Path:
    """An H.264 mp4 whose frames sit at the given times (milliseconds): a variable frame rate."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        stream.options = {"bf": "0"}
        frames = frame_index_frames(len(times_ms), 32, 32)
        for t, pixels in zip(times_ms, frames):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def manifest(out: Path) -> list:
    with open(out / MANIFEST_NAME, newline="") as f:
        return list(csv.DictReader(f))


def failures(out: Path) -> dict:
    with open(out / FAILURES_NAME, newline="") as f:
        return {row["path"]: row["reason"] for row in csv.DictReader(f)}


def decoded_frames(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def tar_samples(tar: Path) -> dict:
    """key -> {ext: bytes} of a tar, read with webdataset."""
    return {s["__key__"]: s for s in wds.WebDataset(str(tar), shardshuffle=False)}


def shard_bytes(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar")) + sorted(out.glob("*.idx"))}


def pack(out: Path, **kwargs):
    kwargs.setdefault("workers", 2)
    kwargs.setdefault("progress", False)
    return pack_videos(PackOptions(out_dir=str(out), **kwargs))


@pytest.fixture(scope="module")
def class_dirs(tmp_path_factory) -> Path:
    return write_class_folders(tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="module")
def packed(class_dirs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed")
    pack(out, data_dirs=[str(class_dirs)], samples_per_shard=3, prefix="train")
    return out


# ---- inputs and labels -------------------------------------------------------------------------------------------

def test_class_folders_become_labels_and_every_video_one_sample(packed, class_dirs):
    rows = manifest(packed)
    assert json.loads((packed / LABELS_NAME).read_text()) == {"cat": 0, "dog": 1}
    assert sorted(r["source"] for r in rows) == sorted(str(p) for p in class_dirs.rglob("*.webm"))
    assert list(rows[0]) == list(MANIFEST_COLUMNS)
    for row in rows:
        assert int(row["label"]) == {"cat": 0, "dog": 1}[row["label_name"]]
        assert Path(row["source"]).parent.name == row["label_name"]
    assert failures(packed) == {}
    summary = json.loads((packed / SUMMARY_NAME).read_text())
    assert summary["counts"]["samples"] == 8 and summary["counts"]["shards"] == 3


def test_samples_are_shuffled_so_shards_mix_classes(packed):
    rows = manifest(packed)
    by_shard = {}
    for row in rows:
        by_shard.setdefault(row["shard"], set()).add(row["label"])
    assert [len(by_shard[s]) for s in sorted(by_shard)] == [2, 2, 2]  # fixed by seed 0; sorted input is cat*4, dog*4
    assert [r["source"] for r in rows] != sorted(r["source"] for r in rows)


def test_shard_members_carry_video_and_meta(packed):
    rows = {r["key"]: r for r in manifest(packed)}
    for tar in sorted(packed.glob("*.tar")):
        for key, sample in tar_samples(tar).items():
            meta = SampleMeta.from_json(sample["json"])
            frames = decoded_frames(sample["webm"])
            assert meta.key == key and meta.codec == "vp9"
            assert frames.shape == (meta.frames, meta.height, meta.width, 3) == (int(rows[key]["frames"]), 32, 48, 3)
            assert meta.fps == 10.0 and meta.source == rows[key]["source"]


def test_csv_input_with_names_indices_and_missing_files(class_dirs, tmp_path):
    videos = sorted(class_dirs.rglob("*.webm"))
    listing = tmp_path / "list.csv"
    listing.write_text("path,label\n" + "".join(f"{os.path.relpath(v, tmp_path)},{v.parent.name}\n" for v in videos[:3])
                       + "missing.mp4,cat\n")
    result = pack(tmp_path / "out", file_list=str(listing))
    assert result.samples == 3 and result.rejected == 1
    assert failures(tmp_path / "out") == {str(tmp_path / "missing.mp4"): "file not found"}
    assert {r["label_name"] for r in manifest(tmp_path / "out")} == {"cat"}

    indexed = tmp_path / "indexed.csv"  # the original repo's "path label" lines, absolute paths
    indexed.write_text("".join(f"{v} {7 if v.parent.name == 'dog' else 3}\n" for v in videos))
    pack(tmp_path / "out2", file_list=str(indexed))
    assert {(r["label_name"], r["label"]) for r in manifest(tmp_path / "out2")} == {("3", "3"), ("7", "7")}


def test_no_labels_gives_minus_one(class_dirs, tmp_path):
    pack(tmp_path / "out", data_dirs=[str(class_dirs / "cat")], no_labels=True)
    assert {r["label"] for r in manifest(tmp_path / "out")} == {"-1"}


# ---- transcoding -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("codec,ext", [("h264", "mp4"), ("hevc", "mp4"), ("vp9", "webm")])
def test_transcode_resizes_resamples_and_sets_keyframes(codec, ext, tmp_path):
    write_video(tmp_path / "raw" / "a.mp4", moving_square_frames(30, 48, 72), fps=30)  # 1 s at 30 fps
    pack(tmp_path / "out", data_dirs=[str(tmp_path / "raw")], no_labels=True, codec=codec, short_side=32, fps=15,
         gop=5)
    (sample,) = tar_samples(tmp_path / "out" / "train-000000.tar").values()
    meta = SampleMeta.from_json(sample["json"])
    assert (meta.codec, meta.width, meta.height, meta.fps, meta.frames) == (codec, 48, 32, 15.0, 15)
    with av.open(io.BytesIO(sample[ext])) as container:
        keys = [frame.key_frame for frame in container.decode(video=0)]
        assert container.streams.video[0].codec_context.name == {"h264": "h264", "hevc": "hevc", "vp9": "vp9"}[codec]
    assert len(keys) == 15 and [i for i, k in enumerate(keys) if k] == [0, 5, 10]


def test_jpeg_payload_stores_each_frame_as_an_image_the_loader_reads_back(tmp_path):
    write_video(tmp_path / "raw" / "a" / "v.webm", frame_index_frames(20, 48, 64), fps=10)
    write_video(tmp_path / "raw" / "b" / "w.webm", frame_index_frames(12, 48, 64), fps=10)
    out = tmp_path / "out"
    result = pack(out, data_dirs=[str(tmp_path / "raw")], codec="jpeg", short_side=32, segment_seconds=1.0)
    assert result.samples == 3 and not failures(out)  # v: two 10-frame segments; w: 10 frames (tail < 4 dropped)
    samples = tar_samples(out / "train-000000.tar")
    for sample in samples.values():
        frames = sorted(k for k in sample if k.endswith(".jpg"))
        meta = SampleMeta.from_json(sample["json"])
        assert frames == [f"{i:06d}.jpg" for i in range(10)] and (meta.frames, meta.codec) == (10, "jpeg")
        levels = [decoded_frames(sample[name]).mean() for name in frames]
        first = 10 * meta.segment
        assert [decode_frame_index(level) for level in levels] == list(range(first, first + 10))
        assert decoded_frames(sample[frames[0]]).shape == (1, 32, 42, 3)
    rows = manifest(out)
    assert {int(r["bytes"]) for r in rows} == {sum(len(v) for k, v in samples[r["key"]].items() if k.endswith(".jpg"))
                                              for r in rows}

    from mae_st.config import DataConfig
    from mae_st.data.loader import build_train_loader

    cfg = DataConfig(train_shards=str(out), num_frames=3, sampling_rate=2, img_size=16, batch_size_per_gpu=3,
                     repeat_aug=2, num_threads=1, mean=(0.0,) * 3, std=(1.0,) * 3)
    (clips, _), = list(build_train_loader(cfg, "pretrain", num_classes=2, rank=0, world_size=1,
                                          device=torch.device("cpu")))
    for clip in clips:  # every clip reads frames start, start + 2, start + 4 of one 10-frame segment
        indices = [decode_frame_index(float(level) * 255) for level in clip.mean(dim=(0, 2, 3))]
        assert np.diff(indices).tolist() == [2, 2] and indices[0] % 10 <= 5


def test_jpeg_payload_refuses_settings_it_cannot_honour(class_dirs, tmp_path):
    with pytest.raises(ValueError, match="--gop has no meaning for --codec jpeg"):
        pack(tmp_path / "out", data_dirs=[str(class_dirs)], codec="jpeg", gop=5)
    with pytest.raises(ValueError, match="--crf 40: for --codec jpeg it is the JPEG quantiser"):
        pack(tmp_path / "out", data_dirs=[str(class_dirs)], codec="jpeg", crf=40)


def test_copy_mode_stores_original_bytes_and_refuses_changes(class_dirs, tmp_path):
    source = sorted(class_dirs.rglob("*.webm"))[0]
    pack(tmp_path / "out", file_list=str(_one_row_csv(tmp_path, source)), codec="copy", no_labels=True)
    (sample,) = tar_samples(tmp_path / "out" / "train-000000.tar").values()
    assert sample["webm"] == source.read_bytes()
    with pytest.raises(ValueError, match="copy stores the original bytes.*--short_side"):
        pack(tmp_path / "out2", data_dirs=[str(class_dirs)], codec="copy", short_side=16)


def test_long_recording_is_split_into_segments(tmp_path):
    write_video(tmp_path / "raw" / "long.mp4", frame_index_frames(25, 32, 32), fps=10)  # 2.5 s
    pack(tmp_path / "out", data_dirs=[str(tmp_path / "raw")], no_labels=True, segment_seconds=1.0, min_frames=6)
    rows = sorted(manifest(tmp_path / "out"), key=lambda r: int(r["segment"]))
    # 10 + 10 frames; the 5-frame tail is under --min_frames and dropped
    assert [(r["segment"], r["start_sec"], r["end_sec"], r["frames"]) for r in rows] == [
        ("0", "0.0", "1.0", "10"), ("1", "1.0", "2.0", "10")]
    samples = {}
    for tar in (tmp_path / "out").glob("*.tar"):
        samples.update(tar_samples(tar))
    second = next(s for s in samples.values() if SampleMeta.from_json(s["json"]).segment == 1)
    levels = decoded_frames(second["webm"]).mean(axis=(1, 2, 3))
    assert abs(levels[0] - (8 * 10 + 4)) < 6  # segment 1 starts at source frame 10


# ---- bad inputs --------------------------------------------------------------------------------------------------

def test_bad_and_odd_inputs_end_in_failures_or_pack_correctly(tmp_path):
    raw = tmp_path / "raw" / "any"
    good = write_video(raw / "good.mp4", moving_square_frames(12, 32, 32))
    truncated = raw / "truncated.mp4"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (raw / "zero.mp4").write_bytes(b"")
    (raw / "text.mp4").write_text("this is not a video\n" * 20)
    write_audio_only(raw / "audio.mp4")
    write_video(raw / "one_frame.webm", moving_square_frames(1, 32, 32))
    write_video(raw / "odd.webm", moving_square_frames(8, 255, 341))  # VP9 stores odd sizes; x264 refuses them
    write_rotated(raw / "rotated.mp4", 90)
    write_variable_rate(raw / "vfr.mp4", [0, 33, 66, 200, 233, 400, 433, 466, 600, 633])  # 0.666 s
    result = pack(tmp_path / "out", data_dirs=[str(tmp_path / "raw")], fps=30)

    rows = {Path(r["source"]).name: r for r in manifest(tmp_path / "out")}
    failed = {Path(p).name: reason for p, reason in failures(tmp_path / "out").items()}
    assert set(rows) == {"good.mp4", "odd.webm", "rotated.mp4", "vfr.mp4"}
    assert set(failed) == {"truncated.mp4", "zero.mp4", "text.mp4", "audio.mp4", "one_frame.webm"}
    assert "no video stream" in failed["audio.mp4"] and "too short" in failed["one_frame.webm"]
    assert result.samples == 4 and result.rejected == 5
    assert (rows["odd.webm"]["width"], rows["odd.webm"]["height"]) == ("340", "254")  # even sizes for yuv420p
    assert (rows["rotated.mp4"]["width"], rows["rotated.mp4"]["height"]) == ("32", "48")  # portrait, upright
    assert rows["vfr.mp4"]["fps"] == "30.0"

    samples = {}
    for tar in (tmp_path / "out").glob("*.tar"):
        samples.update(tar_samples(tar))
    # constant 30 fps: every output frame shows the source frame on screen at its time (held through the gaps)
    vfr = decoded_frames(samples[rows["vfr.mp4"]["key"]]["webm"]).mean(axis=(1, 2, 3))
    assert [decode_frame_index(level) for level in vfr[:19]] == [0, 1, 2, 2, 2, 2, 3, 4, 4, 4, 4, 4, 5, 6, 7, 7,
                                                                  7, 7, 8]
    rotated = decoded_frames(samples[rows["rotated.mp4"]["key"]]["webm"])[0].mean(axis=(1, 2))
    # stored frames have a white left third; turned 90 degrees counter-clockwise it becomes the bottom third
    assert rotated[-10:].mean() > 200 and rotated[:30].mean() < 50


def skipped(out: Path) -> dict:
    with open(out / SKIPPED_NAME, newline="") as f:
        return {row["path"]: row["reason"] for row in csv.DictReader(f)}


def test_files_that_are_not_videos_are_listed_with_a_reason_and_counted(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    write_video(raw / "cat" / "clip.webm", moving_square_frames(12, 32, 32), fps=10)
    (raw / "cat" / "notes.txt").write_text("shot on a phone\n")
    write_audio_only(raw / "cat" / "voice.m4a")
    (raw / "cat" / ".DS_Store").write_bytes(b"\0" * 8)
    (raw / ".cache").mkdir()
    (raw / ".cache" / "old.mp4").write_bytes(b"")
    done = subprocess.run([sys.executable, str(PACKER), "--data_dirs", str(raw), "--out_dir", str(out),
                           "--workers", "1", "--no_progress"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    assert "skipped 4 files that are not videos" in done.stdout.splitlines()[-1]
    listed = {Path(path).name: reason for path, reason in skipped(out).items()}
    assert set(listed) == {"notes.txt", "voice.m4a", ".DS_Store", ".cache"}
    assert "(.m4a)" in listed["voice.m4a"] and "(.txt)" in listed["notes.txt"] and "not scanned" in listed[".cache"]
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert summary["counts"]["skipped"] == 4 and sum(summary["skipped_by_reason"].values()) == 4
    assert [Path(r["source"]).name for r in manifest(out)] == ["clip.webm"] and not failures(out)
    # every file under the data dir is accounted for: packed, rejected or skipped (itself or a folder above it)
    mentioned = ({Path(r["source"]) for r in manifest(out)} | set(map(Path, failures(out)))
                 | set(map(Path, skipped(out))))
    for path in (p for p in raw.rglob("*") if p.is_file()):
        assert mentioned & {path, *path.parents}, path

    (raw / "cat" / "README.md").write_text("added after packing\n")
    again = pack(out, data_dirs=[str(raw)], workers=1)
    assert again.reused_shards == 1 and len(again.skipped) == 5
    assert json.loads((out / SUMMARY_NAME).read_text())["counts"]["skipped"] == 5 and len(skipped(out)) == 5


def test_hanging_file_times_out_and_costs_only_itself(tmp_path):
    raw = tmp_path / "raw"
    write_video(raw / "good.webm", moving_square_frames(8, 32, 32))
    os.mkfifo(raw / "stuck.mp4")  # opening a FIFO blocks until a writer comes: a decoder that never returns
    result = pack(tmp_path / "out", data_dirs=[str(raw)], no_labels=True, timeout=5)
    assert result.samples == 1
    assert "timed out after 5 s" in failures(tmp_path / "out")[str(raw / "stuck.mp4")]


def _crash_or_sleep(job):
    if job == "segfault":
        faulthandler.disable()  # pytest's handler would print this intended crash's stack into the test log
        os.kill(os.getpid(), signal.SIGSEGV)
    elif job == "exit":
        os._exit(3)
    elif job == "hang":
        time.sleep(60)


def _crash_first_time(marker):
    if not os.path.exists(marker):
        open(marker, "w").close()
        faulthandler.disable()
        os.kill(os.getpid(), signal.SIGABRT)


def test_a_job_that_crashed_once_gets_a_second_run(tmp_path):
    outcomes = {}
    marker = str(tmp_path / "crashed-once")
    run_isolated([marker], _crash_first_time, workers=1, timeout=30,
                 on_finish=lambda job, problem: outcomes.__setitem__(job, problem))
    assert outcomes == {marker: None}


def test_isolated_jobs_survive_crashed_and_hung_neighbours():
    # the timeout covers a child's start too: under forkserver it imports this module before running its job
    outcomes = {}
    run_isolated(["ok1", "segfault", "exit", "hang", "ok2"], _crash_or_sleep, workers=2, timeout=6,
                 on_finish=lambda job, problem: outcomes.__setitem__(job, problem))
    assert outcomes == {"ok1": None, "ok2": None, "segfault": "worker crashed (killed by SIGSEGV)",
                        "exit": "worker crashed (exit code 3)", "hang": outcomes["hang"]}
    assert outcomes["hang"].startswith("timed out after 6 s")


# ---- determinism and resume --------------------------------------------------------------------------------------

def test_output_is_byte_identical_across_worker_counts_and_differs_by_seed(class_dirs, packed, tmp_path):
    pack(tmp_path / "one", data_dirs=[str(class_dirs)], samples_per_shard=3, workers=1)
    assert shard_bytes(tmp_path / "one") == shard_bytes(packed)
    pack(tmp_path / "seed", data_dirs=[str(class_dirs)], samples_per_shard=3, seed=1)
    assert [r["key"] for r in manifest(tmp_path / "seed")] != [r["key"] for r in manifest(packed)]


def test_resume_after_killed_cli_is_byte_identical(class_dirs, packed, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, str(PACKER), "--data_dirs", str(class_dirs), "--out_dir", str(out),
               "--samples_per_shard", "3", "--workers", "1", "--no_progress"]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while len(list(out.glob(".packing/*/result.json"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # the CLI and its worker, as a Ctrl-C'd or OOM-killed run
    process.wait()
    assert not (out / SUMMARY_NAME).exists(), "the run finished before it could be interrupted"

    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "packed 8 samples" in done.stdout
    assert shard_bytes(out) == shard_bytes(packed)
    assert not list(out.rglob("*.tmp")) and not (out / ".packing").exists()


def test_resume_rewrites_only_missing_shards(class_dirs, packed, tmp_path):
    out = tmp_path / "out"
    pack(out, data_dirs=[str(class_dirs)], samples_per_shard=3)
    (out / "train-000002.tar").unlink()
    (out / "train-000001.idx").unlink()  # a shard whose index was never written is unfinished
    (out / "train-000001.tar.tmp").write_bytes(b"half a tar")  # what a kill during writing leaves
    result = pack(out, data_dirs=[str(class_dirs)], samples_per_shard=3)
    assert result.reused_shards == 1
    assert shard_bytes(out) == shard_bytes(packed) and not list(out.glob("*.tmp"))
    again = pack(out, data_dirs=[str(class_dirs)], samples_per_shard=3)  # complete: nothing to do
    assert again.reused_shards == 3 and again.samples == 8


def test_other_settings_in_a_used_out_dir_are_refused(class_dirs, packed):
    with pytest.raises(ValueError, match="already holds a shard set"):
        pack(packed, data_dirs=[str(class_dirs)], samples_per_shard=3, codec="h264")


# ---- readers and the command line --------------------------------------------------------------------------------

def test_index_files_match_wds2idx_and_dali_reads_the_shards(packed, tmp_path):
    tars = sorted(packed.glob("*.tar"))
    for tar in tars:
        reference = tmp_path / (tar.stem + ".idx")
        with IndexCreator(str(tar), str(reference), verbose=False) as creator:
            creator.create_index()
        assert reference.read_text() == tar.with_suffix(".idx").read_text()

    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=4, num_threads=1, device_id=None)
    def read_shards():
        video, meta = fn.readers.webdataset(paths=[str(t) for t in tars], index_paths=[str(t.with_suffix(".idx"))
                                            for t in tars], ext=["webm;mp4;mkv", "json"],
                                            missing_component_behavior="error")
        return fn.decoders.video(video, device="cpu"), meta

    pipe = read_shards()
    pipe.build()
    seen = {}
    for _ in range(2):
        frames, metas = pipe.run()
        for i in range(len(metas)):
            meta = SampleMeta.from_json(bytes(metas.at(i)))
            seen[meta.key] = (np.asarray(frames.at(i)).shape, (meta.frames, meta.height, meta.width, 3))
    assert len(seen) == 8 and all(shape == expected for shape, expected in seen.values())


def test_cli_dry_run_and_exit_status(class_dirs, tmp_path):
    listed = subprocess.run([sys.executable, str(PACKER), "--data_dirs", str(class_dirs), "--out_dir",
                             str(tmp_path / "dry"), "--dry_run"], capture_output=True, text=True)
    assert listed.returncode == 0 and listed.stdout.count("PACK\t") == 8 and not (tmp_path / "dry").exists()

    (tmp_path / "bad" / "x").mkdir(parents=True)
    (tmp_path / "bad" / "x" / "broken.mp4").write_bytes(b"\0" * 100)
    nothing = subprocess.run([sys.executable, str(PACKER), "--data_dirs", str(tmp_path / "bad"), "--out_dir",
                              str(tmp_path / "out"), "--no_progress"], capture_output=True, text=True)
    assert nothing.returncode == 1
    assert "packed 0 samples" in nothing.stdout and "rejected 1" in nothing.stdout
    assert list(failures(tmp_path / "out")) == [str(tmp_path / "bad" / "x" / "broken.mp4")]


def _one_row_csv(folder: Path, video: Path) -> Path:
    path = folder / "one.csv"
    path.write_text(f"{video}\n")
    return path

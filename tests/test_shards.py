"""`list_shards`: a packed set given as a folder, a manifest.csv, a brace pattern or a glob resolves to the same
tars, index files and sample counts; anything listed but missing is a clear error."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mae_st.data.format import MANIFEST_NAME
from mae_st.data.packing import PackOptions, pack_videos
from mae_st.data.shards import ShardSet, list_shards
from tests.video_factory import moving_square_frames, write_video


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("raw")
    for i in range(5):
        write_video(raw / f"v{i}.webm", moving_square_frames(6, 16, 16, seed=i))
    out = tmp_path_factory.mktemp("shards")
    pack_videos(PackOptions(out_dir=str(out), data_dirs=[str(raw)], no_labels=True, prefix="val",
                            samples_per_shard=2, workers=2, progress=False))
    return out


def expected(folder: Path) -> ShardSet:
    tars = [str(folder / f"val-00000{i}.tar") for i in range(3)]
    return ShardSet(tars, [t[:-4] + ".idx" for t in tars], [2, 2, 1])


@pytest.mark.parametrize("spec", ["{d}", "{d}/" + MANIFEST_NAME, "{d}/val-{{000000..000002}}.tar", "{d}/val-*.tar"])
def test_every_spelling_resolves_to_the_same_set(shard_dir, spec):
    shard_set = list_shards(spec.format(d=shard_dir))
    assert shard_set == expected(shard_dir)
    assert shard_set.total == 5 and len(shard_set) == 3


def test_folder_without_manifest_counts_from_the_index_files(shard_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shard_dir, copy)
    (copy / MANIFEST_NAME).unlink()
    assert list_shards(str(copy)) == expected(copy)


def test_missing_shard_is_named_and_a_missing_index_is_left_to_the_loader(shard_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"shard .*val-000003.tar listed by .* but not found"):
        list_shards(f"{shard_dir}/val-{{000000..000003}}.tar")
    copy = tmp_path / "copy"
    shutil.copytree(shard_dir, copy)
    (copy / "val-000001.idx").unlink()
    # the count comes from the manifest; the loader rebuilds the index from the tar (tests/test_resilience.py)
    assert list_shards(str(copy)) == expected(copy)
    assert len(list_shards(str(copy)).listed_keys[str(copy / "val-000001.tar")]) == 2
    (copy / "val-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"val-000001.tar listed by .*manifest.csv.* but not found"):
        list_shards(str(copy / MANIFEST_NAME))


def test_manifest_and_index_disagreeing_is_an_error(shard_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shard_dir, copy)
    (copy / "val-000002.idx").write_text((copy / "val-000000.idx").read_text())
    with pytest.raises(ValueError, match="lists 1 samples but its index has 2"):
        list_shards(str(copy))


def test_nothing_found_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shards"):
        list_shards(str(tmp_path))
    with pytest.raises(ValueError, match="no shard set given"):
        list_shards("")

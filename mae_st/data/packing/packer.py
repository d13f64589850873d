"""`pack_videos`: raw videos -> shuffled WebDataset shards with DALI indexes, a manifest and reports.

Steps: find inputs -> process each in an isolated worker (probe, copy or transcode into `<out_dir>/.packing/`)
-> plan shards (samples shuffled with the seed) -> write the shards not already complete -> manifest.csv,
labels.json, failures.csv, skipped.csv, summary.json. Every step's output depends only on the inputs and the
settings, never on worker timing, so a rerun after an interruption reuses what is finished and ends byte-identical.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from tqdm import tqdm

from mae_st import __version__
from mae_st.data.format import (
    FAILURES_NAME, FORMAT_VERSION, LABELS_NAME, MANIFEST_COLUMNS, MANIFEST_NAME, SUMMARY_NAME,
    SampleMeta, index_name_for, shard_name,
)
from mae_st.data.packing.inputs import Scan, VideoInput, mark_missing_files, read_file_list, scan_data_dirs
from mae_st.data.packing.isolation import run_isolated
from mae_st.data.packing.tar_writer import BLOCK, Member, sample_members, shard_is_complete, write_shard
from mae_st.data.packing.transcode import CODECS, COPY, JPEG, EncodeSettings
from mae_st.data.packing.worker import WorkItem, process_input, read_result, write_result

STAGING_NAME = ".packing"  # per-input results of the current run; removed once the shards are written
SKIPPED_NAME = "skipped.csv"  # files under --data_dirs that are not inputs (not videos by extension, hidden)
FINGERPRINT_NAME = "fingerprint.json"
_PREFIX = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass
class PackOptions:
    """Everything `pack_videos` needs; `tools/shard_videos.py --help` documents each field."""

    out_dir: str
    data_dirs: Sequence[str] = ()
    file_list: str = ""
    prefix: str = "train"
    no_labels: bool = False
    codec: str = "vp9"
    short_side: Optional[int] = None
    fps: Optional[float] = None
    gop: Optional[int] = None
    crf: Optional[int] = None
    segment_seconds: Optional[float] = None
    min_frames: int = 4
    samples_per_shard: int = 1000
    max_shard_bytes: int = 1_000_000_000
    seed: int = 0
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    timeout: float = 600.0  # seconds per input file
    dry_run: bool = False
    keep_staging: bool = False
    progress: bool = True

    def encode_settings(self) -> EncodeSettings:
        return EncodeSettings(codec=self.codec, short_side=self.short_side, fps=self.fps, gop=self.gop,
                              crf=self.crf, segment_seconds=self.segment_seconds, min_frames=self.min_frames)


@dataclass
class PackResult:
    out_dir: str
    inputs: int
    packed_videos: int
    samples: int
    rejected: int
    shards: List[str]
    bytes: int
    seconds: float
    failures: List[Tuple[str, str]]
    reused_shards: int = 0
    dry_run: bool = False
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (path, reason): files that are not inputs

    def summary_line(self) -> str:
        if self.dry_run:
            return (f"dry run: {self.inputs} inputs would be packed into {self.out_dir} ({self.rejected} rejected, "
                    f"{len(self.skipped)} other files skipped)")
        return (f"packed {self.samples} samples from {self.packed_videos}/{self.inputs} videos into "
                f"{len(self.shards)} shards ({self.bytes / 1e6:.1f} MB, {self.reused_shards} reused) in "
                f"{self.out_dir}; rejected {self.rejected} (see {FAILURES_NAME}); skipped {len(self.skipped)} "
                f"files that are not videos (see {SKIPPED_NAME}); {self.seconds:.1f} s")


@dataclass(frozen=True)
class _Sample:
    order: int  # position in the deterministic pre-shuffle order (input, segment)
    members: List[Member]
    meta: SampleMeta
    ext: str


def pack_videos(options: PackOptions) -> PackResult:
    """Pack the videos `options` names into shards under `options.out_dir`; bad files go to failures.csv, the
    other files under the data dirs to skipped.csv."""
    started = time.perf_counter()
    _check_options(options)
    inputs, labels, skipped = find_inputs(options)
    out = Path(options.out_dir)
    if options.dry_run:
        return _dry_run(options, inputs, skipped, started)
    fingerprint = _fingerprint(options, inputs)
    out.mkdir(parents=True, exist_ok=True)
    finished = _finished_run(out, fingerprint, started)
    if finished is not None:
        # skipped files change no shard, so they are not in the fingerprint: report those of this scan
        finished.skipped = skipped
        _refresh_skipped(out, skipped)
        return finished
    staging = _claim_staging(out, fingerprint)
    _process_inputs(inputs, options, staging)
    samples, failures = _collect(inputs, options, staging)
    processed = time.perf_counter()
    plan = plan_shards(samples, options)
    shard_paths, reused = _write_shards(plan, out, options)
    _write_reports(out, options, labels, plan, failures)
    _write_skipped(out, skipped)
    result = PackResult(out_dir=str(out), inputs=len(inputs), packed_videos=len({s.meta.source for s in samples}),
                        samples=len(samples), rejected=len(failures), shards=shard_paths,
                        bytes=sum(os.path.getsize(p) for p in shard_paths), seconds=time.perf_counter() - started,
                        failures=failures, reused_shards=reused, skipped=skipped)
    _write_summary(out, options, fingerprint, result, plan, process_s=processed - started)
    if not options.keep_staging:
        shutil.rmtree(staging)
    return result


def find_inputs(options: PackOptions) -> Scan:
    """The inputs in a fixed order (data dirs scanned, then the file list), the label name -> index map and the
    files under the data dirs that are not inputs, with why."""
    labelled = not options.no_labels
    scan = Scan([], {}, [])
    if options.data_dirs:
        scan = scan_data_dirs(options.data_dirs, labelled)
    inputs, labels = scan.inputs, scan.labels
    if options.file_list:
        listed, listed_labels = read_file_list(options.file_list, labelled)
        if labels and listed_labels != labels:
            raise ValueError("--data_dirs and --file_list define different label sets; pack them separately")
        inputs, labels = inputs + listed, labels or listed_labels
    return Scan(mark_missing_files(inputs), labels, scan.skipped)


def plan_shards(samples: Sequence[_Sample], options: PackOptions) -> List[List[_Sample]]:
    """Samples in a seeded stratified shuffle, cut by count and by bytes: every label's samples are shuffled and
    spread evenly over the whole order, so each shard holds the classes in about their overall proportions
    (a plain shuffle can leave a small shard with one class)."""
    rng = random.Random(options.seed)
    by_label: Dict[int, List[_Sample]] = {}
    for sample in sorted(samples, key=lambda s: s.order):
        by_label.setdefault(sample.meta.label, []).append(sample)
    spread = []
    for label in sorted(by_label):
        group = by_label[label]
        rng.shuffle(group)
        spread += [((j + rng.random()) / len(group), sample.order, sample) for j, sample in enumerate(group)]
    order = [sample for _, _, sample in sorted(spread, key=lambda item: item[:2])]
    shards: List[List[_Sample]] = []
    current: List[_Sample] = []
    current_bytes = 0
    for sample in order:
        size = sum(BLOCK + m.size for m in sample.members)
        if current and (len(current) >= options.samples_per_shard or current_bytes + size > options.max_shard_bytes):
            shards.append(current)
            current, current_bytes = [], 0
        current.append(sample)
        current_bytes += size
    if current:
        shards.append(current)
    return shards


def _check_options(options: PackOptions) -> None:
    if not options.data_dirs and not options.file_list:
        raise ValueError("nothing to pack: give --data_dirs and/or --file_list")
    if not _PREFIX.match(options.prefix):
        raise ValueError(f"--prefix {options.prefix!r}: use letters, digits, '_' or '-' (it names shards and keys)")
    if options.codec not in CODECS:
        raise ValueError(f"--codec {options.codec!r}: choose one of {', '.join(CODECS)}")
    if options.codec == COPY:
        changes = [flag for flag, value in (("--short_side", options.short_side), ("--fps", options.fps),
                                            ("--segment_seconds", options.segment_seconds), ("--gop", options.gop),
                                            ("--crf", options.crf)) if value]
        if changes:
            raise ValueError(f"--codec copy stores the original bytes, so it cannot honour {', '.join(changes)}; "
                             "pick a codec to transcode (vp9, h264, hevc, jpeg) or drop those flags")
    if options.codec == JPEG:
        if options.gop:
            raise ValueError("--gop has no meaning for --codec jpeg: every frame is stored as its own image")
        if options.crf is not None and not 2 <= options.crf <= 31:
            raise ValueError(f"--crf {options.crf}: for --codec jpeg it is the JPEG quantiser, 2 (best) to 31")
    for name in ("samples_per_shard", "max_shard_bytes", "min_frames", "workers"):
        if getattr(options, name) < 1:
            raise ValueError(f"--{name} must be at least 1 (got {getattr(options, name)})")


def _dry_run(options: PackOptions, inputs: List[VideoInput], skipped: List[Tuple[str, str]],
             started: float) -> PackResult:
    failures = [(i.path, i.problem) for i in inputs if i.problem]
    for item in inputs:
        print(f"{'SKIP' if item.problem else 'PACK'}\t{item.label}\t{item.label_name}\t{item.path}"
              + (f"\t{item.problem}" if item.problem else ""))
    for path, reason in skipped:
        print(f"SKIP\t\t\t{path}\t{reason}")
    return PackResult(out_dir=options.out_dir, inputs=len(inputs), packed_videos=0, samples=0,
                      rejected=len(failures), shards=[], bytes=0, seconds=time.perf_counter() - started,
                      failures=failures, dry_run=True, skipped=skipped)


def _fingerprint(options: PackOptions, inputs: Sequence[VideoInput]) -> dict:
    """What determines the output: settings that change bytes, and the inputs with their labels."""
    listing = "\n".join(f"{i.path}\t{i.label}\t{i.label_name}" for i in inputs)
    settings = {k: v for k, v in asdict(options).items()
                if k not in ("out_dir", "workers", "timeout", "dry_run", "keep_staging", "progress")}
    settings["data_dirs"] = list(settings["data_dirs"])
    return {"settings": settings, "inputs_sha256": hashlib.sha256(listing.encode()).hexdigest(),
            "format_version": FORMAT_VERSION}


def _finished_run(out: Path, fingerprint: dict, started: float) -> Optional[PackResult]:
    """The result of an earlier complete run with the same fingerprint whose shards are all in place."""
    path = out / SUMMARY_NAME
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    if summary.get("fingerprint") != fingerprint:
        raise ValueError(f"{out} already holds a shard set packed from other inputs or settings "
                         f"({path}); pack into a new --out_dir (one per split) or delete that one")
    shards = [str(out / s["name"]) for s in summary["shards"]]
    intact = all(os.path.isfile(p) and os.path.getsize(p) == s["bytes"] and os.path.isfile(index_name_for(p))
                 for p, s in zip(shards, summary["shards"]))
    if not intact:
        path.unlink()  # shards were removed or damaged since: redo the missing ones
        return None
    counts = summary["counts"]
    failures = _read_failures(out / FAILURES_NAME)
    return PackResult(out_dir=str(out), inputs=counts["inputs"], packed_videos=counts["packed_videos"],
                      samples=counts["samples"], rejected=counts["rejected"], shards=shards,
                      bytes=counts["bytes"], seconds=time.perf_counter() - started, failures=failures,
                      reused_shards=len(shards))


def _claim_staging(out: Path, fingerprint: dict) -> Path:
    staging = out / STAGING_NAME
    marker = staging / FINGERPRINT_NAME
    if marker.is_file() and json.loads(marker.read_text()) != fingerprint:
        raise ValueError(f"{staging} holds an interrupted run with other inputs or settings; rerun that command to "
                         f"finish it, or delete {staging} (and the shards beside it) to start over")
    staging.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(fingerprint, sort_keys=True))
    return staging


def _process_inputs(inputs: Sequence[VideoInput], options: PackOptions, staging: Path) -> None:
    """Run the worker for every input without a result yet (earlier runs' results are kept)."""
    settings = options.encode_settings()
    jobs = [WorkItem(i, item.path, settings, str(_input_dir(staging, i))) for i, item in enumerate(inputs)
            if not item.problem and read_result(_input_dir(staging, i)) is None]
    with tqdm(total=len(jobs), desc=f"{options.codec} {options.prefix}", unit="video",
              disable=not options.progress) as bar:
        def finished(job: WorkItem, problem: Optional[str]) -> None:
            if problem is None and read_result(Path(job.staging_dir)) is None:
                problem = "worker ended without a result"
            if problem is not None:
                write_result(Path(job.staging_dir), {"status": "failed", "reason": problem})
            bar.update(1)

        run_isolated(jobs, process_input, workers=options.workers, timeout=options.timeout, on_finish=finished)


def _collect(inputs: Sequence[VideoInput], options: PackOptions,
             staging: Path) -> Tuple[List[_Sample], List[Tuple[str, str]]]:
    samples: List[_Sample] = []
    failures: List[Tuple[str, str]] = []
    for i, item in enumerate(inputs):
        result = {"status": "failed", "reason": item.problem} if item.problem else read_result(_input_dir(staging, i))
        if result["status"] != "ok":
            failures.append((item.path, result["reason"]))
            continue
        for piece in result["pieces"]:
            key = f"{options.prefix}_{i:07d}_{piece['segment']:04d}"
            ext = Path(piece["file"]).suffix.lstrip(".").lower()
            meta = SampleMeta(
                key=key, label=item.label, label_name=item.label_name,
                source=item.path, frames=piece["frames"], fps=piece["fps"], width=piece["width"],
                height=piece["height"], duration=round(piece["end_sec"] - piece["start_sec"], 6),
                codec=result["codec"], segment=piece["segment"], start_sec=piece["start_sec"],
                end_sec=piece["end_sec"], rotation=result["info"]["rotation"] if options.codec == COPY else 0)
            samples.append(_Sample(order=len(samples), members=sample_members(key, piece["file"], ext, meta.to_json()),
                                   meta=meta, ext=ext))
    return samples, failures


def _write_shards(plan: List[List[_Sample]], out: Path, options: PackOptions) -> Tuple[List[str], int]:
    paths, reused = [], 0
    for index, shard in enumerate(tqdm(plan, desc="shards", unit="shard", disable=not options.progress)):
        tar = str(out / shard_name(options.prefix, index))
        members = [s.members for s in shard]
        if shard_is_complete(members, tar, index_name_for(tar)):
            reused += 1
        else:
            write_shard(members, tar, index_name_for(tar))
        paths.append(tar)
    return paths, reused


def _write_reports(out: Path, options: PackOptions, labels: Dict[str, int],
                   plan: List[List[_Sample]], failures: List[Tuple[str, str]]) -> None:
    rows = []
    for index, shard in enumerate(plan):
        for sample in shard:
            row = asdict(sample.meta)
            row.update(shard=shard_name(options.prefix, index), bytes=sum(m.size for m in sample.members[:-1]))
            rows.append(row)
    _write_csv(out / MANIFEST_NAME, MANIFEST_COLUMNS, rows)
    _write_csv(out / FAILURES_NAME, ("path", "reason"), [{"path": p, "reason": r} for p, r in failures])
    _write_text(out / LABELS_NAME, json.dumps(labels, indent=2, sort_keys=True) + "\n")


def _write_summary(out: Path, options: PackOptions, fingerprint: dict, result: PackResult,
                   plan: List[List[_Sample]], process_s: float) -> None:
    summary = {
        "tool": "tools/shard_videos.py", "tool_version": __version__, "fingerprint": fingerprint,
        "counts": {"inputs": result.inputs, "packed_videos": result.packed_videos, "samples": result.samples,
                   "rejected": result.rejected, "skipped": len(result.skipped), "shards": len(result.shards),
                   "bytes": result.bytes},
        "shards": [{"name": Path(p).name, "samples": len(s), "bytes": os.path.getsize(p)}
                   for p, s in zip(result.shards, plan)],
        "rejected_by_reason": _count_reasons(result.failures),
        "skipped_by_reason": _count_reasons(result.skipped),
        "timings": {"process_s": round(process_s, 3), "total_s": round(result.seconds, 3),
                    "workers": options.workers, "reused_shards": result.reused_shards},
    }
    _write_text(out / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")


def _count_reasons(rows: Sequence[Tuple[str, str]]) -> Dict[str, int]:
    reasons: Dict[str, int] = {}
    for _, reason in rows:
        reasons[reason] = reasons.get(reason, 0) + 1
    return reasons


def _write_skipped(out: Path, skipped: Sequence[Tuple[str, str]]) -> None:
    _write_csv(out / SKIPPED_NAME, ("path", "reason"), [{"path": p, "reason": r} for p, r in skipped])


def _refresh_skipped(out: Path, skipped: Sequence[Tuple[str, str]]) -> None:
    """A finished set's skipped.csv and summary.json counts, brought up to this scan's skipped files."""
    _write_skipped(out, skipped)
    summary = json.loads((out / SUMMARY_NAME).read_text())
    fresh = {"skipped": len(skipped), "skipped_by_reason": _count_reasons(skipped)}
    if (summary["counts"].get("skipped"), summary.get("skipped_by_reason")) != tuple(fresh.values()):
        summary["counts"]["skipped"] = fresh["skipped"]
        summary["skipped_by_reason"] = fresh["skipped_by_reason"]
        _write_text(out / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_failures(path: Path) -> List[Tuple[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [(row["path"], row["reason"]) for row in csv.DictReader(f)]


def _input_dir(staging: Path, input_id: int) -> Path:
    return staging / f"{input_id:07d}"

"""DALI graphs: read shard samples, decode each video once, cut clips from it and augment them on the device.

Per video the graph decodes all frames once (NVDEC through `device="mixed"` when there is a GPU, DALI's CPU
decoder otherwise), reads the frame count from the decoded shape and selects every clip's frames with
`fn.sequence_rearrange` (indices computed by native arithmetic, so no Python runs per sample). Samples of the
jpeg payload arrive as one JPEG per clip frame, already chosen by the loader (`mae_st.data.frames`); each is
decoded (libjpeg-turbo on the DALI threads, or nvJPEG with DataConfig.jpeg_decode_device "gpu") and a clip's
frames are stacked. Each clip then gets its own spatial augmentation, and the clips of one video are stacked:
a pipeline sample is (clips, C, T, H, W), so a batch flattens into (B * clips, C, T, H, W) without a copy.

Clips decoded outside DALI (`mae_st.data.clip_reader`: reused NVDEC sessions, or PyAV) enter through
`fn.external_source` in `build_external_pipeline` and go through the same two augmentation functions
(`augment_train_clips`, `augment_eval_views`) as the clips of the reader graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
from nvidia.dali import pipeline_def
from nvidia.dali.auto_aug import rand_augment
from nvidia.dali.pipeline import Pipeline

from mae_st.config import DataConfig
from mae_st.data.format import META_EXT, VIDEO_EXTS
from mae_st.data.frames import FRAMES, VIDEO, slot_names

VIDEO_EXT_SET = ";".join(VIDEO_EXTS)
EXTERNAL_INPUT = "decoded_clips"  # the external_source that `feed_external` fills


@dataclass
class ReaderSpec:
    """What one pipeline reads and where it runs: tars with their (subset) index files, batch, device, seed."""

    tars: Sequence[str]
    index_paths: Sequence[str]
    batch_size: int
    device_id: Optional[int]  # None: the CPU backend
    seed: int
    shuffle: bool
    initial_fill: int = 1  # shuffle buffer (samples)
    pad_last_batch: bool = False
    half: bool = False  # emit float16 (halves device memory; the loader casts to bfloat16 when asked)
    payload: str = VIDEO  # FRAMES: the index files name one JPEG per clip frame (`mae_st.data.frames`)


@dataclass(frozen=True)
class RandAugmentSpec:
    """timm's "rand-m<M>-n<N>-..." string reduced to what DALI's rand_augment takes."""

    magnitude: int
    num_ops: int
    num_magnitude_bins: int = 11  # timm magnitudes run 0..10

    @classmethod
    def parse(cls, aa: str) -> "RandAugmentSpec":
        parts = aa.split("-")
        if parts[0] != "rand":
            raise ValueError(f"DataConfig.aa={aa!r}: only RandAugment strings ('rand-m7-n2-...') are supported")
        magnitude, num_ops = 9, 2
        for part in parts[1:]:
            if part.startswith("m") and part[1:].isdigit():
                magnitude = int(part[1:])
            elif part.startswith("n") and part[1:].isdigit():
                num_ops = int(part[1:])
        return cls(magnitude=magnitude, num_ops=num_ops)


def build_train_pipeline(spec: ReaderSpec, cfg: DataConfig, mode: str) -> Pipeline:
    """Pretrain/finetune graph: outputs (clips (B, repeat_aug, C, T, H, W), padded JSON metadata bytes)."""
    rand_aug = _rand_augment_spec(cfg, mode)

    @pipeline_def(enable_conditionals=rand_aug is not None)
    def train_graph():
        raw_clips, meta = _read_clips(spec, cfg, cfg.repeat_aug, lambda count, _: _random_start(count, cfg))
        return augment_train_clips(raw_clips, cfg, rand_aug, spec.half), _pad_meta(meta)

    return _instantiate(train_graph, spec, cfg)


def build_eval_pipeline(spec: ReaderSpec, cfg: DataConfig) -> Pipeline:
    """Multi-view graph: test_num_ensemble_views uniformly spaced clips x test_num_spatial_crops crops per video
    (`augment_eval_views`)."""

    @pipeline_def
    def eval_graph():
        raw_clips, meta = _read_clips(spec, cfg, cfg.test_num_ensemble_views,
                                      lambda count, view: _uniform_start(count, cfg, view))
        return augment_eval_views(raw_clips, cfg, spec.half), _pad_meta(meta)

    return _instantiate(eval_graph, spec, cfg)


@dataclass
class ExternalSpec:
    """A pipeline fed decoded clips by `feed_external` instead of reading shards (`mae_st.data.clip_reader`)."""

    batch_size: int
    clips_per_sample: int  # repeat_aug (training) or test_num_ensemble_views (evaluation)
    device_id: Optional[int]  # None: the CPU backend
    frames_on_gpu: bool  # the fed frames are CUDA tensors (NVDEC); else host arrays, moved when device_id is set
    seed: int
    half: bool = False


def build_external_pipeline(spec: ExternalSpec, cfg: DataConfig, mode: str, training: bool) -> Pipeline:
    """The training or evaluation augmentation over clips fed from Python: each sample is one uint8 array
    (clips_per_sample * num_frames, H, W, 3), clip-major; the output is as the reader graphs' clips output.
    Always feed a full batch (pad, then cut the padding off the output)."""
    rand_aug = _rand_augment_spec(cfg, mode) if training else None

    @pipeline_def(enable_conditionals=rand_aug is not None)
    def external_graph():
        frames = fn.external_source(name=EXTERNAL_INPUT, device="gpu" if spec.frames_on_gpu else "cpu",
                                    layout="FHWC", dtype=types.UINT8, ndim=4)
        if spec.device_id is not None and not spec.frames_on_gpu:
            frames = frames.gpu()  # augmentation runs on the GPU whatever decoded the frames
        per_clip = cfg.num_frames
        raw_clips = [fn.sequence_rearrange(frames, new_order=list(range(j * per_clip, (j + 1) * per_clip)))
                     for j in range(spec.clips_per_sample)]
        if training:
            return augment_train_clips(raw_clips, cfg, rand_aug, spec.half)
        return augment_eval_views(raw_clips, cfg, spec.half)

    # the caller's threads decode ahead; a deeper DALI queue would ask for batches before they are fed
    pipe = external_graph(batch_size=spec.batch_size, num_threads=cfg.num_threads, device_id=spec.device_id,
                          seed=spec.seed, prefetch_queue_depth=1, exec_dynamic=True)
    pipe.build()
    return pipe


def feed_external(pipe: Pipeline, samples: Sequence) -> None:
    """Feeds one batch of (clips * T, H, W, 3) uint8 tensors/arrays (host or CUDA) to `build_external_pipeline`'s
    graph. GPU input is copied on DALI's internal stream, which makes the call wait for the copy: the caller may
    free or reuse its tensors as soon as this returns."""
    pipe.feed_input(EXTERNAL_INPUT, list(samples), layout="FHWC", cuda_stream=-1)


def augment_train_clips(raw_clips, cfg: DataConfig, rand_aug: Optional[RandAugmentSpec], half: bool):
    """Every training graph's augmentation: per clip (uint8 FHWC), RandAugment when given, a random resized crop
    with MAE-ST's scale/aspect ranges, a horizontal flip with probability cfg.flip_prob and normalisation; all
    frames of a clip share one crop and one flip. Returns the clips stacked: (clips, C, T, H, W)."""
    clips = []
    for clip in raw_clips:
        if rand_aug is not None:
            clip = rand_augment.rand_augment(clip, n=rand_aug.num_ops, m=rand_aug.magnitude,
                                             num_magnitude_bins=rand_aug.num_magnitude_bins)
        clip = fn.random_resized_crop(clip, size=(cfg.img_size, cfg.img_size),
                                      random_area=tuple(cfg.jitter_scales_relative),
                                      random_aspect_ratio=tuple(cfg.jitter_aspect_relative),
                                      interp_type=types.INTERP_LINEAR, antialias=False)
        clips.append(_normalize(clip, cfg, half, mirror=fn.random.coin_flip(probability=cfg.flip_prob)))
    return fn.stack(*clips)


def augment_eval_views(raw_clips, cfg: DataConfig, half: bool):
    """Every evaluation graph's views: each clip short-side resized to img_size and cropped left/centre/right
    (top/middle/bottom for portrait video) like the original's `uniform_crop`, ordered temporal-major (view v =
    temporal v // crops, spatial v % crops), as the original's test loader. Returns (views, C, T, H, W)."""
    views = []
    for clip in raw_clips:
        clip = fn.resize(clip, resize_shorter=cfg.img_size, interp_type=types.INTERP_LINEAR, antialias=True)
        height, width = _frame_size(clip)
        for s in range(cfg.test_num_spatial_crops):
            views.append(_normalize(clip, cfg, half, crop_pos=_uniform_crop_pos(height, width, s, cfg)))
    return fn.stack(*views)


def _rand_augment_spec(cfg: DataConfig, mode: str) -> Optional[RandAugmentSpec]:
    return RandAugmentSpec.parse(cfg.aa) if (mode == "finetune" and cfg.rand_aug) else None


def _instantiate(graph, spec: ReaderSpec, cfg: DataConfig) -> Pipeline:
    pipe = graph(batch_size=spec.batch_size, num_threads=cfg.num_threads, device_id=spec.device_id,
                 seed=spec.seed, prefetch_queue_depth=cfg.prefetch_queue_depth, exec_dynamic=True)
    pipe.build()
    return pipe


def _read_clips(spec: ReaderSpec, cfg: DataConfig, num_clips: int, start_of):
    """`num_clips` uint8 FHWC clips of cfg.num_frames frames per sample, and the sample's metadata.

    `start_of(frame_count, j)` is clip j's first frame in the video graph; jpeg-payload samples come with their
    clips' frames chosen by the loader."""
    if spec.payload == FRAMES:
        *slots, meta = _read(spec, [*slot_names(num_clips * cfg.num_frames), META_EXT])
        on_gpu = spec.device_id is not None and cfg.jpeg_decode_device == "gpu"
        frames = [fn.decoders.image(slot, device="mixed" if on_gpu else "cpu", output_type=types.RGB) for slot in slots]
        per_clip = cfg.num_frames
        clips = [fn.stack(*frames[j * per_clip : (j + 1) * per_clip], axis_name="F") for j in range(num_clips)]
        if spec.device_id is not None and not on_gpu:
            clips = [clip.gpu() for clip in clips]  # augmentation still runs on the GPU
        return clips, meta
    video, meta = _read(spec, [VIDEO_EXT_SET, META_EXT])
    frames = fn.decoders.video(video, device=_device(spec))
    count = frames.shape(dtype=types.INT32)[0]
    return [fn.sequence_rearrange(frames, new_order=_clip_indices(start_of(count, j), count, cfg))
            for j in range(num_clips)], meta


def _read(spec: ReaderSpec, ext):
    # "skip" for video: the set's samples are listed whole by the packer; frames' slot lines are written by the
    # loader, so a missing slot is a bug to report, not a sample to drop
    return fn.readers.webdataset(
        paths=list(spec.tars), index_paths=list(spec.index_paths), ext=ext,
        missing_component_behavior="error" if spec.payload == FRAMES else "skip", random_shuffle=spec.shuffle,
        initial_fill=max(1, spec.initial_fill), pad_last_batch=spec.pad_last_batch, seed=spec.seed, name="reader")


def _device(spec: ReaderSpec) -> str:
    return "cpu" if spec.device_id is None else "mixed"


def _frame_size(frames):
    shape = frames.shape(dtype=types.INT32)
    return shape[1], shape[2]


def _clip_span(cfg: DataConfig) -> int:
    return (cfg.num_frames - 1) * cfg.sampling_rate + 1


def _random_start(count, cfg: DataConfig):
    """Uniform integer start in [0, max(count - span, 0)], the original's random temporal jitter."""
    last_start = dmath.max(count - _clip_span(cfg), 0)
    u = fn.random.uniform(range=[0.0, 1.0])
    # floor before the cast: DALI's float -> int cast rounds to nearest, which gave start 0 half the odds of the
    # others and the last start one and a half times
    start = fn.cast(dmath.floor(u * fn.cast(last_start + 1, dtype=types.FLOAT)), dtype=types.INT32)
    return dmath.min(start, last_start)


def _uniform_start(count, cfg: DataConfig, view: int):
    """Start of temporal view `view`: evenly spaced over the video, ends included (original's use_offset)."""
    last_start = dmath.max(count - _clip_span(cfg), 0)
    views = cfg.test_num_ensemble_views
    if views == 1:
        return last_start // 2
    return (last_start // (views - 1)) * view


def _clip_indices(start, count, cfg: DataConfig):
    """Frames start, start + rate, ...; indices past the end repeat the last frame (edge padding)."""
    offsets = types.Constant(np.arange(cfg.num_frames, dtype=np.int32) * cfg.sampling_rate)
    return fn.cast(dmath.min(start + offsets, count - 1), dtype=types.INT32)


def _uniform_crop_pos(height, width, spatial_idx: int, cfg: DataConfig):
    """(x, y) crop anchors in 0..1: along the longer side 0, 0.5, 1 for crop 0, 1, 2; centred on the other."""
    crops = cfg.test_num_spatial_crops
    along = 0.5 if crops == 1 else spatial_idx / (crops - 1)
    landscape = fn.cast(width >= height, dtype=types.FLOAT)
    pos_x = landscape * along + (1.0 - landscape) * 0.5
    pos_y = landscape * 0.5 + (1.0 - landscape) * along
    return pos_x, pos_y


def _normalize(clip, cfg: DataConfig, half: bool, mirror=None, crop_pos=None):
    """uint8 FHWC -> float CFHW in (x/255 - mean) / std, with an optional flip and a square crop."""
    kwargs = {}
    if crop_pos is not None:
        kwargs = dict(crop=(cfg.img_size, cfg.img_size), crop_pos_x=crop_pos[0], crop_pos_y=crop_pos[1])
    if mirror is not None:
        kwargs["mirror"] = mirror
    return fn.crop_mirror_normalize(
        clip, dtype=types.FLOAT16 if half else types.FLOAT, output_layout="CFHW",
        mean=[255.0 * m for m in cfg.mean], std=[255.0 * s for s in cfg.std], **kwargs)


def _pad_meta(meta):
    # JSON bytes vary in length; padding with spaces (valid JSON whitespace) makes the batch dense
    return fn.pad(meta, fill_value=ord(" "))

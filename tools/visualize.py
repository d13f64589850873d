"""Draws what a pretrained MAE-ST sees and reconstructs: a PNG grid with three rows per clip (original frames /
masked input / reconstruction) and one column per reconstructed frame. The picture says so itself: each row is
named on its left, each clip's source above its rows, and each column's frame number in the video above it.

    python tools/visualize.py --checkpoint out/pretrain/checkpoint.safetensors --videos a.webm b.webm --out rec.png
    python tools/visualize.py --checkpoint out/pretrain/checkpoints/step000000120 --shards shards/val --out rec.png

The checkpoint is our safetensors export (or an original .pth), or a DeepSpeed checkpoint folder (consolidated
on the fly). The model and clip geometry come from the run's config.json, looked for beside the checkpoint and
in its parent folders; flags override it. Columns are the frames the decoder predicts (pred_t_dim of them, evenly
spaced over the clip), so they are fewer than --num_frames when pred_t_dim is. The reconstruction row shows the
model's prediction in the masked patches and the visible input elsewhere, as the MAE papers' figures do.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import av
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from mae_st.config import DataConfig, ModelConfig
from mae_st.data.format import VIDEO_EXTS
from mae_st.models import MaskedAutoencoderViT, build_model, load_checkpoint_file, model_family

CONFIG_NAME = "config.json"
CONFIG_SEARCH_DEPTH = 3  # checkpoint folder and this many parents: covers <out>/checkpoints/<tag>/
GAP = 2  # white pixels between tiles
CLIP_GAP = 8  # extra white pixels between the row groups of two clips
MASK_GREY = 128  # fill of masked patches in the masked-input row
ROWS_PER_CLIP = 3
ROW_NAMES = ("original", "masked input", "reconstruction")
TEXT_PAD = 4  # pixels around a label
TEXT_COLOUR = (40, 40, 40)


# ---- configuration and weights ---------------------------------------------------------------------------------


def find_run_config(checkpoint: Path) -> Optional[Path]:
    """The run's config.json nearest to `checkpoint` (its folder, then up to CONFIG_SEARCH_DEPTH parents)."""
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    for candidate in [folder, *folder.parents][: CONFIG_SEARCH_DEPTH + 1]:
        if (candidate / CONFIG_NAME).is_file():
            return candidate / CONFIG_NAME
    return None


def _dataclass_from(cls, values: Dict, source: Path):
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known}
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"{source}: cannot read its {cls.__name__} section: {err}") from err


def load_run_config(path: Optional[Path]) -> Tuple[ModelConfig, DataConfig]:
    """Model and data settings of a run from its config.json (a JobConfig as a dict); defaults without one."""
    if path is None:
        return ModelConfig(), DataConfig()
    job = json.loads(path.read_text())
    model_cfg = _dataclass_from(ModelConfig, job.get("model", {}), path)
    return model_cfg, _dataclass_from(DataConfig, job.get("data", {}), path)


def read_weights(checkpoint: Path) -> Dict[str, torch.Tensor]:
    """fp32 weights from a .safetensors/.pth file, or from a DeepSpeed checkpoint tag folder (any ZeRO stage)."""
    if checkpoint.is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    return load_checkpoint_file(checkpoint)


def load_mae(checkpoint: Path, model_cfg: ModelConfig, data_cfg: DataConfig) -> MaskedAutoencoderViT:
    """Builds `model_cfg.name` for the clip geometry of `data_cfg` and loads the checkpoint into it, strictly."""
    if model_family(model_cfg.name) != "mae":
        raise ValueError(f"model {model_cfg.name!r} is a classifier; reconstructions need the pretrained MAE "
                         f"(pass --model or the pretraining run's {CONFIG_NAME})")
    model = build_model(model_cfg, data_cfg.img_size, data_cfg.num_frames)
    try:
        model.load_state_dict(read_weights(checkpoint), strict=True)
    except RuntimeError as err:
        raise ValueError(f"{checkpoint} does not fit {model_cfg.name} at {data_cfg.num_frames}x{data_cfg.img_size}px "
                         f"as configured; pass the pretraining run's {CONFIG_NAME} with --config.\n{err}") from err
    return model.eval()


# ---- clips -----------------------------------------------------------------------------------------------------


def decode_frames(source: str | Path | bytes) -> np.ndarray:
    """Every frame of a video file (path or bytes) as uint8 RGB (T, H, W, 3)."""
    with av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    if not frames:
        raise ValueError(f"{source if not isinstance(source, bytes) else 'shard member'}: no frames decoded")
    return np.stack(frames)


def videos_in_shards(shard_dir: Path, limit: int) -> List[Tuple[str, bytes]]:
    """The first `limit` video members (name, bytes) of the tar shards in `shard_dir`, in name order."""
    shards = sorted(shard_dir.glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"--shards {shard_dir}: no .tar shards there")
    found: List[Tuple[str, bytes]] = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                if len(found) == limit:
                    return found
                if member.isfile() and member.name.rsplit(".", 1)[-1].lower() in VIDEO_EXTS:
                    found.append((f"{shard.name}:{member.name}", tar.extractfile(member).read()))
    return found


def clip_frame_indices(count: int, cfg: DataConfig) -> np.ndarray:
    """The video frames of the centre clip of a `count`-frame video: num_frames of them, sampling_rate apart."""
    span = (cfg.num_frames - 1) * cfg.sampling_rate + 1
    start = max(0, (count - span) // 2)
    return np.minimum(start + np.arange(cfg.num_frames) * cfg.sampling_rate, count - 1)


def clip_from_frames(frames: np.ndarray, cfg: DataConfig) -> torch.Tensor:
    """The centre clip (`clip_frame_indices`), short side resized and centre cropped to img_size, normalised
    with the data mean/std as the loader does: (C, T, H, W) float32."""
    crops = np.stack([_resize_and_centre_crop(frames[i], cfg.img_size) for i in clip_frame_indices(len(frames), cfg)])
    pixels = torch.from_numpy(crops).float().div(255.0)
    mean, std = torch.tensor(cfg.mean), torch.tensor(cfg.std)
    return ((pixels - mean) / std).permute(3, 0, 1, 2).contiguous()


def _resize_and_centre_crop(frame: np.ndarray, size: int) -> np.ndarray:
    height, width = frame.shape[:2]
    scale = size / min(height, width)
    resized = Image.fromarray(frame).resize((max(size, round(width * scale)), max(size, round(height * scale))),
                                            Image.BILINEAR)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return np.asarray(resized.crop((left, top, left + size, top + size)))


# ---- reconstruction --------------------------------------------------------------------------------------------


@dataclass
class Reconstruction:
    """Per clip and predicted frame, uint8 RGB (N, T', H, W, 3), plus the patch mask (N, L), 1 = masked."""

    original: np.ndarray
    masked: np.ndarray
    reconstruction: np.ndarray
    mask: np.ndarray


@torch.no_grad()
def reconstruct(model: MaskedAutoencoderViT, clips: torch.Tensor, cfg: DataConfig, mask_ratio: Optional[float] = None,
                seed: int = 0) -> Reconstruction:
    """Masks `clips` (N, C, T, H, W) with a seeded random mask and returns what the model makes of them."""
    noise = torch.rand(clips.shape[0], model.num_patches, generator=torch.Generator().manual_seed(seed))
    _, pred, mask = model(clips, mask_ratio=mask_ratio, noise=noise)
    target = model.patchify(model.target_frames(clips))
    if model.norm_pix_loss:  # the prediction is in per-patch normalised units: undo with the target's statistics
        pred = pred * (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
    masked_patches = mask.unsqueeze(-1).expand_as(pred).bool()
    original = _to_pixels(model.unpatchify(target), cfg)
    masked_pixels = model.unpatchify(masked_patches)[:, 0].numpy()  # (N, T', H, W), channel 0 stands for all
    return Reconstruction(
        original=original,
        masked=np.where(masked_pixels[..., None], np.uint8(MASK_GREY), original),
        reconstruction=_to_pixels(model.unpatchify(torch.where(masked_patches, pred, target)), cfg),
        mask=mask.numpy(),
    )


def _to_pixels(frames: torch.Tensor, cfg: DataConfig) -> np.ndarray:
    """(N, C, T, H, W) normalised values -> (N, T, H, W, C) uint8 RGB."""
    x = frames.permute(0, 2, 3, 4, 1).float() * torch.tensor(cfg.std) + torch.tensor(cfg.mean)
    return (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).numpy()


# ---- the picture -----------------------------------------------------------------------------------------------


class ClipCaption(NamedTuple):  # not a dataclass: tests load this script without registering it as a module
    """What one clip's rows show: where the clip comes from and the video frame of each column."""

    source: str
    frames: Sequence[int]


def predicted_positions(model: MaskedAutoencoderViT, num_frames: int) -> List[int]:
    """Which of a clip's num_frames frames the decoder predicts (the columns), asked of the model itself."""
    positions = torch.arange(num_frames, dtype=torch.float32).view(1, 1, num_frames, 1, 1)
    return [int(i) for i in model.target_frames(positions).flatten()]


def caption_for(source: str, frame_count: int, positions: Sequence[int], cfg: DataConfig) -> ClipCaption:
    indices = clip_frame_indices(frame_count, cfg)
    return ClipCaption(source, [int(indices[p]) for p in positions])


@functools.lru_cache(maxsize=None)
def _font(tile: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=max(10, min(16, tile // 8)))  # readable beside small and large tiles


def _line_height(tile: int) -> int:
    return _font(tile).getbbox("Ag")[3] + TEXT_PAD


def _label_width(tile: int) -> int:
    return int(max(_font(tile).getlength(name) for name in ROW_NAMES)) + 2 * TEXT_PAD


def _caption_height(tile: int) -> int:
    return 2 * _line_height(tile)  # the clip's source, then the frame numbers of the columns


def _group_height(tile: int) -> int:
    return _caption_height(tile) + ROWS_PER_CLIP * (tile + GAP)


def grid_size(num_clips: int, num_columns: int, tile: int) -> Tuple[int, int]:
    """(width, height) in pixels of the picture `render_grid` draws, labels included."""
    width = _label_width(tile) + GAP + num_columns * (tile + GAP)
    return width, GAP + num_clips * _group_height(tile) + (num_clips - 1) * CLIP_GAP


def tile_origin(clip: int, row: int, column: int, tile: int) -> Tuple[int, int]:
    """(x, y) of the top-left pixel of one tile; row 0 original, 1 masked input, 2 reconstruction."""
    top = GAP + clip * (_group_height(tile) + CLIP_GAP) + _caption_height(tile)
    return _label_width(tile) + GAP + column * (tile + GAP), top + row * (tile + GAP)


def render_grid(result: Reconstruction, scale: int = 1,
                captions: Optional[Sequence[ClipCaption]] = None) -> Image.Image:
    """Three rows per clip (original / masked / reconstruction), one column per frame, tiles enlarged `scale`x,
    with the rows named and, from `captions`, each clip's source and its columns' video frames."""
    num_clips, num_columns, height = result.original.shape[:3]
    tile = height * scale
    canvas = Image.new("RGB", grid_size(num_clips, num_columns, tile), "white")
    for clip in range(num_clips):
        for row, frames in enumerate((result.original, result.masked, result.reconstruction)):
            for column in range(num_columns):
                image = Image.fromarray(frames[clip, column]).resize((tile, tile), Image.NEAREST)
                canvas.paste(image, tile_origin(clip, row, column, tile))
    draw = ImageDraw.Draw(canvas)
    for clip in range(num_clips):
        caption = captions[clip] if captions else ClipCaption(f"clip {clip + 1}", [])
        _draw_labels(draw, clip, caption, num_columns, tile, canvas.width)
    return canvas


def _draw_labels(draw: ImageDraw.ImageDraw, clip: int, caption: ClipCaption, num_columns: int, tile: int,
                 width: int) -> None:
    font, line = _font(tile), _line_height(tile)
    first_x, first_y = tile_origin(clip, 0, 0, tile)
    prefix = f"clip {clip + 1}: "
    title = prefix + _fit(caption.source, font, width - 2 * TEXT_PAD - font.getlength(prefix))
    draw.text((TEXT_PAD, first_y - 2 * line), title, fill=TEXT_COLOUR, font=font)
    for column, frame in enumerate(caption.frames[:num_columns]):
        x, _ = tile_origin(clip, 0, column, tile)
        label = f"frame {frame}" if font.getlength(f"frame {frame}") <= tile else str(frame)
        draw.text((x, first_y - line), label, fill=TEXT_COLOUR, font=font)
    for row, name in enumerate(ROW_NAMES):
        _, y = tile_origin(clip, row, 0, tile)
        draw.text((TEXT_PAD, y + (tile - line) // 2), name, fill=TEXT_COLOUR, font=font)


def _fit(text: str, font: ImageFont.ImageFont, room: float) -> str:
    """`text`, its start cut off (an ellipsis instead) until it fits `room` pixels: the file name is at the end."""
    if font.getlength(text) <= room:
        return text
    while len(text) > 1 and font.getlength("..." + text) > room:
        text = text[1:]
    return "..." + text


# ---- command line ----------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="MAE weights: .safetensors export, .pth, or a DeepSpeed checkpoint tag folder")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--videos", nargs="+", type=Path, help="video files to reconstruct")
    source.add_argument("--shards", type=Path, help="a shard folder; its first --num_clips videos are used")
    p.add_argument("--out", required=True, type=Path, help="PNG to write")
    p.add_argument("--config", type=Path, help=f"run {CONFIG_NAME} (default: found beside the checkpoint)")
    p.add_argument("--model", help="model name, overriding the config")
    p.add_argument("--num_frames", type=int, help="clip length, overriding the config")
    p.add_argument("--sampling_rate", type=int, help="frame stride, overriding the config")
    p.add_argument("--img_size", type=int, help="clip side, overriding the config")
    p.add_argument("--mask_ratio", type=float, help="overriding the model's (pretraining) ratio")
    p.add_argument("--num_clips", type=int, default=4, help="at most this many clips (rows groups)")
    p.add_argument("--scale", type=int, default=2, help="enlarge every tile this many times (small clips)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random mask")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Path:
    args = parse_args(argv)
    config_path = args.config or find_run_config(args.checkpoint)
    model_cfg, data_cfg = load_run_config(config_path)
    model_cfg = dataclasses.replace(model_cfg, **({"name": args.model} if args.model else {}))
    data_cfg = dataclasses.replace(data_cfg, **{k: getattr(args, k) for k in ("num_frames", "sampling_rate",
                                                                                 "img_size") if getattr(args, k)})
    model = load_mae(args.checkpoint, model_cfg, data_cfg)
    if args.videos:
        sources = [(str(path), path) for path in args.videos[: args.num_clips]]
    else:
        sources = videos_in_shards(args.shards, args.num_clips)
    decoded = [decode_frames(video) for _, video in sources]
    clips = torch.stack([clip_from_frames(frames, data_cfg) for frames in decoded])
    result = reconstruct(model, clips, data_cfg, args.mask_ratio, args.seed)
    positions = predicted_positions(model, data_cfg.num_frames)
    captions = [caption_for(Path(name).name if args.videos else name, len(frames), positions, data_cfg)
                for (name, _), frames in zip(sources, decoded)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    render_grid(result, args.scale, captions).save(args.out)
    print(f"wrote {args.out}: {len(sources)} clips x {result.original.shape[1]} frames "
          f"(config: {config_path or 'defaults'}; clips: {', '.join(name for name, _ in sources)})")
    return args.out


if __name__ == "__main__":
    main()

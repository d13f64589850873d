"""Loading pretrained MAE-ST weights: reading checkpoint files safely and moving a pretrained encoder into a
classifier for finetuning (dropping the decoder, resizing position embeddings to the new clip geometry).

Accepts our flat safetensors export and the original's .pth release format (weights under "model", or
"model_state" for the PySlowFast-converted files). Load before `deepspeed.initialize`: under ZeRO-3 the
classifier's parameters are partitioned afterwards.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional

import torch
from safetensors.torch import load_file

from mae_st.models.layers import (
    GridSize,
    PosEmbedLayout,
    interpolate_joint_pos_embed,
    interpolate_spatial_pos_embed,
    interpolate_temporal_pos_embed,
)
from mae_st.models.vit import VisionTransformer

# keys of the MAE that only its decoder uses; the classifier never has them
DECODER_KEY_PREFIXES = ("decoder_", "mask_token")
# keys only the classifier has; they stay as initialised when loading a pretrained encoder
CLASSIFIER_ONLY_PREFIXES = ("head.", "fc_norm.")


@dataclass(frozen=True)
class LoadReport:
    """What `load_encoder_into_classifier` did, for logging."""

    unused_keys: List[str]  # in the checkpoint, not loaded: the MAE decoder (and a head of another size)
    missing_keys: List[str]  # in the classifier, not in the checkpoint: only the head
    interpolated_keys: List[str]  # position embeddings resized to the classifier's patch grid


def unwrap_state_dict(checkpoint: Mapping) -> Dict[str, torch.Tensor]:
    """The weights of a checkpoint: its "model" / "model_state" entry (original formats) or the dict itself."""
    for key in ("model", "model_state"):
        if isinstance(checkpoint.get(key), Mapping):
            return dict(checkpoint[key])
    return dict(checkpoint)


def load_checkpoint_file(path: str | Path) -> Dict[str, torch.Tensor]:
    """Reads weights from a .safetensors file or a torch .pth/.pyth file without executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    # the original's own checkpoints also store its argparse.Namespace of arguments, a plain attribute holder
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = unwrap_state_dict(checkpoint)
    not_tensors = sorted(k for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ValueError(f"checkpoint {path}: entries {not_tensors[:5]} are not tensors; is this a model checkpoint?")
    return state_dict


def load_encoder_into_classifier(
    classifier: VisionTransformer, state_dict: Mapping, source_input_size: Optional[GridSize] = None
) -> LoadReport:
    """Loads a pretrained MAE-ST state dict into `classifier`, keeping its freshly initialised head.

    Decoder keys are dropped, position embeddings resized when num_frames/img_size differ from pretraining.
    `source_input_size`, the (t, h, w) patch grid of pretraining, is only needed for a joint `pos_embed` whose
    temporal and spatial grids both changed (separable embeddings carry their own grid).
    Raises ValueError naming the keys when anything else is missing, unexpected or of the wrong shape (a
    checkpoint of another model size, or of another sep_pos_embed/cls_embed setting).
    """
    weights = unwrap_state_dict(state_dict)
    model_state = classifier.state_dict()
    unused = sorted(k for k in weights if k.startswith(DECODER_KEY_PREFIXES))
    unused += sorted(
        k for k in weights
        if k.startswith(CLASSIFIER_ONLY_PREFIXES) and k in model_state and weights[k].shape != model_state[k].shape
    )  # fmt: skip
    encoder = {k: v for k, v in weights.items() if k not in unused}
    interpolated = resize_pos_embeds(encoder, classifier.pos_layout, source_input_size)

    unexpected = sorted(k for k in encoder if k not in model_state)
    missing = sorted(k for k in model_state if k not in encoder)
    missing_encoder = [k for k in missing if not k.startswith(CLASSIFIER_ONLY_PREFIXES)]
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(model_state[k].shape)}"
        for k, v in encoder.items()
        if k in model_state and v.shape != model_state[k].shape
    ]
    if unexpected or missing_encoder or mismatched:
        raise ValueError(
            "pretrained weights do not fit the classifier (is it the same model size, sep_pos_embed and cls_embed "
            "as pretraining?)"
            + (f"\n  unexpected keys: {unexpected}" if unexpected else "")
            + (f"\n  missing keys: {missing_encoder}" if missing_encoder else "")
            + (f"\n  shape mismatches: {mismatched}" if mismatched else "")
        )
    classifier.load_state_dict(encoder, strict=False)
    return LoadReport(unused_keys=unused, missing_keys=missing, interpolated_keys=interpolated)


def resize_pos_embeds(
    weights: Dict[str, torch.Tensor], layout: PosEmbedLayout, source_input_size: Optional[GridSize] = None
) -> List[str]:
    """Resizes, in place, the encoder position embeddings in `weights` to `layout`'s grid; returns the keys changed."""
    t, h, w = layout.input_size
    changed = []
    if layout.sep_pos_embed and "pos_embed_spatial" in weights and "pos_embed_temporal" in weights:
        spatial, temporal = weights["pos_embed_spatial"], weights["pos_embed_temporal"]
        src_side = _square_side(spatial.shape[1], "pos_embed_spatial")
        if (src_side, src_side) != (h, w):
            weights["pos_embed_spatial"] = interpolate_spatial_pos_embed(spatial, (src_side, src_side), (h, w))
            changed.append("pos_embed_spatial")
        if temporal.shape[1] != t:
            weights["pos_embed_temporal"] = interpolate_temporal_pos_embed(temporal, t)
            changed.append("pos_embed_temporal")
    elif not layout.sep_pos_embed and "pos_embed" in weights:
        extra = int(layout.cls_embed)
        num_positions = weights["pos_embed"].shape[1] - extra
        src_size = tuple(source_input_size) if source_input_size else _joint_grid(num_positions, layout.input_size)
        if math.prod(src_size) != num_positions:
            raise ValueError(f"pos_embed has {num_positions} patch positions, not the {src_size} grid given")
        if src_size != layout.input_size:
            weights["pos_embed"] = interpolate_joint_pos_embed(weights["pos_embed"], src_size, layout.input_size, extra)
            changed.append("pos_embed")
    return changed


def _square_side(num_positions: int, key: str) -> int:
    side = math.isqrt(num_positions)
    if side * side != num_positions:
        raise ValueError(f"{key} has {num_positions} positions, not a square patch grid; cannot resize it")
    return side


def _joint_grid(num_positions: int, target: GridSize) -> GridSize:
    """Guesses the (t, h, w) grid of a joint embedding: same temporal grid as the target if that leaves a square
    spatial grid, else the same spatial grid. A joint embedding alone does not say how time and space split."""
    t, h, w = target
    if num_positions % t == 0 and math.isqrt(num_positions // t) ** 2 == num_positions // t:
        side = math.isqrt(num_positions // t)
        return (t, side, side)
    if num_positions % (h * w) == 0:
        return (num_positions // (h * w), h, w)
    raise ValueError(
        f"pos_embed has {num_positions} patch positions, which fits neither the classifier's temporal grid ({t}) "
        f"nor its spatial grid ({h}x{w}); pass source_input_size=(t, h, w) of pretraining"
    )


"""AdamW with weight-decay groups and, for finetuning, layer-wise lr decay (BEiT / MAE style)."""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn

from mae_st.config import OptimConfig
from mae_st.engine.fused_params import FUSED_DECAY, FUSED_NO_DECAY

# parameters before the first block: they share the embedding "layer 0" of layer-wise decay
EMBEDDING_PREFIXES = ("cls_token", "mask_token", "patch_embed", "pos_embed")


def layer_id(name: str, num_layers: int) -> int:
    """Depth of a parameter for layer-wise decay: embeddings 0, blocks.i -> i + 1, everything after (norm, head)
    num_layers = len(blocks) + 1."""
    if name.startswith(EMBEDDING_PREFIXES):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def weight_decay_rule(model: nn.Module, bias_wd: bool = False) -> Callable[[str, nn.Parameter], bool]:
    """decays(name, param): norms, biases (unless bias_wd) and the model's token / position embeddings are not
    decayed; a packed block's two flat tensors (mae_st.engine.fused_params) say which they are by name."""
    no_decay_names = set(model.no_weight_decay())

    def decays(name: str, param: nn.Parameter) -> bool:
        leaf = name.rpartition(".")[2]
        if leaf in (FUSED_DECAY, FUSED_NO_DECAY):
            return leaf == FUSED_DECAY
        if name in no_decay_names:
            return False
        return param.ndim > 1 or (bias_wd and name.endswith(".bias"))

    return decays


def build_param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0,
                       bias_wd: bool = False) -> List[Dict]:
    """AdamW param groups keyed by (layer, decays?), each with `weight_decay` and `lr_scale`.

    lr_scale = layer_decay ** (num_layers - layer); with layer_decay 1 (pretraining) every scale is 1.
    """
    num_layers = len(model.blocks) + 1
    decays_at = weight_decay_rule(model, bias_wd)
    groups: Dict[Tuple[int, bool], Dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decays = decays_at(name, param)
        layer = layer_id(name, num_layers) if layer_decay != 1.0 else num_layers
        group = groups.setdefault((layer, decays), {
            "params": [], "weight_decay": weight_decay if decays else 0.0,
            "lr_scale": layer_decay ** (num_layers - layer),
        })
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def build_optimizer(model: nn.Module, cfg: OptimConfig, finetune: bool, device: torch.device) -> torch.optim.AdamW:
    """AdamW over `build_param_groups`; lrs are set every step by the schedule (`apply_lr`)."""
    groups = build_param_groups(model, cfg.weight_decay, cfg.layer_decay if finetune else 1.0, cfg.bias_wd)
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(cfg.betas), fused=device.type == "cuda")

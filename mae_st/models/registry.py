"""Model factories registered by name (timm style), and `build_model`, which fills one from a `ModelConfig`."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import torch.nn as nn

from mae_st.config import ModelConfig

MODEL_FAMILIES = ("mae", "classifier")

_FACTORIES: Dict[str, Tuple[str, Callable[..., nn.Module]]] = {}


def register_model(family: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: registers a factory under its function name as a "mae" or "classifier" model."""
    if family not in MODEL_FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {MODEL_FAMILIES}")

    def register(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = factory.__name__
        if name in _FACTORIES:
            raise ValueError(f"model {name!r} is registered twice")
        _FACTORIES[name] = (family, factory)
        return factory

    return register


def list_models(family: str | None = None) -> List[str]:
    """Registered model names, sorted; only those of `family` ("mae" or "classifier") when given."""
    return sorted(name for name, (fam, _) in _FACTORIES.items() if family is None or fam == family)


def model_family(name: str) -> str:
    """"mae" for pretraining models, "classifier" for finetuning ones."""
    return _lookup(name)[0]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Builds the registered model `name`; kwargs go to its constructor (img_size, num_frames, ...)."""
    return _lookup(name)[1](**kwargs)


def build_model(cfg: ModelConfig, img_size: int, num_frames: int) -> nn.Module:
    """Builds `cfg.name` for clips of num_frames x img_size x img_size, passing only the fields its family uses."""
    kwargs: Dict[str, Any] = dict(
        img_size=img_size,
        num_frames=num_frames,
        t_patch_size=cfg.t_patch_size,
        sep_pos_embed=cfg.sep_pos_embed,
        cls_embed=cfg.cls_embed,
        trunc_init=cfg.trunc_init,
        no_qkv_bias=cfg.no_qkv_bias,
        grad_checkpointing=cfg.grad_checkpointing,
    )
    if model_family(cfg.name) == "mae":
        kwargs.update(
            decoder_embed_dim=cfg.decoder_embed_dim,
            decoder_depth=cfg.decoder_depth,
            decoder_num_heads=cfg.decoder_num_heads,
            mask_ratio=cfg.mask_ratio,
            pred_t_dim=cfg.pred_t_dim,
            norm_pix_loss=cfg.norm_pix_loss,
        )
    else:
        kwargs.update(
            num_classes=cfg.num_classes,
            drop_path_rate=cfg.drop_path_rate,
            dropout=cfg.dropout,
            global_pool=cfg.global_pool,
            head_init_scale=cfg.head_init_scale,
        )
    return create_model(cfg.name, **kwargs)


def _lookup(name: str) -> Tuple[str, Callable[..., nn.Module]]:
    if name not in _FACTORIES:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return _FACTORIES[name]

"""DeepSpeed checkpoints (resumable state) and the consolidated fp32 export (weights for --finetune / PyTorch).

Layout under <output_dir>/checkpoints/: one DeepSpeed tag folder per save, named step<global micro-step>. A
folder counts as complete only once rank 0 wrote COMPLETE_MARKER into it after every rank finished saving, so a
save cut short by a kill is never resumed from (and is removed by the next save).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from deepspeed.utils import safe_get_full_fp32_param
from safetensors.torch import save_file

from mae_st.config import ConfigError, JobConfig
from mae_st.engine.distributed import barrier
from mae_st.models.layers import to_block_names
from mae_st.models.registry import model_family

log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
COMPLETE_MARKER = "complete.json"
_TAG = re.compile(r"^step(\d+)$")

# The settings that decide a checkpoint's parameter names and shapes, per model family: a resume must agree on
# each. The value assumed where a checkpoint predates the setting follows the key.
_LAYOUT = {
    "both": {"model.name": None, "model.t_patch_size": None, "model.sep_pos_embed": None, "model.cls_embed": None,
             "model.no_qkv_bias": None, "data.num_frames": None, "data.img_size": None,
             "run.fuse_block_params": False},
    "mae": {"model.decoder_embed_dim": None, "model.decoder_depth": None, "model.decoder_num_heads": None,
            "model.pred_t_dim": None},
    "classifier": {"model.num_classes": None, "model.global_pool": None},
}
# How the engine lays parameters out beyond what the settings say, written into COMPLETE_MARKER: 2 (2026-12) pads
# packed blocks' views to PACK_ALIGN and orders the optimizer's parameters for aligned ZeRO-3 views
# (mae_st.engine.zero.order_for_aligned_views), so DeepSpeed's flat optimizer state of layout 1 does not fit.
# 3 (2026-12, later) keeps finetuning's layer-wise lr decay inside the optimizer (mae_st.engine.optim.LayerScaledAdamW)
# with one group per weight-decay setting instead of one per layer; pretraining's groups did not change, so a
# pretraining checkpoint of layout 2 still fits. 4 (2026-12-01, fifth) packs each block stack's packed blocks into
# two tensors of the stack under ZeRO-3 (mae_st.models.layers.pack_block_stack): 2 tensors a stack, not a block.
PARAM_LAYOUT = 4
FITTING_LAYOUTS = {"pretrain": {PARAM_LAYOUT}, "finetune": {PARAM_LAYOUT}}
PARAM_LAYOUT_KEY = "param_layout"


def checkpoint_root(output_dir: str) -> Path:
    return Path(output_dir) / CHECKPOINT_SUBDIR


def tag_for(global_step: int) -> str:
    return f"step{global_step:09d}"


def complete_tags(root: Path) -> List[str]:
    """Tags of the complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if _TAG.match(p.name) and (p / COMPLETE_MARKER).is_file()]
    return sorted(tags, key=lambda t: int(_TAG.match(t).group(1)))


def resolve_resume(resume: str, output_dir: str) -> Optional[Tuple[Path, str]]:
    """(checkpoint root, tag) to resume from: "auto" -> the newest complete one in output_dir (None if there is
    none yet, a fresh start); a tag folder path -> that one, which must be complete."""
    if not resume:
        return None
    if resume == "auto":
        tags = complete_tags(checkpoint_root(output_dir))
        return (checkpoint_root(output_dir), tags[-1]) if tags else None
    folder = Path(resume)
    if not (folder / COMPLETE_MARKER).is_file():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint folder (no {COMPLETE_MARKER}); "
                                f"pass a {checkpoint_root(output_dir)}/step* folder or --resume auto")
    return folder.parent, folder.name


def check_resume_layout(folder: Path, cfg: JobConfig) -> None:
    """Refuses, naming every difference, a checkpoint whose saved config gives the model other parameters than
    `cfg` does (DeepSpeed itself would fail deep inside its partitioned state, or load a wrong layout)."""
    marker = json.loads((folder / COMPLETE_MARKER).read_text())
    saved = marker.get("config")
    if not saved:
        return
    now = dataclasses.asdict(cfg)
    family = model_family(cfg.model.name)
    differences = []
    for key, assumed in {**_LAYOUT["both"], **_LAYOUT[family]}.items():
        section, name = key.split(".")
        then = saved.get(section, {}).get(name, assumed)
        if then is not None and then != now[section][name]:
            flag = "--model" if key == "model.name" else f"--{name}"
            differences.append(f"{flag} {then} (checkpoint) vs {now[section][name]} (now)")
    layout = marker.get(PARAM_LAYOUT_KEY, 1)
    if layout not in FITTING_LAYOUTS[cfg.run.mode]:
        differences.append(f"parameter layout {layout} (checkpoint) vs {PARAM_LAYOUT} (now; the engine's "
                           "parameter order changed, export the checkpoint's weights with the code that wrote it)")
    if differences:
        raise ConfigError(f"{folder} holds another model layout: {'; '.join(differences)}. Resume with the "
                          f"checkpoint's settings, or start a new --output_dir")


def save_checkpoint(engine, output_dir: str, global_step: int, client_state: Dict[str, Any], keep: int,
                    is_main: bool) -> Path:
    """Saves on every rank (collective), marks the save complete, and keeps only the newest `keep` ones."""
    root, tag = checkpoint_root(output_dir), tag_for(global_step)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state)
    barrier()
    if is_main:
        _write_json_atomically(root / tag / COMPLETE_MARKER, {**client_state, PARAM_LAYOUT_KEY: PARAM_LAYOUT})
        _prune(root, keep)
    barrier()
    log.info("saved checkpoint %s", root / tag)
    return root / tag


def load_checkpoint(engine, root: Path, tag: str) -> Dict[str, Any]:
    """Restores model, optimizer and engine counters; returns the client state saved with them."""
    path, client_state = engine.load_checkpoint(str(root), tag=tag)
    if path is None:
        raise FileNotFoundError(f"could not load checkpoint {root / tag}")
    log.info("resumed from %s", path)
    return client_state


def consolidated_fp32_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Full fp32 weights on the CPU, gathered from ZeRO partitions / fp32 master copies (collective: call on
    every rank; only rank 0 needs the result, but every rank gets it). Packed blocks' flat tensors come back under
    the Block's names, as the model's own state_dict() gives them."""
    state: Dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        full = safe_get_full_fp32_param(param)  # the optimizer's fp32 master copy under ZeRO / bf16
        state[name] = (full if full is not None else param.detach()).float().cpu().clone()
    for name, buffer in model.named_buffers():
        state[name] = buffer.detach().float().cpu().clone()
    return to_block_names(model, state)


def export_weights(model: nn.Module, path: Path, is_main: bool, metadata: Dict[str, str]) -> None:
    """Writes the consolidated fp32 weights as one safetensors file (collective)."""
    state = consolidated_fp32_state_dict(model)
    if is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
        log.info("exported fp32 weights (%d tensors) to %s", len(state), path)
    barrier()


def _prune(root: Path, keep: int) -> None:
    complete = complete_tags(root)
    stale = complete[:-keep]
    newest = int(_TAG.match(complete[-1]).group(1)) if complete else -1
    # incomplete folders older than the newest complete save are leftovers of a killed save
    leftovers = [p.name for p in root.iterdir()
                 if _TAG.match(p.name) and p.name not in complete and int(_TAG.match(p.name).group(1)) < newest]
    for tag in stale + leftovers:
        shutil.rmtree(root / tag, ignore_errors=True)


def _write_json_atomically(path: Path, payload: Dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, path)

"""The DeepSpeed JSON config, completed from the flags so the JSON and the command line never disagree.

Batch size, accumulation and clipping come from the flags: the shipped JSONs say "auto" for them. A JSON that
states a different explicit value is an error rather than a silent winner.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional

from mae_st.config import ConfigError, JobConfig

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "ds_configs"  # package data; the repo's ds_configs/ links here
DEFAULT_CONFIGS = {"pretrain": "pretrain_zero3_bf16.json", "finetune": "finetune_zero3_bf16.json"}


def default_ds_config_path(mode: str) -> Path:
    return CONFIG_DIR / DEFAULT_CONFIGS[mode]


def load_ds_config(path: str | Path) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        shipped = sorted(p.name for p in CONFIG_DIR.glob("*.json"))
        raise ConfigError(f"--ds_config {path}: file not found (shipped configs in {CONFIG_DIR}: {shipped})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"--ds_config {path}: not valid JSON ({err})") from err


def fill_ds_config(ds: Dict[str, Any], cfg: JobConfig, world_size: int, bf16_supported: bool,
                   source: str = "the DeepSpeed config") -> Dict[str, Any]:
    """A copy of `ds` with batch/accumulation/clipping/ZeRO stage from the flags and bf16 off where unsupported."""
    ds = json.loads(json.dumps(ds))
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"{source}: remove '{key}'; the optimizer and lr schedule are built from the flags "
                              "(--blr/--lr, --weight_decay, --warmup_epochs, ...)")
    micro = cfg.data.batch_size_per_gpu * cfg.data.repeat_aug
    from_flags = {
        "train_micro_batch_size_per_gpu": (micro, "--batch_size_per_gpu x --repeat_aug"),
        "gradient_accumulation_steps": (cfg.optim.accum_iter, "--accum_iter"),
        "train_batch_size": (micro * cfg.optim.accum_iter * world_size,
                             "--batch_size_per_gpu x --repeat_aug x --accum_iter x world size"),
        "gradient_clipping": (cfg.optim.clip_grad or 0.0, "--clip_grad"),
    }
    for key, (value, flags) in from_flags.items():
        _fill(ds, key, value, flags, source)
    if cfg.run.zero_stage is not None:
        ds.setdefault("zero_optimization", {})["stage"] = cfg.run.zero_stage
    if ds.get("bf16", {}).get("enabled") and not bf16_supported:
        log.warning("bf16 is off: this accelerator (%s) does not train in bf16 well; training in fp32", "CPU")
        ds["bf16"]["enabled"] = False
    return ds


def uses_bf16(ds: Dict[str, Any]) -> bool:
    return bool(ds.get("bf16", {}).get("enabled"))


def _fill(ds: Dict[str, Any], key: str, value: Any, flags: str, source: str) -> None:
    current: Optional[Any] = ds.get(key, "auto")
    if current != "auto" and float(current) != float(value):
        raise ConfigError(f"{source}: {key}={current} disagrees with {flags} = {value}; set it to \"auto\" "
                          "in the JSON (the flags fill it) or change the flags")
    ds[key] = value

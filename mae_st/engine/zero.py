"""ZeRO set-up that DeepSpeed's JSON cannot express: block-stack leaves, parameter lists DeepSpeed walks kept, and
an aligned parameter layout."""

from __future__ import annotations

import weakref
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
from deepspeed.runtime.zero.utils import get_norm_dtype
from deepspeed.utils import set_z3_leaf_modules

from mae_st.engine.optim import LayerScaledAdamW
from mae_st.models.layers import PACK_ALIGN, BlockStack, PackedBlock


def gather_block_stacks_under_zero3(model: nn.Module, ds_config: Dict[str, Any]) -> None:
    """Under ZeRO-3, fetch and release the parameters of each whole block stack (the encoder's, the decoder's)
    at once instead of per Linear and LayerNorm.

    DeepSpeed's per-module hooks are Python work that, at MAE-ST's few visible tokens per step, costs more than
    the math (docs/performance.md: one gather per Block instead of per layer took the ViT-H/14 pretraining step on
    an H100 from 32.5 to 55.7 clips/s; one per stack, with packed block parameters, cut the host time of a
    32-block step a further 35 % on the CPU). Memory is not the price it seems: with torch's own F.linear
    (`memory_efficient_linear: false` in the shipped JSONs) autograd keeps every gathered weight until backward
    anyway; the stack's gathered bf16 weights are 1.3 GB for ViT-H.
    """
    if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        set_z3_leaf_modules(model, [BlockStack])


# the parameters of each module DeepSpeed walks whole (ZeRO-3 leaves, the engine's root), listed once; weak, so
# engines built and destroyed in one process (the benchmarks, the tests) neither keep their modules alive nor hand
# a new module an old one's list
_LISTED_PARAMETERS: "weakref.WeakKeyDictionary[nn.Module, Tuple[tuple, Tuple[nn.Parameter, ...]]]" = \
    weakref.WeakKeyDictionary()


def list_parameters_once(enabled: bool = True) -> bool:
    """Makes DeepSpeed list the parameters of each module it walks whole (`iter_params(module, recurse=True)`: each
    ZeRO-3 leaf at every fetch, release and backward hook, the engine's root three times an optimizer step) once,
    instead of walking the module's subtree every time (`enabled=False` puts DeepSpeed's own function back). The
    setting is the process's, not one engine's.

    Why: ViT-H/14's encoder stack is 545 modules, and a 16-clip pretraining step walked 8,683 modules (its
    cProfile); with packed block stacks the model has 23 parameter tensors but still ~600 modules, and the root's
    walks (`partition_all_parameters`, `release_and_reset_all`) run on the host while the GPU waits for the
    optimizer step. A module's parameters are fixed once its engine is built (ZeRO-3 converts them at
    initialisation and would not partition one added later), so the list is kept, and made again if DeepSpeed
    registers an external parameter on the module. With packed block stacks on one H200, walking them again ran
    the 16-clip ViT-H/14 pretraining step at 0.83x (`profile_step.py` variant `z3-walkleaves`, docs/performance.md).
    Calls without recurse go to DeepSpeed's function.

    Returns False, changing nothing, when this DeepSpeed has no such function in both modules.
    """
    from deepspeed.runtime.zero import parameter_offload, partitioned_param_coordinator

    current = getattr(partitioned_param_coordinator, "iter_params", None)
    original = getattr(current, "deepspeed_iter_params", current)
    if original is None or getattr(parameter_offload, "iter_params", None) is not current:
        return False
    if not enabled:
        partitioned_param_coordinator.iter_params = parameter_offload.iter_params = original
        return True
    if current is not original:
        return True  # already on

    def iter_params(module: nn.Module, recurse: bool = False):
        if not recurse:
            return original(module, recurse)
        external = tuple(getattr(module, "_external_params", ()))  # ids DeepSpeed registers at run time, if any
        listed = _LISTED_PARAMETERS.get(module)
        if listed is None or listed[0] != external:
            listed = _LISTED_PARAMETERS[module] = (external, tuple(original(module, recurse=True)))
        return iter(listed[1])

    iter_params.deepspeed_iter_params = original
    partitioned_param_coordinator.iter_params = parameter_offload.iter_params = iter_params
    return True


def take_grad_norms_on_device(zero_optimizer: Any) -> bool:
    """Makes a ZeRO-3 optimizer take its gradient norm per group with one `torch._foreach_norm` (fp32 accumulation)
    instead of DeepSpeed's loop (stage3.py `get_grad_norm_direct`), for the plain data-parallel case only; returns
    whether it did. The result is DeepSpeed's: the global L2 norm of this group's gradients over the partition
    group's ranks (all-reduced), -1 where it is NaN/inf (what `step` skips on).

    Why: DeepSpeed's loop copies every gradient partition to fp64 before its norm (8 bytes written and read again
    a parameter, a step), launches four kernels a tensor, and its `torch.tensor(-1.0, device=...)` is a copy from
    the host that waits for the GPU, once a group; all while the step has nothing else queued on the GPU. The
    per-tensor norms here are fp32 reductions (torch's clip_grad_norm_ accumulates so too), summed in fp64. CPU
    offload, Muon, model and expert parallelism keep DeepSpeed's own function, which knows their rules.
    On 2 CPU ranks its norms and losses are DeepSpeed's loop's to 1e-6 (tests/test_engine.py); on an H200 the
    16-clip ViT-H/14 pretraining step ran 1.04x (clipped) / 1.11x (unclipped) the step with DeepSpeed's loop
    (`profile_step.py` variant `z3-dsnorm`; docs/performance.md, 2026-12-02).
    """
    if (getattr(zero_optimizer, "offload_optimizer", True) or getattr(zero_optimizer, "use_muon", False)
            or getattr(zero_optimizer, "model_parallel_group", None) is not None
            or not hasattr(zero_optimizer, "get_grad_norm_direct")):
        return False

    def grad_norm(gradients: List[torch.Tensor], params: List[nn.Parameter], norm_type: float = 2) -> torch.Tensor:
        if (not gradients or float(norm_type) != 2.0
                or zero_optimizer._autoep_expert_parallel_group(params) is not None):
            return deepspeed_grad_norm(gradients, params, norm_type)
        zero_optimizer._assert_same_partition_group(params)
        norms = torch._foreach_norm(gradients, 2, dtype=torch.float32)
        squared = torch.stack(norms).to(get_norm_dtype()).square().sum()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(squared, group=zero_optimizer._get_param_partition_group(params[0]))
        norm = squared.sqrt()
        return torch.where(torch.isfinite(norm), norm, -1.0)

    deepspeed_grad_norm = zero_optimizer.get_grad_norm_direct
    zero_optimizer.get_grad_norm_direct = grad_norm
    return True


def _aligned(numel: int) -> bool:
    return numel % PACK_ALIGN == 0


def order_for_aligned_views(param_groups: List[Dict[str, Any]]) -> None:
    """Reorders `param_groups` (an optimizer's, before its first step) in place so that every weight DeepSpeed
    hands to F.linear starts at a multiple of PACK_ALIGN elements (256 bytes in bf16).

    Why: on one GPU, ZeRO-3 does not gather; its handles set each parameter to a view of its partition, and
    the partitions of all parameters sit back to back in one flat buffer, in optimizer-group order
    (deepspeed/runtime/zero/stage3.py `_create_fp16_partitions_with_defragmentation`, partition_parameters.py
    `NoGatherHandle`). One odd-sized tensor early in that order (the MAE's decoder_pred.bias, 588 elements for
    ViT-H/14) moves every later weight off 16-byte alignment, which cuBLAS's Hopper kernels need. So groups whose
    total is a multiple of PACK_ALIGN go first and, inside each group, tensors whose size is; packed blocks' flat
    tensors are padded to a multiple (mae_st.models.layers.PackedBlock). The math and the groups' settings do not
    change; only the order in which DeepSpeed flattens them does.
    """
    for group in param_groups:
        group["params"].sort(key=lambda p: not _aligned(p.numel()))  # stable: aligned ones first, order kept
    param_groups.sort(key=lambda g: not _aligned(sum(p.numel() for p in g["params"])))


def bind_lr_scales_to_partitions(zero_optimizer: Any) -> None:
    """Tells a `LayerScaledAdamW` inside a ZeRO-3 engine where each parameter sits in the flat fp32 partition
    DeepSpeed hands it for each (sub-)group, so layer-wise lr decay survives the flattening.

    DeepSpeed lays a sub-group's partitions back to back in `fp16_groups` order, each `partition_numel()` long
    (stage3.py `_create_fp16_partitions_with_defragmentation`; the fp32 copy has the same layout). The offsets
    are checked against the addresses of the bf16 partitions, so a DeepSpeed that lays them out otherwise is an
    error here, not a silently wrong lr.
    """
    inner = getattr(zero_optimizer, "optimizer", None)
    if not isinstance(inner, LayerScaledAdamW):
        return
    # this rank's place among those ZeRO-3 partitions each parameter over (partition_parameters.py _partition_param)
    group = getattr(zero_optimizer, "dp_process_group", None)
    rank = torch.distributed.get_rank(group=group) if torch.distributed.is_initialized() else 0
    for sub_group, params in enumerate(zero_optimizer.fp16_groups):
        flat = zero_optimizer.fp32_partitioned_groups_flat[sub_group]
        flat16 = zero_optimizer.fp16_partitioned_groups_flat[sub_group]
        parts, start = [], 0
        for param in params:
            numel = param.partition_numel()
            if flat16 is not None and param.ds_tensor.data_ptr() != flat16.data_ptr() + start * flat16.element_size():
                raise RuntimeError(f"ZeRO-3 sub-group {sub_group}: a partition is not where its order puts it; this "
                                   "DeepSpeed lays partitions out differently, so layer-wise lr decay cannot be bound")
            parts += partition_scale_ranges(inner.scale_ranges(param), rank * numel, numel, start)
            start += numel
        inner.bind_flat(flat, parts)


def partition_scale_ranges(ranges: Sequence[Tuple[int, int, float]], first: int, numel: int,
                           at: int) -> List[Tuple[int, int, float]]:
    """The (offset, numel, scale) ranges of a parameter that fall in its partition, elements [first, first +
    numel) of it (ZeRO-3 gives rank r the r-th stretch of partition_numel() elements), moved to where that
    partition starts in a flat buffer (`at`). The partition's padding past the parameter's end is in no range."""
    out = []
    for offset, length, scale in ranges:
        lo, hi = max(offset, first), min(offset + length, first + numel)
        if lo < hi:
            out.append((at + lo - first, hi - lo, scale))
    return out


def gathered_weight_offsets(model: nn.Module, param_groups: Sequence[Dict[str, Any]],
                            world_size: int) -> Dict[str, int]:
    """Element offset, from the start of the storage it lives in, of every parameter (under its Block name for
    packed blocks) at the moment ZeRO-3 hands it to a layer.

    One rank: the parameter is a view of its partition inside the flat buffer of all partitions (see
    `order_for_aligned_views`), so offsets accumulate over the groups' parameters. Several ranks: each gathered
    parameter is a fresh tensor (partition_parameters.py AllGatherCoalescedHandle concatenates the ranks' pieces
    per parameter), so its offset is 0. Packed stacks and blocks add each view's offset inside their flat tensors.
    """
    names = {id(p): name for name, p in model.named_parameters()}
    offsets: Dict[str, int] = {}
    cursor = 0
    for group in param_groups:
        for param in group["params"]:
            offsets[names[id(param)]] = cursor if world_size == 1 else 0
            numel = getattr(param, "ds_numel", param.numel())  # a ZeRO-3 partitioned parameter holds no data
            cursor += -(-numel // world_size)  # the partition's size: ceil(numel / world size)
    for name, module in model.named_modules():  # a packed stack's flat tensors hold its blocks' one after another
        if isinstance(module, BlockStack) and module.block_numels is not None:
            for flat, numels in module.block_numels.items():
                start = offsets.pop(f"{name}.{flat}")
                for i, numel in enumerate(numels):
                    offsets[f"{name}.{i}.{flat}"] = start
                    start += numel
    for name, module in model.named_modules():
        if isinstance(module, PackedBlock):
            for flat, slots in module.layout.slots.items():
                start = offsets.pop(f"{name}.{flat}")
                offsets.update({f"{name}.{slot.name}": start + slot.offset for slot in slots})
    return offsets


def linear_weight_names(model: nn.Module) -> List[str]:
    """State-dict names of the weights F.linear multiplies by (every Linear's, packed blocks' included)."""
    names = [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, module in model.named_modules():
        if isinstance(module, PackedBlock):
            names += [f"{name}.{slot.name}" for slots in module.layout.slots.values() for slot in slots
                      if slot.name.endswith(".weight") and len(slot.shape) == 2]
    return names


def byte_alignment(offset_elements: int, dtype: torch.dtype = torch.bfloat16, cap: int = 256) -> int:
    """The largest power of two up to `cap` dividing the byte offset (a fresh allocation is at least 512-aligned)."""
    offset = offset_elements * torch.empty((), dtype=dtype).element_size()
    alignment = 1
    while alignment < cap and offset % (2 * alignment) == 0:
        alignment *= 2
    return alignment

"""torch.compile of the transformer blocks: each block's forward (one graph shared by every block), or each block
stack's forward (its blocks unrolled into one graph).

Why: at MAE-ST's few visible tokens a block's step is mostly kernel launches (layer norms, GELU, residual adds,
drop path around the GEMMs); compiled, a block launches fewer, larger kernels. The compiled region is a forward
inside a ZeRO-3 leaf, so DeepSpeed's hooks on the block stacks (fetch and release, gradient bookkeeping) stay
outside it, eager. On an H200 the per-block compiled ZeRO-3 step ran 1.03-1.12x the uncompiled one in five
measurements (docs/performance.md, 2026-12-01 fifth). A whole stack is one compiled call and one autograd node
instead of one a block: 1.01-1.02x the per-block step for ViT-H/14 finetuning and 1.10x for ViT-B/16, but 0.91x
for 16-clip ViT-H/14 pretraining, and its first step compiles for about a minute (2026-12-01 sixth).

Even compiled, the 16-clip pretraining step spent more time launching kernels on the host than the GPU spent
running them. With CUDA graphs (mode="reduce-overhead") a compiled stack's forward and its backward are one
replay each: that step ran 1.31x the plain stacks and its kernels filled 97 % of it (2026-12-02). A graph reads its
weights at the addresses it recorded (torch treats parameters as static inputs and re-records when one moves):
that holds on one GPU, where ZeRO-3 hands out views into one flat buffer (compile_scope in mae_st.engine.build
picks graphs only there).

timm's DropPath keeps its rate as a Python float, which torch.compile specialises on: the finetuning model's blocks
(rates 0 .. drop_path_rate) would each compile their own graph, past dynamo's recompile limit (8), after which the
remaining blocks silently run uncompiled. Compiled blocks get `BufferedDropPath` instead, the same per-sample keep
mask scaled by 1 / keep with the rate in a buffer, so every block shares one graph.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn as nn

from mae_st.models.layers import Block, BlockStack, PackedBlock

__all__ = ["BufferedDropPath", "compile_blocks", "transformer_blocks"]


class BufferedDropPath(nn.Module):
    """Stochastic depth (timm's DropPath with scale_by_keep) with its rate in a tensor, not in the code."""

    def __init__(self, drop_prob: float, device: torch.device):
        super().__init__()
        self.drop_prob = drop_prob
        self.register_buffer("keep_prob", torch.tensor(1.0 - drop_prob, device=device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = self.keep_prob.float()
        mask = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device) < keep
        return x * (mask.to(x.dtype) / keep.to(x.dtype))


def transformer_blocks(model: nn.Module) -> Iterator[nn.Module]:
    """Every Block and PackedBlock of `model`, in module order."""
    return (m for m in model.modules() if isinstance(m, (Block, PackedBlock)))


def compile_blocks(model: nn.Module, whole_stacks: bool = False, cuda_graphs: bool = False) -> int:
    """Compiles the forward of every transformer block of `model` (after packing, so the packed math is what is
    compiled); drop paths become `BufferedDropPath`s. `whole_stacks` compiles each BlockStack's forward instead,
    its blocks unrolled into one graph (one compiled call a stack instead of one a block). `cuda_graphs` compiles
    with mode="reduce-overhead": each compiled call (forward and backward) replays a CUDA graph, one launch instead
    of a launch a kernel. Returns the number of blocks compiled."""
    blocks = list(transformer_blocks(model))
    if not blocks:
        return 0
    device = next(model.parameters()).device
    if any(not isinstance(block.drop_path, nn.Identity) for block in blocks):
        for block in blocks:
            block.drop_path = BufferedDropPath(getattr(block.drop_path, "drop_prob", 0.0), device)
    compiled = [m for m in model.modules() if isinstance(m, BlockStack)] if whole_stacks else blocks
    for module in compiled:
        module.forward = torch.compile(module.forward, mode="reduce-overhead" if cuda_graphs else None)
    return len(blocks)

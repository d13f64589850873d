"""Compiled transformer blocks (mae_st/models/compile.py, --compile_blocks): real torch.compile on the CPU, the same
math as the eager blocks, each block or each block stack as one graph, the usual state-dict names, and the engine
builder compiling where the flag says."""

from __future__ import annotations

import copy

import pytest
import torch

from mae_st.config import JobConfig
from mae_st.engine.build import EngineOverrides, build_engine, compile_scope
from mae_st.engine.distributed import DistEnv
from mae_st.engine.fused_params import fuse_block_parameters, pack_block_stacks
from mae_st.engine.optim import weight_decay_rule
from mae_st.models import create_model
from mae_st.models.compile import BufferedDropPath, compile_blocks, transformer_blocks

TINY_MAE = dict(img_size=32, num_frames=4, pred_t_dim=4, decoder_embed_dim=32, decoder_depth=1,
                decoder_num_heads=4)


def is_compiled(block) -> bool:
    return hasattr(block.forward, "_torchdynamo_orig_callable")


@pytest.mark.parametrize("whole_stacks", [False, True], ids=["each-block", "each-stack"])
def test_compiled_packed_blocks_compute_the_same_loss_and_gradients(whole_stacks):
    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_patch8", **TINY_MAE)
    fuse_block_parameters(model, weight_decay_rule(model))
    if whole_stacks:
        pack_block_stacks(model)  # what ZeRO-3 trains
    compiled = copy.deepcopy(model)
    assert compile_blocks(compiled, whole_stacks=whole_stacks) == 3
    stacks = [compiled.blocks, compiled.decoder_blocks]
    assert all(is_compiled(b) != whole_stacks for b in transformer_blocks(compiled))
    assert all(is_compiled(s) == whole_stacks for s in stacks)
    assert list(compiled.state_dict()) == list(model.state_dict())  # exports and resumes see the same names

    clips = torch.randn(2, 3, 4, 32, 32)
    losses, grads = [], []
    for m in (model, compiled):
        torch.manual_seed(1)  # the same masks
        loss = m(clips)[0]
        loss.backward()
        losses.append(loss.item())
        grads.append({name: p.grad for name, p in m.named_parameters()})
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_drop_paths_become_one_buffered_kind_that_keeps_the_expectation():
    """Every block gets a BufferedDropPath (its rate in a buffer, so one graph serves all blocks): identity in eval
    and at rate 0, and in training each sample is either dropped or scaled by 1 / keep."""
    model = create_model("vit_tiny_patch8", img_size=32, num_frames=4, num_classes=3, drop_path_rate=0.5)
    compile_blocks(model)
    rates = [block.drop_path.drop_prob for block in model.blocks]
    assert all(isinstance(block.drop_path, BufferedDropPath) for block in model.blocks) and rates == [0.0, 0.5]
    x = torch.ones(4000, 2, 3)
    first, last = model.blocks[0].drop_path, model.blocks[-1].drop_path
    assert torch.equal(first(x), x)
    dropped = last(x)
    assert set(dropped.unique().tolist()) <= {0.0, 2.0} and dropped.mean().item() == pytest.approx(1.0, abs=0.1)
    last.eval()
    assert torch.equal(last(x), x)


def test_the_engine_builder_compiles_where_the_flag_says_and_trains_the_same(monkeypatch):
    """--compile_blocks: auto compiles on GPUs only, on one GPU stacks replaying CUDA graphs, on several whole
    stacks for finetuning and each block for pretraining; 'on', 'stack' and 'graphs' (which on a CPU compiles
    without CUDA graphs) give real ZeRO-3 steps on this CPU with the losses of the uncompiled engine."""
    from benchmarks.gemm_alignment import one_rank_world_env, start_one_rank_world

    # a world of one whose variables go when the test ends: later subprocesses (the demo's train.py) must not
    # inherit this process's port
    for key, value in one_rank_world_env().items():
        monkeypatch.setenv(key, value)
    gpu, cpu = DistEnv(0, 1, 0, torch.device("cuda", 0)), DistEnv(0, 1, 0, torch.device("cpu"))
    gpus = DistEnv(1, 2, 1, torch.device("cuda", 1))
    assert (compile_scope("auto", "finetune", gpu), compile_scope("auto", "pretrain", gpu)) == ("graphs", "graphs")
    assert (compile_scope("auto", "finetune", gpus), compile_scope("auto", "pretrain", gpus)) == ("stack", "block")
    assert compile_scope("auto", "finetune", cpu) is None and compile_scope("off", "pretrain", gpu) is None
    assert (compile_scope("on", "finetune", cpu), compile_scope("stack", "pretrain", cpu)) == ("block", "stack")
    env = start_one_rank_world()
    cfg = JobConfig()
    cfg.model.name, cfg.data.img_size, cfg.data.num_frames = "mae_vit_tiny_patch8", 32, 4
    cfg.model.decoder_embed_dim, cfg.model.decoder_depth, cfg.model.decoder_num_heads = 32, 1, 4
    cfg.model.pred_t_dim, cfg.data.batch_size_per_gpu = 4, 2
    losses = {}
    for setting in ("off", "on", "stack", "graphs"):
        built = build_engine(cfg, env, EngineOverrides(compile_blocks=setting))
        try:
            assert all(is_compiled(b) for b in transformer_blocks(built.model)) == (setting == "on")
            assert is_compiled(built.model.blocks) == (setting in ("stack", "graphs"))
            clips = torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(0))
            torch.manual_seed(1)
            losses[setting] = []
            for _ in range(2):
                loss = built.loss_fn(built.engine, clips, None)
                built.engine.backward(loss)
                built.engine.step()
                losses[setting].append(loss.item())
        finally:
            built.engine.destroy()
    assert losses["on"] == pytest.approx(losses["off"], rel=1e-5)
    assert losses["stack"] == pytest.approx(losses["off"], rel=1e-5)
    assert losses["graphs"] == pytest.approx(losses["off"], rel=1e-5)

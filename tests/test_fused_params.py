"""Packed block parameters (mae_st/engine/fused_params.py, mae_st.models.layers.PackedBlock): the same math, the
same optimizer groups, the usual names in and out of state dicts, aligned views; and resuming refuses a checkpoint
of another parameter layout."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from mae_st.config import ConfigError, JobConfig
from mae_st.config import ModelConfig
from mae_st.engine.checkpoint import COMPLETE_MARKER, PARAM_LAYOUT, PARAM_LAYOUT_KEY, check_resume_layout
from mae_st.engine.fused_params import (FUSED_DECAY, FUSED_NO_DECAY, fuse_block_parameters, pack_block_stacks,
                                        to_block_names)
from mae_st.engine.optim import build_param_groups, weight_decay_rule
from mae_st.engine.zero import (byte_alignment, gathered_weight_offsets, linear_weight_names,
                                list_parameters_once, order_for_aligned_views)
from mae_st.models import build_model, create_model
from mae_st.models.layers import PACK_ALIGN, PackedBlock, block_decayed_names

TINY_MAE = dict(img_size=32, num_frames=4, pred_t_dim=4, decoder_embed_dim=32, decoder_depth=1,
                decoder_num_heads=4)


def packed_copy(model, bias_wd: bool = False):
    packed = copy.deepcopy(model)
    assert fuse_block_parameters(packed, weight_decay_rule(packed, bias_wd)) == len(model.blocks) + len(
        getattr(model, "decoder_blocks", []))
    return packed


def grads_by_name(model):
    return {name: param.grad for name, param in model.named_parameters()}


@pytest.mark.parametrize("stacks", [False, True])
@pytest.mark.parametrize("family", ["mae", "classifier"])
def test_packed_blocks_and_stacks_compute_the_same_loss_and_gradients(family, stacks):
    """Packed blocks (2 tensors a block), and stacks holding their packed blocks' tensors (2 a stack, what the
    ZeRO-3 engine trains): the same loss and gradients as the plain model, the usual names out of state_dict()."""
    torch.manual_seed(0)
    if family == "mae":
        model = create_model("mae_vit_tiny_patch8", **{**TINY_MAE, "decoder_depth": 2})
    else:  # drop path and recomputed activations exercise binding the views again inside backward
        model = create_model("vit_tiny_patch8", img_size=32, num_frames=4, num_classes=3, drop_path_rate=0.3,
                             grad_checkpointing=True)
    packed = stacked_copy(model) if stacks else packed_copy(model)
    block = packed.blocks[0]
    assert isinstance(block, PackedBlock)
    owner = packed.blocks if stacks else block  # nothing else owns any
    assert [name for name, _ in owner.named_parameters()] == [FUSED_DECAY, FUSED_NO_DECAY]
    assert list(packed.state_dict()) == list(model.state_dict())

    clips = torch.randn(2, 3, 4, 32, 32)
    losses = []
    for m in (model, packed):
        torch.manual_seed(1)  # the same masks and drop paths
        out = m(clips)
        loss = out[0] if family == "mae" else F.cross_entropy(out, torch.tensor([0, 2]))
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == losses[1]
    expected, got = grads_by_name(model), to_block_names(packed, grads_by_name(packed))
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


def stacked_copy(model):
    packed = packed_copy(model)
    assert pack_block_stacks(packed) == 1 + hasattr(model, "decoder_blocks")
    return packed


@pytest.mark.parametrize("name, kwargs", [("mae_vit_tiny_patch8", TINY_MAE),
                                          ("vit_tiny_patch8", dict(img_size=32, num_frames=4, no_qkv_bias=True))])
def test_state_dict_in_and_out_under_the_usual_names(name, kwargs):
    model = create_model(name, **kwargs)
    packed = packed_copy(model)
    original, saved = model.state_dict(), packed.state_dict()
    assert list(saved) == list(original)  # same names, same order
    assert all(torch.equal(saved[key], original[key]) for key in original)
    create_model(name, **kwargs).load_state_dict(saved)  # a plain model loads it, strictly

    other = packed_copy(create_model(name, **kwargs))  # other random weights, packed
    other.load_state_dict(original)
    assert all(torch.equal(value, original[key]) for key, value in other.state_dict().items())


@pytest.mark.parametrize("bias_wd, align", [(False, PACK_ALIGN), (True, PACK_ALIGN), (False, 1)])
def test_a_plain_model_loads_the_flat_tensors_of_a_deepspeed_checkpoint(bias_wd, align):
    """zero_to_fp32 consolidates a DeepSpeed checkpoint under the engine's parameter names, the flat tensors;
    tools/visualize.py loads that into a plain model. align=1: checkpoints written before views were aligned."""
    model = create_model("mae_vit_tiny_patch8", **TINY_MAE)
    packed = copy.deepcopy(model)
    for stack in (packed.blocks, packed.decoder_blocks):
        for i, block in enumerate(stack):
            shapes = {key: tuple(p.shape) for key, p in block.named_parameters()}
            stack[i] = PackedBlock(block, block_decayed_names(shapes, bias_wd), align)
    consolidated = {**{k: p.detach() for k, p in packed.named_parameters()}, **dict(packed.named_buffers())}
    assert "blocks.0.fused_decay" in consolidated
    plain = create_model("mae_vit_tiny_patch8", **TINY_MAE)
    plain.load_state_dict(consolidated)
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in plain.state_dict().items())

    consolidated["blocks.0.fused_decay"] = consolidated["blocks.0.fused_decay"][:-1]
    with pytest.raises(RuntimeError, match="blocks.0.: packed tensors of .* fit no packing"):
        create_model("mae_vit_tiny_patch8", **TINY_MAE).load_state_dict(consolidated)


def test_a_packed_stack_loads_every_earlier_form_and_a_plain_model_loads_its_flat_tensors():
    """Into a packed stack: the Block names (exports, the original's checkpoints) and each block's own flat tensors
    (a consolidated checkpoint packed per block). Into a plain model: the stack's flat tensors (zero_to_fp32 of
    this engine's checkpoints). Every value lands where it was."""
    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_patch8", **TINY_MAE)
    want = model.state_dict()
    per_block = {name: p.detach() for name, p in packed_copy(model).named_parameters()}
    stack_flats = {name: p.detach() for name, p in stacked_copy(model).named_parameters()}
    assert "blocks.0.fused_decay" in per_block and "blocks.fused_decay" in stack_flats
    outside_blocks = {k: v for k, v in want.items() if not k.startswith(("blocks.", "decoder_blocks."))}
    for source in (want, per_block):
        target = stacked_copy(create_model("mae_vit_tiny_patch8", **TINY_MAE))
        target.load_state_dict({**outside_blocks, **source})
        for name, value in target.state_dict().items():
            assert torch.equal(value, want[name]), name
    plain = create_model("mae_vit_tiny_patch8", **TINY_MAE)
    plain.load_state_dict({**outside_blocks, **stack_flats})
    for name, value in plain.state_dict().items():
        assert torch.equal(value, want[name]), name
    wrong = dict(want)
    wrong["blocks.1.mlp.fc1.weight"] = torch.zeros(3, 3)
    with pytest.raises(RuntimeError, match="size mismatch for blocks.1.mlp.fc1.weight"):
        stacked_copy(create_model("mae_vit_tiny_patch8", **TINY_MAE)).load_state_dict(wrong)


def test_views_start_aligned_and_padding_stays_zero():
    model = create_model("mae_vit_tiny_patch8", **TINY_MAE)  # 64- and 32-wide: biases and norms need padding
    packed = packed_copy(model)
    block = packed.blocks[0]
    for flat, slots in block.layout.slots.items():
        assert getattr(block, flat).numel() % PACK_ALIGN == 0
        assert all(slot.offset % PACK_ALIGN == 0 for slot in slots)
    padding = torch.ones(block.fused_no_decay.numel(), dtype=torch.bool)
    for slot in block.layout.slots[FUSED_NO_DECAY]:
        padding[slot.offset:slot.offset + slot.numel] = False
    assert padding.any()
    packed(torch.randn(2, 3, 4, 32, 32))[0].backward()
    assert torch.all(block.fused_no_decay.detach()[padding] == 0) and torch.all(block.fused_no_decay.grad[padding] == 0)


@pytest.mark.parametrize("mode", ["pretrain", "finetune"])
def test_single_gpu_zero3_views_of_vit_h_start_256_byte_aligned(mode):
    """The layout DeepSpeed gives parameters on one rank (mae_st.engine.zero.gathered_weight_offsets; the same
    computation is checked against a real ZeRO-3 engine in tests/test_engine.py) puts every GEMM weight of ViT-H/14
    on a 256-byte boundary once packed and ordered; before, the MAE's were 8-byte aligned."""
    name = "mae_vit_huge_patch14" if mode == "pretrain" else "vit_huge_patch14"
    cfg = ModelConfig(name=name, num_classes=400)
    with torch.device("meta"):
        model = build_model(cfg, 224, 16)

    def alignments(m, align_views: bool):
        # ZeRO-3 flattens the weight-decay groups in both modes (finetuning's layer decay is inside the optimizer)
        groups = build_param_groups(m, 0.05)
        if align_views:
            order_for_aligned_views(groups)
        offsets = gathered_weight_offsets(m, groups, world_size=1)
        return {key: byte_alignment(offsets[key]) for key in linear_weight_names(m)}

    before = alignments(model, align_views=False)
    packed = copy.deepcopy(model)
    fuse_block_parameters(packed, weight_decay_rule(packed))
    stacked = copy.deepcopy(packed)
    pack_block_stacks(stacked)
    # each block's q, k, v, proj, fc1, fc2, then decoder_embed and decoder_pred, or the head
    linear_layers = 6 * 36 + 2 if mode == "pretrain" else 6 * 32 + 1
    for after in (alignments(packed, align_views=True), alignments(stacked, align_views=True)):
        assert set(after) == set(before) and len(after) == linear_layers
        assert all(alignment == 256 for alignment in after.values()), {k: v for k, v in after.items() if v < 256}
    if mode == "pretrain":
        assert before["blocks.0.attn.q.weight"] == 8


def test_packed_blocks_keep_weight_decay_and_layer_decay_per_element():
    model = create_model("vit_tiny_patch8", img_size=32, num_frames=4, num_classes=5)

    def settings(m, bias_wd: bool):  # Block-named parameter -> (weight decay, lr scale) of the group optimising it
        names = {id(p): key for key, p in m.named_parameters()}
        found = {}
        for group in build_param_groups(m, 0.05, layer_decay=0.75, bias_wd=bias_wd):
            for param in group["params"]:
                key = names[id(param)]
                prefix, _, flat = key.rpartition(".")
                owner = m.get_submodule(prefix) if prefix else m
                held = ([f"{prefix}.{slot.name}" for slot in owner.layout.slots[flat]]
                        if isinstance(owner, PackedBlock) else [key])  # every element of a flat tensor: its group's
                found.update({name: (group["weight_decay"], group["lr_scale"]) for name in held})
        return found

    for bias_wd in (False, True):  # packing sorts by the optimizer's rule, so it takes the same bias_wd
        plain = settings(model, bias_wd)
        assert settings(packed_copy(model, bias_wd), bias_wd) == plain
        assert len(plain) == len(dict(model.named_parameters()))


def write_checkpoint_config(folder, cfg: JobConfig):
    folder.mkdir(parents=True)
    (folder / COMPLETE_MARKER).write_text(json.dumps({"global_step": 4, "config": dataclasses.asdict(cfg),
                                                      PARAM_LAYOUT_KEY: PARAM_LAYOUT}))


def test_resume_refuses_a_checkpoint_of_another_layout(tmp_path):
    cfg = JobConfig()
    cfg.model.name = "mae_vit_tiny_patch8"
    write_checkpoint_config(tmp_path / "same", cfg)
    check_resume_layout(tmp_path / "same", cfg)

    other = copy.deepcopy(cfg)
    other.model.decoder_depth, other.data.img_size, other.run.fuse_block_params = 2, 64, False
    other.model.num_classes = 7  # not a pretraining model's parameter: no difference
    write_checkpoint_config(tmp_path / "other", other)
    with pytest.raises(ConfigError) as err:
        check_resume_layout(tmp_path / "other", cfg)
    message = str(err.value)
    for part in ("--decoder_depth 2 (checkpoint) vs 4 (now)", "--img_size 64 (checkpoint) vs 224 (now)",
                 "--fuse_block_params False (checkpoint) vs True (now)"):
        assert part in message
    assert "num_classes" not in message

    saved = dataclasses.asdict(cfg)
    del saved["run"]["fuse_block_params"]  # written before packing existed: its blocks were not packed
    (tmp_path / "older").mkdir()
    (tmp_path / "older" / COMPLETE_MARKER).write_text(json.dumps({"config": saved}))
    with pytest.raises(ConfigError, match="--fuse_block_params False"):
        check_resume_layout(tmp_path / "older", cfg)
    # and its parameters were in the order before aligned views
    with pytest.raises(ConfigError, match=f"parameter layout 1 .checkpoint. vs {PARAM_LAYOUT} .now"):
        check_resume_layout(tmp_path / "older", cfg)


def test_checkpoints_of_earlier_engine_layouts_are_refused(tmp_path):
    """Layout 2 finetuning checkpoints hold one ZeRO-3 optimizer partition per layer, layout 3 ones two tensors a
    block; today's ZeRO-3 engine holds two a block stack, so neither resumes, in either mode."""
    for mode, model in (("pretrain", "mae_vit_tiny_patch8"), ("finetune", "vit_tiny_patch8")):
        cfg = JobConfig()
        cfg.run.mode, cfg.model.name = mode, model
        for layout in (2, 3):
            folder = tmp_path / f"{mode}{layout}"
            write_checkpoint_config(folder, cfg)
            marker = json.loads((folder / COMPLETE_MARKER).read_text())
            (folder / COMPLETE_MARKER).write_text(json.dumps({**marker, PARAM_LAYOUT_KEY: layout}))
            with pytest.raises(ConfigError, match=f"parameter layout {layout} .checkpoint. vs {PARAM_LAYOUT} .now"):
                check_resume_layout(folder, cfg)


def test_modules_walked_whole_list_their_parameters_once_and_again_when_deepspeed_registers_one():
    """What the ZeRO-3 engine's fetch, release and step get from DeepSpeed's iter_params(recurse=True): a leaf's
    or the root's parameters, listed by one walk of its modules, then kept (and listed again when an external
    parameter is registered on it); recurse=False as before; no module kept alive by the list; DeepSpeed's own
    function back when turned off."""
    import gc
    import weakref

    from deepspeed.runtime.zero import parameter_offload, partitioned_param_coordinator as coordinator
    from deepspeed.runtime.zero.partition_parameters import _init_external_params, register_external_parameter
    from deepspeed.utils import set_z3_leaf_modules

    def counting_walks(module):
        walks = [0]
        named_parameters = module.named_parameters

        def counted(*args, **kwargs):
            walks[0] += 1
            return named_parameters(*args, **kwargs)

        module.named_parameters = counted
        return walks

    before = coordinator.iter_params
    original = getattr(before, "deepspeed_iter_params", before)
    try:
        assert list_parameters_once()
        iter_params = coordinator.iter_params
        assert parameter_offload.iter_params is iter_params and iter_params is not original
        leaf = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sequential(torch.nn.LayerNorm(3),
                                                                               torch.nn.Linear(3, 1)))
        other = torch.nn.Sequential(torch.nn.Linear(2, 2))
        set_z3_leaf_modules(leaf, [torch.nn.Sequential])
        for module in (leaf, other):
            _init_external_params(module)  # what ZeRO-3's initialisation gives every module
        leaf_params, other_params = list(leaf.parameters()), list(other.parameters())
        leaf_walks, other_walks = counting_walks(leaf), counting_walks(other)
        for _ in range(3):
            assert list(iter_params(leaf, recurse=True)) == leaf_params
            assert list(iter_params(other, recurse=True)) == other_params
        assert (leaf_walks[0], other_walks[0]) == (1, 1)
        assert list(iter_params(leaf)) == []  # recurse=False: the leaf's own (none), DeepSpeed's way
        extra = torch.nn.Parameter(torch.zeros(1))
        register_external_parameter(leaf, extra)
        assert list(iter_params(leaf, recurse=True)) == leaf_params + [extra] and leaf_walks[0] == 3
        gone = weakref.ref(leaf)
        del leaf
        gc.collect()
        assert gone() is None
        assert list_parameters_once(enabled=False)
        assert coordinator.iter_params is original and parameter_offload.iter_params is original
    finally:
        coordinator.iter_params = parameter_offload.iter_params = before

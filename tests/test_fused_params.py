"""Packed block parameters (mae_st/engine/fused_params.py): the same math, the same optimizer groups, the usual
names on the way out; and resuming refuses a checkpoint of another parameter layout."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from mae_st.config import ConfigError, JobConfig
from mae_st.engine.checkpoint import COMPLETE_MARKER, check_resume_layout
from mae_st.engine.fused_params import FUSED_DECAY, FUSED_NO_DECAY, fuse_block_parameters, unfuse_state_dict
from mae_st.engine.optim import build_param_groups, weight_decay_rule
from mae_st.models import create_model

TINY_MAE = dict(img_size=32, num_frames=4, pred_t_dim=4, decoder_embed_dim=32, decoder_depth=1,
                decoder_num_heads=4)


def packed_copy(model, bias_wd: bool = False):
    packed = copy.deepcopy(model)
    assert fuse_block_parameters(packed, weight_decay_rule(packed, bias_wd)) == len(model.blocks) + len(
        getattr(model, "decoder_blocks", []))
    return packed


def grads_by_name(model):
    return {name: param.grad for name, param in model.named_parameters()}


@pytest.mark.parametrize("family", ["mae", "classifier"])
def test_packed_blocks_compute_the_same_loss_and_gradients(family):
    torch.manual_seed(0)
    if family == "mae":
        model = create_model("mae_vit_tiny_patch8", **TINY_MAE)
    else:  # drop path and recomputed activations exercise binding the views again inside backward
        model = create_model("vit_tiny_patch8", img_size=32, num_frames=4, num_classes=3, drop_path_rate=0.3,
                             grad_checkpointing=True)
    packed = packed_copy(model)
    block = packed.blocks[0]
    assert [name for name, _ in block.named_parameters()] == [FUSED_DECAY, FUSED_NO_DECAY]
    assert block.attn.q.weight is None  # views exist only during a call

    clips = torch.randn(2, 3, 4, 32, 32)
    losses = []
    for m in (model, packed):
        torch.manual_seed(1)  # the same masks and drop paths
        out = m(clips)
        loss = out[0] if family == "mae" else F.cross_entropy(out, torch.tensor([0, 2]))
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == losses[1]
    expected, got = grads_by_name(model), unfuse_state_dict(packed, grads_by_name(packed))
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_unfused_state_dict_has_the_usual_names_and_values():
    model = create_model("mae_vit_tiny_patch8", **TINY_MAE)
    packed = packed_copy(model)
    assert any(FUSED_DECAY in name for name in packed.state_dict())
    restored = unfuse_state_dict(packed, packed.state_dict())
    original = model.state_dict()
    assert set(restored) == set(original)
    assert all(torch.equal(restored[name], original[name]) for name in original)
    create_model("mae_vit_tiny_patch8", **TINY_MAE).load_state_dict(restored)


def test_packed_blocks_keep_weight_decay_and_layer_decay_per_element():
    model = create_model("vit_tiny_patch8", img_size=32, num_frames=4, num_classes=5)

    def elements(groups):  # (weight decay, lr scale) -> parameter elements
        totals = {}
        for group in groups:
            key = (group["weight_decay"], group["lr_scale"])
            totals[key] = totals.get(key, 0) + sum(p.numel() for p in group["params"])
        return totals

    for bias_wd in (False, True):  # packing sorts by the optimizer's rule, so it takes the same bias_wd
        packed = packed_copy(model, bias_wd)
        plain = build_param_groups(model, 0.05, layer_decay=0.75, bias_wd=bias_wd)
        fused = build_param_groups(packed, 0.05, layer_decay=0.75, bias_wd=bias_wd)
        assert elements(fused) == elements(plain)


def write_checkpoint_config(folder, cfg: JobConfig):
    folder.mkdir(parents=True)
    (folder / COMPLETE_MARKER).write_text(json.dumps({"global_step": 4, "config": dataclasses.asdict(cfg)}))


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

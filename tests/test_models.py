"""Model zoo: shapes, parameter counts, masking and loss, determinism, gradients, position-embedding resizing,
pretrained-weight loading, bf16 autocast and activation checkpointing. Tiny models on the CPU; the big ones on the
meta device (shapes only, no memory)."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from safetensors.torch import save_file

from mae_st.config import ModelConfig
from mae_st.models import (
    MaskedAutoencoderViT,
    VisionTransformer,
    build_model,
    create_model,
    list_models,
    load_checkpoint_file,
    load_encoder_into_classifier,
    model_family,
)
from mae_st.models.layers import (
    interpolate_joint_pos_embed,
    interpolate_spatial_pos_embed,
    interpolate_temporal_pos_embed,
)

# tiny clip geometry: 8 frames of 32x32 -> with 2x8x8 patches a 4x4x4 grid, L = 64 tokens
TINY = dict(img_size=32, num_frames=8, t_patch_size=2)
TINY_MAE = dict(TINY, pred_t_dim=4, mask_ratio=0.75)

EXPECTED_MODELS = {
    "mae_vit_tiny_patch8", "mae_vit_mini_patch16", "mae_vit_small_patch16", "mae_vit_base_patch16",
    "mae_vit_large_patch16", "mae_vit_huge_patch14", "vit_tiny_patch8", "vit_mini_patch16", "vit_small_patch16",
    "vit_base_patch16", "vit_large_patch16", "vit_huge_patch14",
}  # fmt: skip


def tiny_mae(**kwargs) -> MaskedAutoencoderViT:
    torch.manual_seed(0)
    return create_model("mae_vit_tiny_patch8", **{**TINY_MAE, **kwargs})


def tiny_vit(**kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    return create_model("vit_tiny_patch8", **{**TINY, "num_classes": 5, **kwargs})


def clips(batch: int = 2, frames: int = 8, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, frames, size, size, generator=torch.Generator().manual_seed(seed))


def is_decoder_key(key: str) -> bool:
    return key.startswith("decoder") or key == "mask_token"


# ---- registry and shapes -------------------------------------------------------------------------------------------


def test_registry_lists_every_model_with_its_family():
    assert set(list_models()) == EXPECTED_MODELS
    assert set(list_models("mae")) == {n for n in EXPECTED_MODELS if n.startswith("mae_")}
    assert all(model_family(n) == "classifier" for n in list_models("classifier"))


def test_unknown_model_name_lists_the_registered_ones():
    with pytest.raises(ValueError, match="vit_base_patch16") as err:
        create_model("vit_gigantic_patch2")
    assert "mae_vit_large_patch16" in str(err.value)


@pytest.mark.parametrize("name", sorted(EXPECTED_MODELS))
def test_every_model_forward_shapes_at_paper_geometry_on_meta(name):
    with torch.device("meta"):
        model = create_model(name, num_frames=16, img_size=224)
        out = model(torch.empty(2, 3, 16, 224, 224))
    p = model.patch_embed.patch_size
    grid = (8, 224 // p, 224 // p)
    assert model.input_size == grid and model.num_patches == math.prod(grid)
    if model_family(name) == "mae":
        loss, pred, mask = out
        # pred_t_dim=8 of 16 frames with t_patch 2: each token predicts 1 frame of p x p x 3 pixels
        assert loss.shape == () and pred.shape == (2, model.num_patches, p * p * 3)
        assert mask.shape == (2, model.num_patches)
        assert model.token_counts().encoder == int(model.num_patches * 0.1) + 1  # default mask_ratio 0.9, cls
    else:
        assert out.shape == (2, 400)


def test_tiny_models_run_on_cpu():
    loss, pred, mask = tiny_mae()(clips())
    # pred_t_dim 4 of 8 frames, t_patch 2: 1 frame per token
    assert torch.isfinite(loss) and pred.shape == (2, 64, 8 * 8 * 3) and mask.shape == (2, 64)
    assert tiny_vit()(clips()).shape == (2, 5)


@pytest.mark.parametrize(
    "name, expected_millions", [("vit_base_patch16", 86), ("vit_large_patch16", 304), ("vit_huge_patch14", 632)]
)
def test_encoder_parameter_counts_match_the_paper(name, expected_millions):
    with torch.device("meta"):
        mae = create_model("mae_" + name)
        classifier = create_model(name)
    encoder = sum(p.numel() for k, p in mae.named_parameters() if not is_decoder_key(k))
    assert abs(encoder / 1e6 - expected_millions) < 0.01 * expected_millions
    head = sum(p.numel() for k, p in classifier.named_parameters() if k.startswith("head."))
    assert sum(p.numel() for p in classifier.parameters()) - head == encoder  # same encoder in both families


def test_build_model_passes_only_the_fields_of_the_family():
    cfg = ModelConfig(name="mae_vit_tiny_patch8", mask_ratio=0.5, pred_t_dim=4, decoder_embed_dim=48,
                      decoder_depth=1, decoder_num_heads=4, num_classes=7, sep_pos_embed=False)  # fmt: skip
    mae = build_model(cfg, img_size=32, num_frames=8)
    assert isinstance(mae, MaskedAutoencoderViT)
    assert (mae.mask_ratio, mae.pred_t_dim, mae.decoder_embed_dim, mae.sep_pos_embed) == (0.5, 4, 48, False)
    cfg.name = "vit_tiny_patch8"
    vit = build_model(cfg, img_size=32, num_frames=8)
    assert isinstance(vit, VisionTransformer) and vit.head.out_features == 7 and not vit.sep_pos_embed
    assert vit.blocks[-1].drop_path.drop_prob == pytest.approx(cfg.drop_path_rate)


def test_no_weight_decay_names_the_token_and_position_parameters():
    mae, vit = tiny_mae(), tiny_vit()
    assert mae.no_weight_decay() == {
        "cls_token", "pos_embed_spatial", "pos_embed_temporal", "pos_embed_class", "mask_token",
        "decoder_cls_token", "decoder_pos_embed_spatial", "decoder_pos_embed_temporal", "decoder_pos_embed_class",
    }  # fmt: skip
    assert vit.no_weight_decay() == {"cls_token", "pos_embed_spatial", "pos_embed_temporal", "pos_embed_class"}
    joint = tiny_mae(sep_pos_embed=False, cls_embed=False)
    assert joint.no_weight_decay() == {"pos_embed", "decoder_pos_embed", "mask_token"}
    assert joint.no_weight_decay() <= dict(joint.named_parameters()).keys()


# ---- masking and loss ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_ratio", [0.75, 0.9, 0.33])
def test_masking_keeps_exactly_the_lowest_noise_tokens(mask_ratio):
    model = tiny_mae()
    noise = torch.rand(3, model.num_patches)
    len_keep = int(model.num_patches * (1 - mask_ratio))
    latent, mask, _ = model.forward_encoder(clips(batch=3), mask_ratio, noise)
    assert latent.shape == (3, len_keep, 64)
    assert mask.sum(dim=1).tolist() == [model.num_patches - len_keep] * 3
    kept_by_noise = torch.zeros_like(mask)
    kept_by_noise.scatter_(1, noise.argsort(dim=1)[:, :len_keep], 1.0)
    assert torch.equal(mask, 1.0 - kept_by_noise)
    assert model.len_keep(mask_ratio) == len_keep


def reference_loss(model: MaskedAutoencoderViT, x: torch.Tensor, pred: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked patches of the per-patch MSE, computed without the model's own target code."""
    frames = x[:, :, torch.linspace(0, x.shape[2] - 1, model.pred_t_dim).long()]
    n, c, t, h, w = frames.shape
    u, p = model.t_pred_patch_size, model.patch_embed.patch_size
    patches = frames.reshape(n, c, t // u, u, h // p, p, w // p, p)
    target = torch.einsum("nctuhpwq->nthwupqc", patches).reshape(n, -1, u * p * p * c)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    total, count = 0.0, 0
    for i in range(n):
        for j in range(target.shape[1]):
            if mask[i, j] == 1:
                total += ((pred[i, j] - target[i, j]) ** 2).mean()
                count += 1
    return total / count


def test_loss_is_the_mean_error_over_masked_patches_only():
    model = tiny_mae()
    x = clips()
    loss, pred, mask = model(x, noise=torch.rand(2, model.num_patches))
    assert torch.allclose(loss, reference_loss(model, x, pred, mask), rtol=1e-5)
    # a perfect prediction of the masked patches gives zero loss whatever the visible ones hold
    perfect = torch.where(mask.bool().unsqueeze(-1), model.prediction_target(x), torch.randn_like(pred))
    assert model.forward_loss(x, perfect, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_same_noise_same_loss_and_different_noise_different_mask():
    model = tiny_mae()
    x = clips()
    noise = torch.rand(2, model.num_patches, generator=torch.Generator().manual_seed(5))
    loss_a, pred_a, mask_a = model(x, noise=noise)
    loss_b, pred_b, mask_b = model(x, noise=noise.clone())
    assert torch.equal(loss_a, loss_b) and torch.equal(pred_a, pred_b) and torch.equal(mask_a, mask_b)
    loss_c, _, mask_c = model(x, noise=torch.rand(2, model.num_patches, generator=torch.Generator().manual_seed(6)))
    assert not torch.equal(mask_a, mask_c) and loss_a != loss_c


def test_explicit_mask_ratio_overrides_the_configured_one():
    model = tiny_mae()
    assert model(clips(), mask_ratio=0.5)[2].sum(dim=1).tolist() == [32.0, 32.0]
    assert model(clips())[2].sum(dim=1).tolist() == [48.0, 48.0]  # configured 0.75
    with pytest.raises(ValueError, match="noise must have shape"):
        model(clips(), noise=torch.rand(2, 10))


def test_patchify_round_trips_and_keeps_no_state():
    model = tiny_mae()
    frames = model.target_frames(clips())
    assert frames.shape == (2, 3, 4, 32, 32)
    assert torch.equal(model.unpatchify(model.patchify(frames)), frames)
    assert not hasattr(model, "patch_info")


def test_target_frames_are_the_originals_from_an_index_made_once():
    """The original picks torch.linspace(0, T - 1, pred_t_dim).long() frames at every step; the index is made once
    per clip length and device (a CPU index copied at every step synchronised with the GPU), outside the state
    dict and its parameter names."""
    model = tiny_mae()  # pred_t_dim 4 of 8 frames
    x = clips()
    assert torch.equal(model.target_frames(x), x[:, :, [0, 2, 4, 7]])  # linspace(0, 7, 4) = 0, 2.33, 4.67, 7
    index = model._frame_indexes[(8, x.device)]
    model(x)
    assert model._frame_indexes[(8, x.device)] is index
    longer = clips(frames=16)  # another clip length: its own index
    assert torch.equal(model.target_frames(longer), longer[:, :, [0, 5, 10, 15]])
    assert set(model.state_dict()) == set(tiny_mae().state_dict())
    assert not list(model.buffers())


@pytest.mark.parametrize("sep_pos_embed, cls_embed", [(True, True), (False, False), (False, True)])
def test_gradients_reach_every_trainable_parameter(sep_pos_embed, cls_embed):
    for model in (tiny_mae(sep_pos_embed=sep_pos_embed, cls_embed=cls_embed),
                  tiny_vit(sep_pos_embed=sep_pos_embed, cls_embed=cls_embed)):  # fmt: skip
        out = model(clips())
        loss = out[0] if isinstance(out, tuple) else out.logsumexp(dim=1).mean()
        loss.backward()
        no_grad = [k for k, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert no_grad == [], f"{type(model).__name__}: no gradient for {no_grad}"


# ---- position embeddings -------------------------------------------------------------------------------------------


def smooth_field(*sizes: int, dim: int = 6) -> torch.Tensor:
    """A smooth function of position (like learned/sin-cos embeddings), sampled on a grid: (1, prod(sizes), dim)."""
    axes = torch.meshgrid(*[(torch.arange(s) + 0.5) / s for s in sizes], indexing="ij")
    freqs = torch.linspace(0.25, 0.75, dim)
    values = sum(torch.sin(math.pi * (k + 1) * a.unsqueeze(-1) * freqs) for k, a in enumerate(axes))
    return values.reshape(1, -1, dim)


def test_pos_embed_interpolation_round_trips():
    spatial = smooth_field(8, 8)
    up = interpolate_spatial_pos_embed(spatial, (8, 8), (16, 16))
    assert up.shape == (1, 256, 6)
    assert torch.allclose(interpolate_spatial_pos_embed(up, (16, 16), (8, 8)), spatial, atol=0.02)

    temporal = smooth_field(8)
    up = interpolate_temporal_pos_embed(temporal, 16)
    assert up.shape == (1, 16, 6)
    assert torch.allclose(interpolate_temporal_pos_embed(up, 8), temporal, atol=0.05)

    joint = torch.cat([torch.randn(1, 1, 6), smooth_field(4, 8, 8)], dim=1)  # cls row first
    up = interpolate_joint_pos_embed(joint, (4, 8, 8), (8, 16, 16), num_extra_tokens=1)
    assert up.shape == (1, 1 + 8 * 16 * 16, 6) and torch.equal(up[:, :1], joint[:, :1])
    back = interpolate_joint_pos_embed(up, (8, 16, 16), (4, 8, 8), num_extra_tokens=1)
    assert torch.allclose(back, joint, atol=0.1)  # amplitude ~3; linear resizing blurs the ends
    assert interpolate_spatial_pos_embed(spatial, (8, 8), (8, 8)) is spatial


# ---- pretrained weights --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sep_pos_embed", [True, False])
def test_pretrained_encoder_loads_into_classifier_leaving_out_the_decoder(sep_pos_embed):
    mae = tiny_mae(sep_pos_embed=sep_pos_embed)
    classifier = tiny_vit(sep_pos_embed=sep_pos_embed)
    pretrained = mae.state_dict()
    report = load_encoder_into_classifier(classifier, {"model": pretrained})  # the original's .pth layout
    assert report.unused_keys == sorted(k for k in pretrained if is_decoder_key(k))
    assert report.missing_keys == ["head.bias", "head.weight"] and report.interpolated_keys == []
    loaded = classifier.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in pretrained.items() if not is_decoder_key(k))


@pytest.mark.parametrize("sep_pos_embed", [True, False])
def test_pretrained_position_embeddings_are_resized_to_the_new_clip(sep_pos_embed):
    mae = tiny_mae(sep_pos_embed=sep_pos_embed)
    classifier = tiny_vit(sep_pos_embed=sep_pos_embed, num_frames=16, img_size=48)  # grid 8x6x6 instead of 4x4x4
    if not sep_pos_embed:  # a joint embedding alone cannot say how its 64 positions split into time and space
        with pytest.raises(ValueError, match="source_input_size"):
            load_encoder_into_classifier(classifier, mae.state_dict())
    report = load_encoder_into_classifier(classifier, mae.state_dict(), source_input_size=mae.input_size)
    assert report.interpolated_keys == (["pos_embed_spatial", "pos_embed_temporal"] if sep_pos_embed else ["pos_embed"])
    assert torch.equal(classifier.blocks[1].mlp.fc2.weight, mae.blocks[1].mlp.fc2.weight)
    assert classifier(clips(frames=16, size=48)).shape == (2, 5)


def test_pretrained_weights_of_another_model_size_are_refused_naming_the_keys():
    mae = tiny_mae()
    wider = VisionTransformer(patch_size=8, embed_dim=96, depth=2, num_heads=4, num_classes=5, **TINY)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.q\.weight: checkpoint \(64, 64\) vs model \(96, 96\)"):
        load_encoder_into_classifier(wider, mae.state_dict())
    deeper = VisionTransformer(patch_size=8, embed_dim=64, depth=3, num_heads=4, num_classes=5, **TINY)
    with pytest.raises(ValueError, match=r"missing keys: \['blocks\.2\.attn\.k\.bias'"):
        load_encoder_into_classifier(deeper, mae.state_dict())
    with pytest.raises(ValueError, match=r"unexpected keys: \['pos_embed'\]"):
        load_encoder_into_classifier(tiny_vit(), tiny_mae(sep_pos_embed=False).state_dict())


def test_checkpoint_files_load_from_safetensors_and_the_original_pth_format(tmp_path):
    weights = {k: v.clone() for k, v in tiny_mae().state_dict().items()}
    save_file(weights, str(tmp_path / "mae.safetensors"))
    torch.save({"model": weights, "epoch": 3, "args": argparse.Namespace(model="mae")}, tmp_path / "mae.pth")
    for name in ("mae.safetensors", "mae.pth"):
        loaded = load_checkpoint_file(tmp_path / name)
        assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], weights[k]) for k in weights)
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        load_checkpoint_file(tmp_path / "nothing.pth")


# ---- precision and memory ------------------------------------------------------------------------------------------


def test_bf16_autocast_forward_and_backward():
    mae, vit = tiny_mae(), tiny_vit()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, pred, _ = mae(clips())
        logits = vit(clips())
    assert pred.dtype == torch.bfloat16 and logits.dtype == torch.bfloat16
    assert torch.isfinite(loss) and torch.isfinite(logits).all()
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in mae.parameters())


def test_grad_checkpointing_gives_the_same_loss_and_gradients():
    def loss_and_grads(model, forward):
        model.zero_grad()
        torch.manual_seed(7)  # drop path draws random numbers; checkpointing must replay the same ones
        loss = forward(model)
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    noise = torch.rand(2, 64)
    forwards = {
        "mae": (tiny_mae, lambda m: m(clips(), noise=noise)[0]),
        "vit": (lambda **kw: tiny_vit(drop_path_rate=0.5, **kw).train(), lambda m: m(clips()).logsumexp(1).mean()),
    }
    for name, (build, forward) in forwards.items():
        plain_loss, plain_grads = loss_and_grads(build(), forward)
        ckpt_model = build(grad_checkpointing=True)
        ckpt_loss, ckpt_grads = loss_and_grads(ckpt_model, forward)
        assert ckpt_model.grad_checkpointing
        assert torch.allclose(plain_loss, ckpt_loss, rtol=1e-6), name
        for k in plain_grads:
            assert torch.allclose(plain_grads[k], ckpt_grads[k], rtol=1e-5, atol=1e-8), f"{name}: {k}"

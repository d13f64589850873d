"""Engine pieces: flags -> config, param groups, layer decay (and LayerScaledAdamW, once through real ZeRO-3 engines
on 2 CPU ranks), lr schedule, DeepSpeed JSON filling, checkpoint selection, pretrained-weight errors, the step
benchmarks on tiny models."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mae_st.config import ConfigError, OptimConfig, parse_job_config
from mae_st.engine.checkpoint import COMPLETE_MARKER, checkpoint_root, resolve_resume, tag_for
from mae_st.engine.ds_config import default_ds_config_path, fill_ds_config, load_ds_config
from mae_st.engine.optim import LayerScaledAdamW, build_param_groups, layer_id, layer_lr_scales
from mae_st.engine.schedule import apply_lr, base_lr, effective_batch, lr_at
from mae_st.models import create_model

PRETRAIN = ["--mode", "pretrain", "--model", "mae_vit_tiny_patch8", "--train_shards", "synthetic:8",
            "--num_frames", "8"]


def error_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse_job_config(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


# ---- flags -----------------------------------------------------------------------------------------------------

def test_original_flags_and_aliases_fill_the_config(caplog):
    cfg = parse_job_config(PRETRAIN + ["--batch_size", "3", "--input_size", "112", "--beta", "0.9", "0.99",
                                       "--num_checkpoint_del", "5", "--no_norm_pix_loss", "--num_workers", "8",
                                       "--pin_mem", "--dist_on_itp", "--clip_grad", "0.02", "--local_rank=1"])
    assert cfg.data.batch_size_per_gpu == 3 and cfg.data.img_size == 112
    assert cfg.optim.betas == (0.9, 0.99) and cfg.optim.clip_grad == 0.02
    assert cfg.run.keep_checkpoints == 5 and cfg.run.local_rank == 1
    assert cfg.model.norm_pix_loss is False
    assert "--num_workers is accepted for compatibility and ignored" in caplog.text


def test_finetune_mode_defaults_and_cls_token():
    cfg = parse_job_config(["--mode", "finetune", "--train_shards", "a", "--val_shards", "b", "--cls_token"])
    assert cfg.model.name == "vit_large_patch16" and cfg.optim.blr == 1e-3
    assert cfg.data.jitter_scales_relative == (0.08, 1.0) and cfg.model.global_pool is False


@pytest.mark.parametrize("argv, flag", [
    (PRETRAIN + ["--bogus"], "unrecognized arguments: --bogus"),
    (PRETRAIN + ["--mask_ratio", "1.0"], "--mask_ratio"),
    (PRETRAIN + ["--num_frames", "5"], "--num_frames 5 is not divisible by --t_patch_size 2"),
    (["--mode", "pretrain", "--model", "mae_vit_tiny_patch8"], "--train_shards is missing"),
    (["--mode", "pretrain", "--model", "vit_tiny_patch8", "--train_shards", "x"], "--model vit_tiny_patch8"),
    (["--mode", "finetune", "--model", "mae_vit_tiny_patch8", "--train_shards", "x", "--val_shards", "y"],
     "--model mae_vit_tiny_patch8"),
    (["--mode", "finetune", "--model", "vit_tiny_patch8", "--train_shards", "x"], "--val_shards is missing"),
    (PRETRAIN + ["--path_to_data_dir", "/videos"], "--path_to_data_dir"),
    (PRETRAIN + ["--pipelines_per_gpu", "-1"], "--pipelines_per_gpu -1"),
    (PRETRAIN + ["--augment_ahead", "-1"], "--augment_ahead -1"),
    (PRETRAIN + ["--decoder_threads", "0"], "--decoder_threads 0"),
    (PRETRAIN + ["--gil_switch_interval_ms", "0"], "--gil_switch_interval_ms 0"),
    (PRETRAIN + ["--compile_blocks", "yes"], "--compile_blocks"),
    (PRETRAIN + ["--pipeline_segment_batches", "0"], "--pipeline_segment_batches 0"),
    (PRETRAIN + ["--max_bad_sample_fraction", "1.5"], "--max_bad_sample_fraction 1.5"),
    (PRETRAIN + ["--decoder", "ffmpeg"], "--decoder"),
])
def test_bad_flags_give_one_error_line_naming_the_flag(capsys, argv, flag):
    line = error_line(capsys, argv)
    assert line.startswith("train.py: error:") and flag in line


# ---- optimizer groups, schedule --------------------------------------------------------------------------------

def group_of(groups, param):
    return next(g for g in groups if any(p is param for p in g["params"]))


def test_no_weight_decay_on_norms_biases_tokens_and_pos_embeds():
    model = create_model("mae_vit_tiny_patch8", img_size=32, num_frames=4, pred_t_dim=4)
    groups = build_param_groups(model, weight_decay=0.05)
    named = dict(model.named_parameters())
    for name in ("cls_token", "mask_token", "pos_embed_spatial", "pos_embed_temporal", "decoder_pos_embed_spatial",
                 "norm.weight", "blocks.0.norm1.weight", "blocks.0.attn.proj.bias", "decoder_embed.bias"):
        assert group_of(groups, named[name])["weight_decay"] == 0.0, name
    for name in ("blocks.0.attn.proj.weight", "patch_embed.proj.weight", "decoder_pred.weight"):
        assert group_of(groups, named[name])["weight_decay"] == 0.05, name
    assert sum(len(g["params"]) for g in groups) == len(named)
    assert {g["lr_scale"] for g in groups} == {1.0}
    with_bias_wd = build_param_groups(model, 0.05, bias_wd=True)
    assert group_of(with_bias_wd, named["decoder_embed.bias"])["weight_decay"] == 0.05
    assert group_of(with_bias_wd, named["norm.weight"])["weight_decay"] == 0.0


def test_layer_decay_scales_follow_depth():
    model = create_model("vit_tiny_patch8", img_size=32, num_frames=4, num_classes=5)  # 2 blocks -> 3 layers
    assert [layer_id(n, 3) for n in ("cls_token", "pos_embed_spatial", "patch_embed.proj.weight",
                                     "blocks.0.mlp.fc1.weight", "blocks.1.attn.proj.bias", "norm.weight",
                                     "head.weight")] == [0, 0, 0, 1, 2, 3, 3]
    groups = build_param_groups(model, 0.05, layer_decay=0.5)
    named = dict(model.named_parameters())
    expected = {"patch_embed.proj.weight": 0.125, "blocks.0.mlp.fc1.weight": 0.25, "blocks.1.mlp.fc1.weight": 0.5,
                "head.weight": 1.0, "norm.weight": 1.0}
    for name, scale in expected.items():
        assert group_of(groups, named[name])["lr_scale"] == scale, name


def test_schedule_warmup_peak_and_end():
    cfg = OptimConfig(epochs=10, warmup_epochs=2, blr=1.6e-3, min_lr=1e-6)
    eff = effective_batch(batch_size_per_gpu=4, repeat_aug=2, accum_iter=2, world_size=8)
    assert eff == 128
    peak = base_lr(cfg, eff)
    assert peak == pytest.approx(1.6e-3 * 128 / 256)
    assert lr_at(0.0, peak, cfg) == 0.0
    assert lr_at(1.0, peak, cfg) == pytest.approx(peak / 2)
    assert lr_at(2.0, peak, cfg) == pytest.approx(peak)
    assert lr_at(6.0, peak, cfg) == pytest.approx(1e-6 + (peak - 1e-6) * 0.5)
    assert lr_at(10.0, peak, cfg) == pytest.approx(1e-6)
    assert base_lr(dataclasses.replace(cfg, lr=0.01), eff) == 0.01


# ---- DeepSpeed JSON ------------------------------------------------------------------------------------------------

def test_ds_config_filled_from_flags():
    cfg = parse_job_config(PRETRAIN + ["--batch_size", "3", "--repeat_aug", "2", "--accum_iter", "4",
                                       "--clip_grad", "1.5", "--zero_stage", "2"])
    ds = fill_ds_config(load_ds_config(default_ds_config_path("pretrain")), cfg, world_size=2, bf16_supported=False)
    assert ds["train_micro_batch_size_per_gpu"] == 6 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 48 and ds["gradient_clipping"] == 1.5
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] is False
    gpu = fill_ds_config(load_ds_config(default_ds_config_path("pretrain")), cfg, world_size=2, bf16_supported=True)
    assert gpu["bf16"]["enabled"] is True


def test_ds_config_explicit_value_disagreeing_with_flags_is_an_error():
    cfg = parse_job_config(PRETRAIN + ["--batch_size", "3"])
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=8 disagrees with --batch_size_per_gpu"):
        fill_ds_config({"train_micro_batch_size_per_gpu": 8}, cfg, world_size=1, bf16_supported=False)
    agreeing = fill_ds_config({"train_micro_batch_size_per_gpu": 3}, cfg, world_size=1, bf16_supported=False)
    assert agreeing["train_micro_batch_size_per_gpu"] == 3
    with pytest.raises(ConfigError, match="remove 'optimizer'"):
        fill_ds_config({"optimizer": {"type": "Adam"}}, cfg, world_size=1, bf16_supported=False)


# ---- checkpoints ---------------------------------------------------------------------------------------------------

def test_resume_auto_picks_the_newest_complete_checkpoint(tmp_path):
    root = checkpoint_root(str(tmp_path))
    assert resolve_resume("auto", str(tmp_path)) is None
    for step, complete in ((4, True), (8, True), (12, False)):  # step 12: a save cut short by a kill
        (root / tag_for(step)).mkdir(parents=True)
        if complete:
            (root / tag_for(step) / COMPLETE_MARKER).write_text("{}")
    assert resolve_resume("auto", str(tmp_path)) == (root, tag_for(8))
    assert resolve_resume(str(root / tag_for(4)), str(tmp_path)) == (root, tag_for(4))
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_resume(str(root / tag_for(12)), str(tmp_path))


def test_mismatched_pretrained_weights_name_the_flag(tmp_path):
    import train

    small = create_model("mae_vit_small_patch16", img_size=32, num_frames=4, pred_t_dim=4)
    path = tmp_path / "small.safetensors"
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(path))
    tiny = create_model("vit_tiny_patch8", img_size=32, num_frames=4, num_classes=5)
    with pytest.raises(ConfigError, match=rf"--finetune {path}: pretrained weights do not fit"):
        train.load_pretrained(tiny, str(path))
    with pytest.raises(ConfigError, match="does not exist"):
        train.load_pretrained(tiny, str(tmp_path / "missing.safetensors"))


# ---- benchmarks built on the engine builder ------------------------------------------------------------------------

def run_benchmark(tmp_path, script: str, *args: str) -> dict:
    """Runs benchmarks/<script> on DeepSpeed's CPU accelerator (one rank, this interpreter); returns its JSON."""
    out = tmp_path / f"{script}.json"
    done = subprocess.run([sys.executable, f"benchmarks/{script}.py", *args, "--out", str(out)],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def test_gemm_alignment_arithmetic_is_what_a_real_zero3_engine_does(tmp_path):
    """The CPU part of the GPU script: ViT-H/14's GEMM weights all start 256-byte aligned on one GPU now, and the
    layout arithmetic behind that census agrees with the addresses of a real one-rank ZeRO-3 engine's weights."""
    report = run_benchmark(tmp_path, "gemm_alignment", "--sections", "layout,engine")
    now = [row for row in report["layout"] if row["layout"].endswith("(now)")]
    assert now and all(row["< 256 B"] == 0 for row in now)
    before = next(row for row in report["layout"] if row["model"] == "mae_vit_huge_patch14" and row["ranks"] == 1)
    assert before["< 16 B"] == before["GEMM weights"]  # what the H200 profile ran into
    assert all(row["arithmetic matches DeepSpeed"] for row in report["engine"])


def test_profile_step_suite_runs_end_to_end_on_tiny_models(tmp_path):
    """What the lead runs on the GPU, on tiny models, so a crash shows here first. The variants start from the same
    weights and masks in fp32, so their losses agree: packing, alignment and ZeRO stages change no math."""
    report = run_benchmark(tmp_path, "profile_step", "--tiny", "--suite", "issue16", "--steps", "1", "--warmup", "1",
                           "--profile_steps", "1")
    assert len(report["configs"]) == 4
    for config in report["configs"]:
        rows = {row["variant"]: row for row in config["rows"]}
        assert set(rows) == {"eager", "z3", "z3-layergroups", "z3-unaligned", "z3-autocast", "z3-nopack", "z0"}
        assert all("clips/s" in row and row["x eager"] > 0 for row in rows.values()), config
        for name in ("z3", "z3-layergroups", "z3-unaligned", "z3-nopack", "z0"):  # autocast rounds in bf16 on a CPU too
            assert rows[name]["loss"] == pytest.approx(rows["eager"]["loss"], rel=1e-4), (config["config"], name)


def test_profile_step_isolate_measures_each_variant_in_its_own_process(tmp_path):
    """--isolate (what host-bound GPU configurations need: a variant slows the ones after it in one process) runs
    each variant in a child and gathers its row: the same weights and masks give the same loss as in one process,
    the cProfile table shows DeepSpeed's Python in the ZeRO-3 step, the leaf-list A/B runs on the engine, and the
    phases are timed."""
    common = ("--tiny", "--mode", "pretrain", "--clips", "2", "--variants", "eager,z3", "--steps", "1", "--warmup",
              "1", "--profile_steps", "0")
    isolated = run_benchmark(tmp_path / "isolated", "profile_step", *common, "--isolate", "--python_profile_steps", "1",
                             "--leaf_lists_ab", "2", "--phase_steps", "1")
    together = run_benchmark(tmp_path / "together", "profile_step", *common)
    assert isolated["isolated"] and not together["isolated"]
    rows = {row["variant"]: row for row in isolated["configs"][0]["rows"]}
    assert set(rows) == {"eager", "z3"} and rows["z3"]["x eager"] > 0
    assert rows["z3"]["kept / walked"] > 0 and "kept / walked" not in rows["eager"]  # the A/B runs on engines only
    phases = {name: row["host ms/step"] for name, row in rows.items()}  # forward / backward / step, and the rest
    assert set(phases["z3"]) == {"forward", "backward", "step", "rest", "whole"} and "backward" not in phases["eager"]
    assert all(phases[name]["forward"] > 0 and rows[name]["synced ms/step"]["whole"] > 0 for name in rows)
    for row in together["configs"][0]["rows"]:
        assert rows[row["variant"]]["loss"] == pytest.approx(row["loss"], rel=1e-6), row["variant"]
    deepspeed_files = ("nvtx.py", "stage3.py", "partitioned_param_coordinator.py", "parameter_offload.py",
                       "partition_parameters.py")
    named = {name: [line for line in rows[name]["python hot spots"] if any(f in line for f in deepspeed_files)]
             for name in rows}
    assert named["z3"] and not named["eager"], named  # it sees the engine's Python, and only where it runs


# ---- layer-wise decay inside the optimizer ----------------------------------------------------------------------

def _train_a_few_steps(model, optimizer, steps: int = 4):
    inputs = torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    for step in range(steps):
        apply_lr(optimizer, 1e-3 * (step + 1))
        torch.nn.functional.cross_entropy(model(inputs), torch.tensor([1, 2])).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_layer_scaled_adamw_is_adamw_with_a_group_per_layer():
    """Two weight-decay groups with per-parameter scales update every parameter exactly as torch's fused AdamW
    with one group per (layer, decay) does; and the scales matter (without them the weights differ)."""
    torch.manual_seed(0)
    reference = create_model("vit_tiny_patch8", img_size=32, num_frames=4, num_classes=5).eval()
    scaled, unscaled = copy.deepcopy(reference), copy.deepcopy(reference)
    _train_a_few_steps(reference, torch.optim.AdamW(build_param_groups(reference, 0.05, 0.75), fused=True))
    optimizer = LayerScaledAdamW(build_param_groups(scaled, 0.05), layer_lr_scales(scaled, 0.75))
    assert len(optimizer.param_groups) == 2
    _train_a_few_steps(scaled, optimizer)
    _train_a_few_steps(unscaled, LayerScaledAdamW(build_param_groups(unscaled, 0.05), layer_lr_scales(unscaled, 1)))
    for (name, want), got in zip(reference.named_parameters(), scaled.parameters()):
        assert torch.equal(want, got), name
    assert not all(torch.equal(a, b) for a, b in zip(reference.parameters(), unscaled.parameters()))


def test_layer_scaled_adamw_scales_each_block_of_a_packed_stack_at_its_depth():
    """A packed stack's flat tensors hold every block: their lr scales are ranges, one per block, and the updates
    are those of one torch AdamW group per layer on the plain model."""
    from mae_st.engine.fused_params import fuse_block_parameters, pack_block_stacks, to_block_names
    from mae_st.engine.optim import weight_decay_rule

    torch.manual_seed(0)
    reference = create_model("vit_tiny_patch8", img_size=32, num_frames=4, num_classes=5).eval()
    stacked = copy.deepcopy(reference)
    fuse_block_parameters(stacked, weight_decay_rule(stacked))
    pack_block_stacks(stacked)
    scales = layer_lr_scales(stacked, 0.75)
    ranges = scales[stacked.blocks.fused_decay]
    assert [scale for _, _, scale in ranges] == [0.75 ** 2, 0.75]  # blocks 0 and 1 of two: layers 1 and 2 of 3
    _train_a_few_steps(reference, torch.optim.AdamW(build_param_groups(reference, 0.05, 0.75), fused=True))
    _train_a_few_steps(stacked, LayerScaledAdamW(build_param_groups(stacked, 0.05), scales))
    got = to_block_names(stacked, {name: p.detach() for name, p in stacked.named_parameters()})
    for name, want in reference.named_parameters():
        torch.testing.assert_close(got[name], want.detach(), rtol=1e-6, atol=1e-7, msg=name)


def test_a_partition_gets_the_scale_ranges_of_its_stretch_of_the_parameter():
    """ZeRO-3 gives rank r elements [r * n, (r + 1) * n) of each parameter; its scale ranges are cut to that
    stretch and moved to where the partition sits in the flat buffer; padding past the end is in none."""
    from mae_st.engine.zero import partition_scale_ranges

    ranges = [(0, 6, 0.5), (6, 4, 0.25)]  # a 10-element parameter over 3 ranks: partitions of 4
    assert partition_scale_ranges(ranges, 0, 4, at=100) == [(100, 4, 0.5)]
    assert partition_scale_ranges(ranges, 4, 4, at=100) == [(100, 2, 0.5), (102, 2, 0.25)]
    assert partition_scale_ranges(ranges, 8, 4, at=0) == [(0, 2, 0.25)]


def test_a_flat_tensor_bound_by_ranges_updates_like_its_parts():
    """What ZeRO-3 hands the optimizer: several parameters back to back in one flat tensor, with padding."""
    torch.manual_seed(0)
    parts = [torch.nn.Parameter(torch.randn(n)) for n in (5, 3, 4)]
    scales = {parts[0]: 0.5, parts[1]: 0.5, parts[2]: 0.25}
    flat = torch.nn.Parameter(torch.cat([p.detach() for p in parts] + [torch.zeros(4)]))
    separate = LayerScaledAdamW([{"params": parts, "weight_decay": 0.1}], scales)
    together = LayerScaledAdamW([{"params": [flat], "weight_decay": 0.1}], scales)
    together.bind_flat(flat, [(0, 5, 0.5), (5, 3, 0.5), (8, 4, 0.25)])
    for step in range(3):
        grads = [torch.randn(p.numel()) for p in parts]
        for p, g in zip(parts, grads):
            p.grad = g
        flat.grad = torch.cat(grads + [torch.zeros(4)])
        for optimizer in (separate, together):
            apply_lr(optimizer, 0.1)
            optimizer.step()
    assert torch.equal(flat.detach()[:12], torch.cat([p.detach() for p in parts]))
    assert torch.equal(flat.detach()[12:], torch.zeros(4))  # padding: zero gradient, zero weight
    with pytest.raises(KeyError, match="no lr scale"):
        LayerScaledAdamW([{"params": [flat]}], scales).step()


def two_rank_report(script: str, tmp_path: Path, port_offset: int) -> dict:
    """Runs `script` on 2 CPU ranks through the deepspeed launcher; returns the JSON report its rank 0 wrote."""
    from tests.test_train import ROOT, VENV_BIN, launch_env

    out = tmp_path / "report.json"
    port = str(29500 + (os.getpid() + port_offset) % 1000)
    done = subprocess.run([os.path.join(VENV_BIN, "deepspeed"), "--num_gpus", "2", "--master_port", port, script,
                           str(out)], cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def test_zero3_finetuning_with_scales_in_the_optimizer_matches_per_layer_groups(tmp_path):
    """Real ZeRO-3 engines on 2 CPU ranks (each parameter partitioned in halves): layer decay as scales bound to
    DeepSpeed's flat partitions gives the losses of one torch AdamW group per layer, with 2 groups instead of one
    per layer and weight-decay setting; ZeRO-0 keeps the per-layer groups (README)."""
    report = two_rank_report("tests/zero3_layer_decay.py", tmp_path, port_offset=7)
    groups, scales, walked, control, zero0 = (report[k] for k in ("layer groups", "scales in optimizer",
                                                                   "modules walked", "no layer decay", "zero 0"))
    assert walked["losses"] == scales["losses"]  # the kept lists fetch and release exactly what the walk does
    assert report["world size"] == 2
    assert (groups["optimizer"], scales["optimizer"], zero0["optimizer"]) == ("AdamW", "LayerScaledAdamW", "AdamW")
    assert scales["optimizer groups"] == 2 < groups["optimizer groups"] == zero0["optimizer groups"]
    assert scales["losses"] == pytest.approx(groups["losses"], rel=1e-5)
    assert zero0["losses"] == pytest.approx(groups["losses"], rel=1e-4)  # ZeRO-0 keeps one group per layer
    assert control["losses"][1:] != pytest.approx(groups["losses"][1:], rel=1e-5)  # the scales are in effect
    ours, theirs = report["clipped"], report["clipped, DeepSpeed's norm"]  # fp32 sums against fp64 copies
    assert ours["grad norms"] == pytest.approx(theirs["grad norms"], rel=1e-6)
    assert ours["losses"] == pytest.approx(theirs["losses"], rel=1e-6)
    assert ours["losses"][1:] != pytest.approx(scales["losses"][1:], rel=1e-5)  # the clip was in effect


def test_layer_scaled_adamw_resumes_from_its_state_dict():
    """A saved and reloaded optimizer continues exactly (torch's load_state_dict leaves a loaded `step` on the
    device it was saved from; the step moves it to its parameter's)."""
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch8", img_size=32, num_frames=4, num_classes=5).eval()
    twin = copy.deepcopy(model)
    first = LayerScaledAdamW(build_param_groups(model, 0.05), layer_lr_scales(model, 0.75))
    _train_a_few_steps(model, first, steps=2)
    twin.load_state_dict(model.state_dict())
    second = LayerScaledAdamW(build_param_groups(twin, 0.05), layer_lr_scales(twin, 0.75))
    second.load_state_dict(copy.deepcopy(first.state_dict()))  # as torch.save / torch.load hand it over
    _train_a_few_steps(model, first, steps=2)
    _train_a_few_steps(twin, second, steps=2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_a_nan_loss_on_one_zero3_rank_is_skipped_on_both_and_a_sigterm_stops_both_together(tmp_path):
    """README's promise for a NaN/inf loss, on real ZeRO-3 engines on 2 CPU ranks, rank 1's second batch NaN:
    the step is skipped and counted on every rank, and the next steps' losses are those of a run that never met
    the bad batch. train.py's ZeRO-3 default leaves the skip to the engine's gradient-norm check (no host sync
    before backward) and agrees on a SIGTERM of one rank a step later; the host check (other stages) at once. A
    SIGTERM during an evaluation is agreed on at the epoch's end, which saves and stops both ranks."""
    report = two_rank_report("tests/zero3_skip_and_stop.py", tmp_path, port_offset=13)
    assert report["world size"] == 2
    clean = report["without the bad batch"]["ranks"][0]["losses"]
    for way, first, stops_at in (("engine check", False, 3), ("host check", True, 2)):
        for rank in report[way]["ranks"]:
            assert rank["check_loss_first"] is first
            assert rank["skipped"] == 1
            losses = rank["losses"]
            assert math.isnan(losses[1]) and losses[:1] + losses[2:] == pytest.approx(clean, rel=1e-6), way
            assert rank["stopping"] == [False] * stops_at + [True] * (4 - stops_at), way
    # SIGTERMed during an evaluation: both ranks save the epoch at once (none was due) and stop
    assert report["stopped at the epoch's end"]["ranks"] == [{"stopped": True, "tags": ["step000000001"]}] * 2

"""Config tree, presets, dotted overrides and their one-line errors."""
import json

import pytest
import torch

from ibot_fast import UserError
from ibot_fast.config import (PRESETS, Config, all_keys, build_config, derived, from_dict,
                              to_dict)


def test_defaults_follow_the_design():
    cfg = Config()
    assert cfg.loss.student_temp == 0.1 and cfg.loss.warmup_teacher_temp_epochs == 30
    assert cfg.optim.clip_grad == 3.0 and cfg.optim.momentum_teacher == 0.996
    assert cfg.data.global_scale == (0.14, 1.0) and cfg.data.local_scale == (0.05, 0.4)
    assert cfg.masks.pred_ratio == (0.0, 0.3) and cfg.masks.pred_ratio_var == (0.0, 0.2)


def test_paper_presets():
    s = build_config("vit_small_16_paper", ["data.path=/x"])
    assert (s.model.arch, s.train.epochs, s.loss.teacher_temp) == ("vit_small", 800, 0.07)
    assert s.model.shared_head and not s.model.norm_last_layer and s.data.n_local == 10
    assert s.data.global_scale == (0.25, 1.0) and s.data.local_scale == (0.05, 0.25)
    assert build_config("vit_base_16_paper", ["data.path=/x"]).train.epochs == 400
    large = build_config("vit_large_16_paper", ["data.path=/x"])
    assert large.model.arch == "vit_large" and large.train.batch_size == 64
    assert large.train.parallel == "fsdp" and not large.train.fsdp_reshard_after_forward
    assert set(PRESETS) >= {"demo", "vit_small_16_paper", "vit_base_16_paper",
                            "vit_large_16_paper"}


def test_overrides_are_typed():
    cfg = build_config("demo", ["optim.lr=0.002", "model.shared_head=false",
                                "data.global_scale=0.3,1", "masks.pred_ratio=[0.1, 0.2]",
                                "masks.pred_ratio_var=0 0", "train.batch_size=7"])
    assert cfg.optim.lr == 0.002 and cfg.model.shared_head is False
    assert cfg.data.global_scale == (0.3, 1.0) and cfg.masks.pred_ratio == (0.1, 0.2)
    assert cfg.train.batch_size == 7


@pytest.mark.parametrize("overrides,message", [
    (["train.bach_size=3"], "unknown config key 'train.bach_size'; did you mean train.batch_size"),
    (["nokey"], "not of the form key=value"),
    (["train.batch_size=many"], "bad value for train.batch_size"),
    (["model.arch=vit_huge"], "model.arch='vit_huge' is not one of"),
    (["data.global_size=30"], "not a multiple of model.patch_size"),
    (["data.source=folder"], "--data PATH"),
    (["loss.centering=sinkhorn", "loss.fused_last_layer=true"], "needs loss.centering=center"),
    (["loss.centering=swav"], "loss.centering='swav' is not one of"),
    (["train.parallel=zero"], "train.parallel='zero' is not one of ddp, fsdp"),
])
def test_bad_overrides_are_one_line_errors(overrides, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(")) as e:
        build_config("demo", overrides)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("overrides,message", [
    (["loss.fused_last_layer=true"], "loss.fused_last_layer=true"),
    (["optim.fuse_ema=true"], "optim.fuse_ema=true"),
    (["optim.name=apex_lamb"], "optim.name=apex_lamb"),
    (["train.precision=fp16"], "train.precision=fp16"),
    (["model.residual_fp32=true", "train.precision=bf16"], "model.residual_fp32=true"),
])
def test_what_fsdp_refuses_is_a_one_line_error(overrides, message):
    """Checked when the trainer shards (several processes): in one process `fsdp` shards
    nothing and these keys work."""
    from ibot_fast.fsdp import check_config

    cfg = build_config("demo", ["train.parallel=fsdp", *overrides])  # valid as a config
    with pytest.raises(UserError, match="train.parallel=fsdp does not combine with " +
                       message.replace("[", r"\[")) as e:
        check_config(cfg, cfg.train.precision, torch.device("cpu"), world_size=2)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("size,world", [(3, 4), (8, 4)])
def test_an_fsdp_shard_size_must_divide_the_processes(size, world):
    from ibot_fast.fsdp import check_config

    cfg = build_config("demo", ["train.parallel=fsdp", f"train.fsdp_shard_size={size}"])
    with pytest.raises(UserError, match=f"train.fsdp_shard_size={size} must divide the "
                       f"{world} processes"):
        check_config(cfg, "fp32", torch.device("cpu"), world_size=world)
    for good in (0, 1, 2, 4):
        check_config(build_config("demo", ["train.parallel=fsdp",
                                           f"train.fsdp_shard_size={good}"]), "fp32",
                     torch.device("cpu"), world_size=world)
    with pytest.raises(UserError, match="train.fsdp_shard_size is for train.parallel=fsdp"):
        build_config("demo", ["train.fsdp_shard_size=2"])
    with pytest.raises(UserError, match="train.fsdp_shard_size must be >= 0"):
        build_config("demo", ["train.parallel=fsdp", "train.fsdp_shard_size=-1"])


def test_unknown_preset():
    with pytest.raises(UserError, match="unknown preset 'vit_s'; choose one of: demo"):
        build_config("vit_s")


def test_lr_scaling_lives_in_derived():
    cfg = build_config("demo", ["train.batch_size=64", "optim.lr=0.0005"])
    d = derived(cfg, world_size=8)
    assert d["global_batch"] == 512 and d["lr"] == pytest.approx(0.001)
    assert d["n_patches"] == 64 and d["n_local_patches"] == 16


def test_round_trip_through_dict():
    cfg = build_config("demo", ["optim.lr=0.003"])
    again = from_dict(json.loads(json.dumps(to_dict(cfg))))
    assert again == cfg
    # a checkpoint of an earlier version: keys since removed are skipped, others are errors
    saved = to_dict(cfg)
    saved["masks"]["max_masked_fraction"] = 0.5
    assert from_dict(saved) == cfg
    saved["masks"]["no_such_key"] = 1
    with pytest.raises(UserError, match="masks.no_such_key"):
        from_dict(saved)
    assert len(all_keys()) == len(set(all_keys())) > 60

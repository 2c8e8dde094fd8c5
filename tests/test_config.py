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
    p = cfg.model.patch_size
    assert d["n_patches"] == (32 // p) ** 2 and d["n_local_patches"] == (16 // p) ** 2


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


# -- YAML files ---------------------------------------------------------------------------

def keys_yaml(capsys, *argv) -> str:
    from ibot_fast.cli import main

    assert main(["keys", *argv, "--yaml"]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("preset", list(PRESETS))
def test_keys_yaml_reads_back_to_the_same_config(tmp_path, capsys, preset):
    """`ibot-fast keys --preset P --yaml` -> `--config` -> the preset's config, every key
    commented, tuples as YAML lists."""
    text = keys_yaml(capsys, "--preset", preset)
    path = tmp_path / "c.yaml"
    path.write_text(text)
    expected = build_config(preset, need_data=False)
    assert build_config(config_file=path, need_data=False) == expected
    entries = [line for line in text.splitlines() if line.startswith("  ")]
    assert len(entries) == len(all_keys()) and all("  # " in line for line in entries)
    assert f"global_scale: {list(expected.data.global_scale)}" in text
    # the file read back and written again is the same file, but for the command line
    again = keys_yaml(capsys, "--config", str(path))
    assert again.splitlines()[1:] == text.splitlines()[1:]


def test_every_key_has_a_comment():
    from ibot_fast.config import key_comments

    comments = key_comments()
    assert list(comments) == all_keys() and all(comments.values())
    assert comments["train.tensorboard"].startswith("also write the log to TensorBoard")


@pytest.mark.shipped_demo
def test_precedence_defaults_preset_file_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("# a subset of the keys\n"
                    "train:\n  batch_size: 16\n  epochs: 3\n"
                    "optim:\n  lr: 1e-4\n  betas: [0.8, 0.9]\n"
                    "eval:\n  knn_k: [5]\n"
                    "loss:\n")
    cfg = build_config("demo", ["train.epochs=2"], config_file=path)
    assert cfg.train.epochs == 2  # command line > file
    assert cfg.train.batch_size == 16 and cfg.optim.lr == 1e-4  # file > preset (32, 2e-3)
    assert cfg.optim.betas == (0.8, 0.9) and cfg.eval.knn_k == (5,)
    assert cfg.data.n_local == 0  # preset > default (10)
    assert cfg.optim.weight_decay == 0.04  # default
    assert build_config(config_file=path).data.n_local == 10  # no preset: the default


@pytest.mark.parametrize("text,message", [
    ("train:\n  bach_size: 3\n",
     "c.yaml: unknown config key 'train.bach_size'; did you mean train.batch_size"),
    ("trian:\n  batch_size: 3\n", "c.yaml: unknown config section 'trian'; did you mean train?"),
    ("train.batch_size: 3\n", "c.yaml: write train.batch_size nested, as 'batch_size:' under"),
    ("train:\n  batch_size: many\n", "c.yaml: train.batch_size must be an integer, got 'many'"),
    ("train:\n  batch_size: 3.5\n", "c.yaml: train.batch_size must be an integer, got 3.5"),
    ("train:\n  compile: 1\n", "c.yaml: train.compile must be auto, true or false, got 1"),
    ("train:\n  tensorboard: 1\n", "c.yaml: train.tensorboard must be true or false, got 1"),
    ("optim:\n  lr: fast\n", "c.yaml: optim.lr must be a number, got 'fast'"),
    ("optim:\n  lr: true\n", "c.yaml: optim.lr must be a number, got True"),
    ("data:\n  global_scale: 0.3\n", "c.yaml: data.global_scale must be a list of numbers, "
     "e.g. [0.14, 1.0], got 0.3"),
    ("eval:\n  knn_k: [10, 2.5]\n", "c.yaml: eval.knn_k must be a list of integers"),
    ("model:\n  arch: 3\n", "c.yaml: model.arch must be a string, got 3"),
    ("model: vit_small\n", "c.yaml: section 'model' must hold keys"),
    ("- train\n", "c.yaml: expected sections (model, data, masks"),
    ("train:\n  batch_size: [\n", "c.yaml is not valid YAML at line 3"),
    ("model:\n  arch: vit_huge\n", "model.arch='vit_huge' is not one of"),  # validated
])
def test_bad_yaml_is_a_one_line_error_naming_key_and_file(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as e:
        build_config("demo", config_file=path)
    assert message in str(e.value) and "\n" not in str(e.value)
    if "must be" in message or "unknown config key" in message:
        assert str(e.value).startswith(f"{path}: ")


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="cannot read config file .*nope.yaml"):
        build_config(config_file=tmp_path / "nope.yaml")


def test_config_flag_where_a_preset_is_accepted(tmp_path, capsys):
    """train, keys and the evaluation commands take --config (after --preset)."""
    import argparse

    from ibot_fast.cli import main
    from ibot_fast.eval.knn import add_backbone_args, backbone_from_args
    from ibot_fast.train import config_from_args, parse_args

    path = tmp_path / "c.yaml"
    path.write_text("train:\n  batch_size: 16\nmodel:\n  head_layers: 2\n")
    cfg = config_from_args(parse_args(["--preset", "demo", "--config", str(path),
                                       "--output-dir", "x", "train.epochs=2"]))
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.train.output_dir) == (16, 2, "x")

    assert main(["keys", "--preset", "demo", "--config", str(path), "optim.lr=0.1"]) == 0
    out = capsys.readouterr().out
    assert "train.batch_size=16\n" in out and "optim.lr=0.1\n" in out

    p = argparse.ArgumentParser()
    add_backbone_args(p, "evaluate")
    p.add_argument("overrides", nargs="*")
    cfg, backbone, _ = backbone_from_args(
        p.parse_args(["--random-init", "--config", str(path)]), "knn")
    assert cfg.model.head_layers == 2 and cfg.model.arch == "vit_demo"
    with pytest.raises(UserError, match="--config is for --random-init"):
        backbone_from_args(p.parse_args(["--checkpoint", "c.pth", "--config", str(path)]),
                           "knn")

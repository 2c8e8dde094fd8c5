"""Regional compilation (ibot_fast/compiling.py) and the automatic choices at start.

Inductor compiles C++ kernels on the CPU here: each compiled test costs tens of seconds,
so the compiled run below checks several things at once. The kernels' torch twins stand
in for Triton (Dynamo cannot trace the Triton interpreter)."""
import logging

import pytest
import torch
from torch._dynamo.utils import counters

from ibot_fast import UserError, compiling
from ibot_fast.config import build_config, from_dict, to_dict
from ibot_fast.train import Trainer

from test_train import tiny_config


def test_compile_setting_resolves_per_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compiling.resolve_compile("auto", cuda) == (True, "auto: CUDA device")
    assert compiling.resolve_compile("auto", cpu)[0] is False
    assert compiling.resolve_compile("true", cpu) == (True, "configured")
    assert compiling.resolve_compile("false", cuda) == (False, "configured")


def test_compile_key_takes_auto_true_false():
    assert build_config().train.compile == "auto"
    for text, value in (("1", "true"), ("True", "true"), ("on", "true"), ("no", "false"),
                        ("AUTO", "auto")):
        assert build_config(None, [f"train.compile={text}"]).train.compile == value
    with pytest.raises(UserError, match="train.compile: expected auto, true or false"):
        build_config(None, ["train.compile=sometimes"])
    saved = to_dict(build_config())
    saved["train"]["compile"] = True  # a checkpoint's config from when the key was a bool
    assert from_dict(saved).train.compile == "true"


def test_data_pipeline_resolves_per_device(monkeypatch, caplog):
    import ibot_fast.data as data

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with caplog.at_level(logging.INFO, logger="ibot_fast"):
        monkeypatch.setattr(data, "dali_importable", lambda: True)
        assert data.resolve_pipeline("auto", cuda) == "dali"
        assert data.resolve_pipeline("auto", cpu) == "cpu"
        assert data.resolve_pipeline("cpu", cuda) == "cpu"
        monkeypatch.setattr(data, "dali_importable", lambda: False)
        assert data.resolve_pipeline("auto", cuda) == "cpu"
        with pytest.raises(UserError, match="data.pipeline=dali needs NVIDIA DALI"):
            data.resolve_pipeline("dali", cuda)
    assert "data.pipeline: dali (auto: DALI imports and a GPU is present)" in caplog.text
    assert "data.pipeline: cpu (auto: DALI does not import" in caplog.text
    assert build_config().data.pipeline == "auto"


def test_presets_pick_the_fast_configuration_and_name_the_dinov2_variant():
    for model in ("vit_small_16", "vit_base_16", "vit_large_16"):
        paper = build_config(f"{model}_paper", ["data.path=/x"])
        assert paper.train.impl == "fast" and paper.train.compile == "auto"
        assert paper.data.pipeline == "auto" and paper.model.attention == "auto"
        # what changes the computation stays off in the paper presets ...
        assert (paper.masks.sampler, paper.loss.center2_from, paper.loss.centering,
                paper.loss.koleo_weight) == ("iid", "all", "center", 0.0)
        assert paper.model.layernorm_fp32 and not paper.model.efficient_drop_path
        # ... and the DINOv2-style preset collects it
        variant = build_config(f"{model}_dinov2style", ["data.path=/x"])
        assert (variant.masks.sampler, variant.loss.center2_from) == ("stratified", "masked")
        assert variant.model.pack_crops and variant.model.efficient_drop_path
        assert not variant.model.layernorm_fp32
        assert variant.model.arch == paper.model.arch and variant.train.epochs == paper.train.epochs
    # the fused AdamW + EMA pass needs flat buffers, which FSDP (ViT-L's) cannot give
    assert build_config("vit_base_16_paper", ["data.path=/x"]).optim.fuse_ema
    assert not build_config("vit_large_16_paper", ["data.path=/x"]).optim.fuse_ema


def test_automatic_choices_are_logged_with_their_reasons(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="ibot_fast"):
        Trainer(tiny_config(tmp_path, impl="fast")).close()
    assert "train.compile: off (auto: eager on cpu" in caplog.text
    assert "data.pipeline: cpu (auto:" in caplog.text
    assert "train.precision: fp32 (auto:" in caplog.text
    assert "attention backend: sdpa (CPU:" in caplog.text


def step_result(trainer, batch):
    losses = trainer.train_step(batch, 1, 0)
    grads = {n: p.grad.detach().clone() for n, p in
             trainer.student_module.named_parameters() if p.grad is not None}
    return float(losses["loss"].detach()), grads


def test_compiled_run_equals_eager_and_recompiles_nothing_after_its_first_steps(
        tmp_path, twins):
    """One compiled block reused by every block (student and teacher): a step equals the
    eager step (loss and every student gradient, fp32 reordering); a multi-epoch run
    across epoch ends, a k-NN, a checkpoint and a resume compiles a few graphs in its
    first steps and none after; no graph breaks."""
    options = ("optim.freeze_last_layer=0", "model.drop_path_rate=0", "optim.clip_grad=0")
    eager = Trainer(tiny_config(tmp_path / "eager", *options, impl="fast"))
    eager.loader.set_epoch(0)
    batch = next(iter(eager.loader))
    eager.close()

    counters.clear()
    compiled = Trainer(tiny_config(tmp_path / "compiled", *options, "train.compile=true",
                                   impl="fast"))
    assert compiled.compiled
    blocks = compiled.student_module.backbone.blocks
    assert compiled.student_module.backbone.block_runner is \
        compiled.teacher.backbone.block_runner  # one compiled function for both
    loss_e, grads_e = step_result(eager, batch)
    loss_c, grads_c = step_result(compiled, batch)
    compiled.close()
    assert loss_c == pytest.approx(loss_e, rel=1e-5)
    assert grads_c.keys() == grads_e.keys() and len(grads_e) > 10
    for name, g in grads_e.items():
        assert (grads_c[name] - g).norm() <= 1e-4 * g.norm() + 1e-12, name
    assert counters["stats"]["unique_graphs"] >= 1

    # a run with stochastic depth (the blocks' rates differ), the k-NN every epoch, a
    # stop after 5 steps (3 per epoch) and a resume to the end of the third epoch
    run_dir = tmp_path / "run"
    first = Trainer(tiny_config(run_dir, "train.compile=true", "train.stop_at_iter=5",
                                "eval.knn_every=1", impl="fast"))
    assert len(blocks) == len(first.student_module.backbone.blocks) > 2
    first.loader.set_epoch(0)
    first.run()
    after_first_run = counters["stats"]["unique_graphs"]
    resumed = Trainer(tiny_config(run_dir, "train.compile=true", "eval.knn_every=1",
                                  impl="fast"), "auto")
    resumed.run()
    assert resumed.iteration == 9
    assert counters["stats"]["unique_graphs"] == after_first_run
    # global and local crops, the first block (no stochastic depth), the teacher: a few
    # graphs for the whole run, not one per block
    assert after_first_run <= 6, dict(counters["stats"])
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    state = torch.load(run_dir / "checkpoint.pth", weights_only=False)
    assert not any("_orig_mod" in k for k in state["student"])


def test_a_compiler_that_fails_at_start_leaves_the_run_eager(tmp_path, monkeypatch,
                                                              caplog):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(compiling, "BACKEND", broken_backend)
    with caplog.at_level(logging.WARNING, logger="ibot_fast"):
        trainer = Trainer(tiny_config(tmp_path, "train.compile=true", "train.stop_at_iter=2",
                                      impl="fast"))
    assert not trainer.compiled
    assert trainer.student_module.backbone.block_runner is compiling.run_block
    warnings = [r for r in caplog.records if "train.compile" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    assert "no C++ compiler here" in warnings[0].getMessage()
    assert "goes on eagerly" in warnings[0].getMessage()
    assert trainer.run()["iteration"] == 2

"""model.init_from: a new run from pre-trained weights in each format it reads."""
import argparse
import logging

import pytest
import torch

from ibot_fast import UserError
from ibot_fast.config import build_config
from ibot_fast.export import export
from ibot_fast.models import backbone_state_dict
from ibot_fast.models.vit import resize_pos_embed
from ibot_fast.train import Trainer


def tiny(tmp_path, *extra, impl="fast"):
    return build_config("demo", [
        "model.patch_size=4", "data.source=synthetic", "data.synthetic_size=16",
        "data.num_workers=0", "data.n_local=2", "train.batch_size=8", "model.out_dim=128", "model.patch_out_dim=128",
        "model.head_hidden_dim=64", "model.head_bottleneck_dim=32", f"train.impl={impl}",
        f"train.output_dir={tmp_path}", *extra])


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A saved run whose teacher, student and fresh networks all differ (random weights
    drawn into each, the mask token included), at iteration 7."""
    out = tmp_path_factory.mktemp("source")
    trainer = Trainer(tiny(out))
    trainer.close()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for net in (trainer.student_module, trainer.teacher):
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    trainer.iteration = 7
    trainer.save()
    return out, {"teacher": _copy(trainer.teacher), "student": _copy(trainer.student_module)}


def _copy(net) -> dict:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def assert_state(net, expected: dict, keys=None) -> None:
    state = net.state_dict()
    for key in keys or expected:
        assert torch.equal(state[key], expected[key]), key


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_starts_from_an_ibot_fast_checkpoint(tmp_path, source, which, caplog):
    """Student and teacher both start from the chosen network (backbone and head); the
    run itself is new: iteration 0, a fresh optimizer. Fast path: the weights reach the
    flat buffers too."""
    out, nets = source
    with caplog.at_level(logging.INFO):
        run = Trainer(tiny(tmp_path, f"model.init_from={out / 'checkpoint.pth'}",
                           f"model.init_which={which}"))
    run.close()
    assert run.iteration == 0 and not run.optimizer.state
    assert_state(run.student_module, nets[which])
    assert_state(run.teacher, nets[which])
    for name, p in run.student_module.named_parameters():  # views into the flat buffers
        assert torch.equal(p, nets[which][name]), name
    assert f"the {which} of a training checkpoint" in caplog.text


def test_a_resumed_run_does_not_read_the_weights_again(tmp_path, source):
    """The run's own checkpoint holds everything; the weights it started from may have
    moved since."""
    out, nets = source
    weights = tmp_path / "weights.pth"
    weights.write_bytes((out / "checkpoint.pth").read_bytes())
    run = Trainer(tiny(tmp_path / "run", f"model.init_from={weights}", "train.stop_at_iter=1"))
    run.run()
    trained = _copy(run.student_module)
    weights.unlink()
    resumed = Trainer(tiny(tmp_path / "run", f"model.init_from={weights}"), "auto")
    resumed.close()
    assert resumed.iteration == 1
    assert_state(resumed.student_module, trained)


def test_starts_from_the_official_training_checkpoint(tmp_path, source, caplog):
    """The official iBOT layout: a DDP-wrapped student ('module.'), the mask token named
    `masked_embed` and present in the student only (the official teacher is built
    without one: the loaded teacher takes the student's), an argparse Namespace beside
    the networks."""
    out, nets = source

    def official(state, prefix, with_mask_token):
        return {prefix + k.replace("backbone.mask_token", "backbone.masked_embed"): v
                for k, v in state.items() if with_mask_token or "mask_token" not in k}
    path = tmp_path / "checkpoint.pth"
    torch.save({"student": official(nets["student"], "module.", True),
                "teacher": official(nets["teacher"], "", False), "optimizer": {}, "epoch": 3,
                "args": argparse.Namespace(arch="vit_small", out_dim=128)}, path)
    for which in ("teacher", "student"):
        with caplog.at_level(logging.INFO):
            run = Trainer(tiny(tmp_path / which, f"model.init_from={path}",
                               f"model.init_which={which}"))
        run.close()
        expected = dict(nets[which], **{"backbone.mask_token":
                                        nets["student"]["backbone.mask_token"]})
        assert_state(run.student_module, expected)
        assert_state(run.teacher, expected)
    assert "the mask token is the student's (the teacher has none)" in caplog.text


def test_a_head_extracted_beside_the_backbone(tmp_path, source):
    """The official extract_backbone_weights.py --with_head: {'state_dict': backbone keys
    and head.* keys} loads both."""
    out, nets = source
    state = backbone_state_dict(nets["teacher"])
    state.update({k: v for k, v in nets["teacher"].items() if k.startswith("head.")})
    path = tmp_path / "with_head.pth"
    torch.save({"state_dict": state}, path)
    run = Trainer(tiny(tmp_path / "run", f"model.init_from={path}"))
    run.close()
    assert_state(run.student_module, nets["teacher"])


def test_a_backbone_alone_keeps_a_fresh_head(tmp_path, source, caplog):
    """The official `checkpoint_teacher.pth` ({'state_dict': backbone}): the backbone is
    loaded, the head is the one a run without init_from starts with."""
    out, nets = source
    backbone = backbone_state_dict(nets["teacher"])
    backbone["masked_embed"] = backbone.pop("mask_token")
    path = tmp_path / "checkpoint_teacher.pth"
    torch.save({"state_dict": backbone}, path)
    with caplog.at_level(logging.INFO):
        run = Trainer(tiny(tmp_path / "a", f"model.init_from={path}"))
    fresh = Trainer(tiny(tmp_path / "b"))
    run.close()
    fresh.close()
    assert_state(run.student_module, nets["teacher"],
                 [k for k in nets["teacher"] if k.startswith("backbone.")])
    head = {k: v for k, v in fresh.student_module.state_dict().items() if k.startswith("head.")}
    assert_state(run.student_module, head)
    assert_state(run.teacher, run.student_module.state_dict())
    assert "head not loaded (the file has no head): it starts fresh" in caplog.text


def test_a_dino_backbone_for_another_grid_with_a_timm_classifier(tmp_path, source, caplog):
    """A bare backbone state dict (DINO's releases, timm's with a classifier `head.*`),
    without a mask token, trained at 32 px and loaded into a 48 px run: the position
    embeddings are resized, the mask token starts at zero."""
    out, nets = source
    backbone = backbone_state_dict(nets["teacher"])
    del backbone["mask_token"]
    backbone["head.weight"], backbone["head.bias"] = torch.randn(10, 128), torch.randn(10)
    path = tmp_path / "dino.pth"
    torch.save(backbone, path)
    with caplog.at_level(logging.INFO):
        run = Trainer(tiny(tmp_path / "run", f"model.init_from={path}", "data.global_size=48",
                           "data.local_size=24"))
    run.close()
    state = run.student_module.backbone.state_dict()
    assert state["pos_embed"].shape[1] == 1 + 12 * 12
    torch.testing.assert_close(state["pos_embed"], resize_pos_embed(backbone["pos_embed"],
                                                                    12, 12))
    assert torch.count_nonzero(state["mask_token"]) == 0
    assert torch.equal(state["blocks.0.attn.qkv.weight"], backbone["blocks.0.attn.qkv.weight"])
    assert "resized from 64 to 12x12 patches" in caplog.text
    assert "no mask token in the file" in caplog.text


def test_an_exported_file_round_trips(tmp_path, source):
    """ibot-fast export's safetensors file (its suffix in any case)."""
    out, nets = source
    exported, _ = export(out / "checkpoint.pth", tmp_path / "vit.safetensors")
    exported = exported.rename(tmp_path / "vit.SafeTensors")
    run = Trainer(tiny(tmp_path / "run", f"model.init_from={exported}"))
    run.close()
    keys = [k for k in nets["teacher"] if k.startswith("backbone.") and "mask_token" not in k]
    assert_state(run.student_module, nets["teacher"], keys)
    assert_state(run.teacher, nets["teacher"], keys)


def test_a_separate_patch_head_and_a_frozen_scale(tmp_path, caplog):
    """shared_head=false: each last layer gets its own weights from the file.
    norm_last_layer=true: the file's trained scale g is set to 1 (and stays frozen)."""
    source_dir = tmp_path / "source"
    trainer = Trainer(tiny(source_dir, "model.shared_head=false"))
    trainer.close()
    with torch.no_grad():
        for p in trainer.teacher.parameters():
            p.add_(torch.rand_like(p))
    trainer.save()
    nets = _copy(trainer.teacher)
    assert not nets["head.last_layer.weight_v"].equal(nets["head.last_layer2.weight_v"])
    ckpt = source_dir / "checkpoint.pth"
    run = Trainer(tiny(tmp_path / "a", f"model.init_from={ckpt}", "model.shared_head=false"))
    run.close()
    assert_state(run.student_module, nets)
    with caplog.at_level(logging.INFO):
        run = Trainer(tiny(tmp_path / "b", f"model.init_from={ckpt}", "model.shared_head=false",
                           "model.norm_last_layer=true"))
    run.close()
    for layer in (run.student_module.head.last_layer, run.student_module.head.last_layer2):
        assert torch.all(layer.weight_g == 1) and not layer.weight_g.requires_grad
    assert_state(run.student_module, nets, ["head.last_layer.weight_v",
                                            "head.last_layer2.weight_v"])
    assert "the last layer's scale g set to 1 (model.norm_last_layer=true)" in caplog.text


def test_a_head_of_other_sizes_starts_fresh(tmp_path, source, caplog):
    out, nets = source
    with caplog.at_level(logging.INFO):
        run = Trainer(tiny(tmp_path, f"model.init_from={out / 'checkpoint.pth'}",
                           "model.out_dim=96", "model.patch_out_dim=96"))
    run.close()
    assert_state(run.student_module, nets["teacher"],
                 [k for k in nets["teacher"] if k.startswith("backbone.")])
    assert "head last_layer.weight_v is (128, 32) in the file, (96, 32) here" in caplog.text


def test_a_shared_head_takes_the_cls_layer(tmp_path, source):
    """Loading a head with two last layers into a shared one: both names are one tensor
    here, and it takes the CLS layer's weights; a DINO head has only that one."""
    out, nets = source
    state = dict(nets["teacher"])
    for part in ("weight_g", "weight_v"):
        state[f"head.last_layer2.{part}"] = state[f"head.last_layer.{part}"] + 1.0
    path = tmp_path / "two_heads.pth"
    torch.save({"teacher": state}, path)
    run = Trainer(tiny(tmp_path / "run", f"model.init_from={path}"))
    run.close()
    head = run.student_module.head
    assert head.last_layer2 is head.last_layer
    assert torch.equal(head.last_layer.weight_v, nets["teacher"]["head.last_layer.weight_v"])

    # a DINO head (one last layer, no last_layer2) loads into a shared head
    dino = {k: v for k, v in nets["teacher"].items() if "last_layer2" not in k}
    torch.save({"teacher": dino}, path)
    run = Trainer(tiny(tmp_path / "dino", f"model.init_from={path}"))
    run.close()
    assert_state(run.student_module, nets["teacher"])


def _demo_backbone(**changes) -> dict:
    from ibot_fast.models import build_backbone

    state = build_backbone(build_config("demo", ["model.patch_size=4"])).state_dict()
    state.update(changes)
    return state


@pytest.mark.parametrize("make,message", [
    (None, "no such file"),
    (lambda p: torch.save([1, 2], p), "holds a list, not weights"),
    (lambda p: torch.save({"args": argparse.Namespace()}, p), "holds no tensors"),
    ("vit_small", "the backbone does not fit this model (check model.arch and "
                  "model.patch_size): shapes differ: cls_token (1, 1, 384) vs (1, 1, 128)"),
    # DeiT-3 style: no CLS row in the position embeddings (64 = 8 x 8 patches only)
    (lambda p: torch.save(_demo_backbone(pos_embed=torch.randn(1, 64, 128)), p),
     "position embeddings must be a CLS row and a square grid): shapes differ: pos_embed"),
    (lambda p: torch.save(_demo_backbone(**{"blocks.0.ls1.gamma": torch.ones(128)}), p),
     "layer scale and register tokens (DINOv2) are not part of this ViT): not in this "
     "model: blocks.0.ls1.gamma"),
    (lambda p: p.write_bytes(b"not safetensors"), "cannot be read as safetensors"),
])
def test_bad_files_are_one_line_errors(tmp_path, make, message):
    path = tmp_path / ("weights.safetensors" if "safetensors" in message else "weights.pth")
    if make == "vit_small":
        from ibot_fast.models import build_backbone
        torch.save(build_backbone(build_config("vit_small_16_paper", ["data.source=synthetic"]))
                   .state_dict(), path)
    elif make is not None:
        make(path)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        Trainer(tiny(tmp_path / "run", f"model.init_from={path}"))
    assert "\n" not in str(e.value)


def test_init_which_is_checked(tmp_path):
    with pytest.raises(UserError, match="model.init_which='ema' is not one of teacher"):
        tiny(tmp_path, "model.init_which=ema")

"""export: timm's parameter names and shapes, and the same features after a round trip.

timm itself does not import beside the CPU torch of the project's environment (PyPI's
torchvision wheel is built against CUDA torch). The names are therefore checked against
timm's published VisionTransformer layout, written out below from timm's definitions of
vit_{small,base,large}_patch16_224 (num_classes=0: no head), and the weights are loaded
back into ibot_fast's own ViT through the inverse mapping. With IBOT_FAST_TIMM_PYTHON
pointing at a Python that has timm (e.g. a scratch venv with PyPI's torch, torchvision and
timm), `test_timm_loads_the_export` also loads the files into timm and compares features.
"""
import json
import os
import subprocess
import textwrap

import pytest
import torch
from safetensors import safe_open

from ibot_fast import UserError, checkpoint
from ibot_fast.config import build_config, to_dict
from ibot_fast.export import (cmd_export, export, from_timm_state_dict, load_exported,
                              to_timm_name, to_timm_state_dict)
from ibot_fast.models import build_backbone

TIMM_PYTHON = os.environ.get("IBOT_FAST_TIMM_PYTHON")


def timm_published_shapes(dim, depth, patch=16, img=224):
    """timm's VisionTransformer state dict (class token, learned pos embed incl. the class
    token, qkv bias, MLP ratio 4, no head) as timm names it."""
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, 1 + (img // patch) ** 2, dim),
              "patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,)}
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
            b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
            b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
            b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
            b + "mlp.fc1.weight": (4 * dim, dim), b + "mlp.fc1.bias": (4 * dim,),
            b + "mlp.fc2.weight": (dim, 4 * dim), b + "mlp.fc2.bias": (dim,)})
    shapes.update({"norm.weight": (dim,), "norm.bias": (dim,)})
    return shapes


def save_checkpoint(path, cfg, backbone):
    """A checkpoint in the trainer's format holding this backbone as teacher and student."""
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    checkpoint.save(path, {"config": to_dict(cfg), "teacher": state, "student": state,
                           "epoch": 3, "iteration": 42})
    return path


@pytest.mark.parametrize("preset, dim, depth, n_keys", [
    ("vit_small_16_paper", 384, 12, 150), ("vit_base_16_paper", 768, 12, 150),
    ("vit_large_16_paper", 1024, 24, 294)])
def test_names_and_shapes_match_timm(preset, dim, depth, n_keys, monkeypatch):
    cfg = build_config(preset, ["data.path=/unused"])
    # shapes only, on the meta device: no 300M-parameter initialisation for ViT-L; the
    # drop-path rates (a linspace read with .tolist()) must stay concrete
    linspace = torch.linspace
    monkeypatch.setattr(torch, "linspace", lambda *a, **k: linspace(*a, **k, device="cpu"))
    with torch.device("meta"):
        backbone = build_backbone(cfg)
    state = to_timm_state_dict(backbone.state_dict())
    expected = timm_published_shapes(dim, depth)
    assert len(expected) == n_keys  # timm's count for vit_*_patch16_224, num_classes=0
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert "mask_token" in backbone.state_dict() and "mask_token" not in state


def test_unknown_parameter_is_refused():
    assert to_timm_name("blocks.3.mlp.fc2.bias") == "blocks.3.mlp.fc2.bias"
    assert to_timm_name("mask_token") is None
    for name in ("blocks.0.ls1.gamma", "head.weight", "blocks.0.attn.q_norm.weight"):
        with pytest.raises(ValueError):
            to_timm_name(name)
    with pytest.raises(ValueError):
        from_timm_state_dict({"head.weight": torch.zeros(2, 2)}, 2)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The demo model and a ViT-S/16, random init with every parameter perturbed (so that
    no parameter sits at an init value, e.g. LayerNorm's ones, that would hide a swap),
    saved as trainer checkpoints; with features of a fixed input."""
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("export")
    demo = build_config("demo")
    specs = [("demo", demo, "vit_tiny_patch16_224", dict(
                 img_size=32, patch_size=demo.model.patch_size, embed_dim=128, depth=4, num_heads=4,
                 num_classes=0)),
             ("vits16", build_config("vit_small_16_paper", ["data.path=/unused"]),
              "vit_small_patch16_224", dict(img_size=224, patch_size=16, embed_dim=384,
                                            depth=12, num_heads=6, num_classes=0))]
    out = []
    for name, cfg, timm_name, kwargs in specs:
        backbone = build_backbone(cfg).eval()
        size = cfg.data.global_size
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            for p in backbone.parameters():
                p.add_(torch.randn_like(p) * 0.02)
            tokens = backbone(x)
        ckpt = save_checkpoint(tmp / f"{name}.pth", cfg, backbone)
        out.append(dict(name=name, cfg=cfg, timm_name=timm_name, kwargs=kwargs, ckpt=ckpt,
                        x=x, tokens=tokens))
    return out


@pytest.mark.parametrize("ext", [".safetensors", ".pth"])
def test_round_trip_gives_the_same_features(models, tmp_path, ext, monkeypatch):
    for m in models:
        kwargs = m["kwargs"]
        out = tmp_path / f"{m['name']}_timm{ext}"
        assert cmd_export(["--checkpoint", str(m["ckpt"]), "--out", str(out)]) == 0

        meta = json.loads(out.with_suffix(".json").read_text())
        assert meta["timm_model"] == m["timm_name"] and meta["timm_kwargs"] == kwargs
        assert meta["source"]["which"] == "teacher" and meta["source"]["iteration"] == 42
        if ext == ".safetensors":
            with safe_open(str(out), "pt") as f:
                header = f.metadata()
            assert header["timm_model"] == m["timm_name"]
            assert json.loads(header["timm_kwargs"]) == kwargs

        state = load_exported(out)
        assert {k: tuple(v.shape) for k, v in state.items()} == timm_published_shapes(
            kwargs["embed_dim"], kwargs["depth"], kwargs["patch_size"], kwargs["img_size"])
        # back into ibot_fast's ViT (built on the meta device, then given these tensors)
        linspace = torch.linspace
        monkeypatch.setattr(torch, "linspace", lambda *a, **k: linspace(*a, **k, device="cpu"))
        with torch.device("meta"):
            reloaded = build_backbone(m["cfg"])
        monkeypatch.undo()
        reloaded.load_state_dict(from_timm_state_dict(state, kwargs["embed_dim"]), assign=True)
        with torch.no_grad():
            # the same weights (a swapped tensor is off by ~1e-2); summation order may
            # differ with the buffers' alignment
            torch.testing.assert_close(reloaded.eval()(m["x"]), m["tokens"], rtol=1e-6,
                                       atol=1e-6)


def test_export_errors(tmp_path):
    cfg = build_config("demo")
    ckpt = save_checkpoint(tmp_path / "c.pth", cfg, build_backbone(cfg))
    with pytest.raises(UserError, match="safetensors"):
        export(ckpt, tmp_path / "model.bin")
    with pytest.raises(UserError, match="no checkpoint"):
        export(tmp_path / "missing.pth", tmp_path / "m.safetensors")
    torch.save({"model": {}}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="not an ibot_fast"):
        export(tmp_path / "other.pth", tmp_path / "m.safetensors")


TIMM_SCRIPT = textwrap.dedent("""
    import json, sys, timm, torch
    from safetensors.torch import load_file
    weights, meta, inputs, out = sys.argv[1:]
    meta = json.load(open(meta))
    model = timm.create_model(meta["timm_model"], pretrained=False, **meta["timm_kwargs"])
    state = load_file(weights) if weights.endswith(".safetensors") else torch.load(weights)
    model.load_state_dict(state)  # strict
    with torch.no_grad():
        torch.save(model.eval()(torch.load(inputs)), out)
""")


@pytest.mark.skipif(not TIMM_PYTHON, reason="set IBOT_FAST_TIMM_PYTHON to a Python with timm")
@pytest.mark.parametrize("ext", [".safetensors", ".pth"])
def test_timm_loads_the_export(models, tmp_path, ext):
    script = tmp_path / "load_in_timm.py"
    script.write_text(TIMM_SCRIPT)
    for m in models:
        out, sidecar = export(m["ckpt"], tmp_path / f"{m['name']}{ext}")
        torch.save(m["x"], tmp_path / "x.pt")
        proc = subprocess.run([TIMM_PYTHON, str(script), str(out), str(sidecar),
                               str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        # timm's forward with num_classes=0: the CLS token after the final norm
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), m["tokens"][:, 0],
                                   rtol=1e-4, atol=1e-5)

"""show attention / show curves: the attention math, and PNGs from a real (tiny) run."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ibot_fast import UserError
from ibot_fast.config import build_config
from ibot_fast.data.datasets import DigitsDataset
from ibot_fast.eval.knn import random_init_backbone
from ibot_fast.show import (attention_figure_size, attention_maps, cls_attention, cmd_show,
                            curve_panels, read_log)
from ibot_fast.train import Trainer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One epoch (3 iterations) of the demo model on 24 synthetic images, k-NN at its end:
    a real checkpoint.pth and log.jsonl."""
    out = tmp_path_factory.mktemp("run")
    cfg = build_config("demo", [
        "data.source=synthetic", "data.synthetic_size=24", "data.num_workers=0",
        "data.n_local=2", "train.batch_size=8", "train.epochs=1", "train.log_every=1",
        "eval.knn_every=1", "eval.knn_k=5,10", "model.out_dim=128", "model.patch_out_dim=128",
        "model.head_hidden_dim=64", "model.head_bottleneck_dim=32", "optim.warmup_epochs=0",
        f"train.output_dir={out}"])
    Trainer(cfg).run()
    return out


def png_size(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as img:
        img.load()
        return img.size, np.asarray(img.convert("L"), dtype=np.float32)


def test_cls_attention_reproduces_the_blocks_attention_output():
    torch.manual_seed(0)
    cfg = build_config("demo")
    backbone = random_init_backbone(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    probs = cls_attention(backbone, x)  # [B, heads, N]
    assert probs.shape == (2, 4, 1 + (32 // cfg.model.patch_size) ** 2)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4))

    # the CLS row of the last block's attention, with these probabilities, is what the
    # block's own Attention module computes
    with torch.no_grad():
        tokens = backbone.prepare_tokens(x)
        for block in backbone.blocks[:-1]:
            tokens = block(tokens)
        block = backbone.blocks[-1]
        y = block.norm1(tokens)
        expected = block.attn(y)[:, 0]
        B, N, C = y.shape
        v = block.attn.qkv(y).reshape(B, N, 3, 4, C // 4)[:, :, 2].transpose(1, 2)
        out = (probs[:, :, None] @ v).reshape(B, C)  # heads concatenated
        torch.testing.assert_close(block.attn.proj(out), expected, rtol=1e-5, atol=1e-5)

    maps = attention_maps(backbone, x)
    assert maps.shape == (2, 4, 32, 32)
    # nearest upsampling: every patch-sized pixel block holds one patch's probability
    p, n = cfg.model.patch_size, (32 // cfg.model.patch_size) ** 2
    torch.testing.assert_close(maps[:, :, ::p, ::p].reshape(2, 4, n), probs[:, :, 1:])
    torch.testing.assert_close(maps[:, :, p - 1::p, p - 1::p].reshape(2, 4, n), probs[:, :, 1:])


def test_show_attention_png(run_dir, tmp_path):
    img, _ = DigitsDataset("test").load(0)
    image_path = tmp_path / "digit.png"
    img.save(image_path)
    out = tmp_path / "attention.png"
    assert cmd_show(["attention", "--checkpoint", str(run_dir / "checkpoint.pth"),
                     "--image", str(image_path), "--out", str(out)]) == 0
    size, pixels = png_size(out)
    assert size == attention_figure_size(4) == (1000, 200)  # image + 4 heads, 200 px each
    assert pixels.std() > 10  # not a blank canvas

    with pytest.raises(UserError):
        cmd_show(["attention", "--checkpoint", str(run_dir / "checkpoint.pth"),
                  "--image", str(tmp_path / "missing.png"), "--out", str(out)])


def test_show_curves_png_from_a_real_log(run_dir, tmp_path):
    records = read_log(run_dir)
    panels = dict(curve_panels(records))
    entropy = "teacher CLS target entropy (nats)"
    assert list(panels) == ["loss", entropy, "learning rate", "teacher temperature",
                            "k-NN top-1 (%)"]
    assert set(panels["loss"]) == {"loss", "CLS term", "patch (MIM) term"}
    assert set(panels[entropy]) == {"per image", "batch mean"}
    (_, per_image), (_, batch) = panels[entropy]["per image"], panels[entropy]["batch mean"]
    # the entropy of a mean is at least the mean entropy; both at most ln K (K = 128)
    assert len(per_image) == 3 and all(0 <= a <= b + 1e-6 <= np.log(128) + 1e-5
                                       for a, b in zip(per_image, batch))
    assert panels["loss"]["loss"][0] == (1, 2, 3)  # log_every=1, 3 iterations
    assert set(panels["k-NN top-1 (%)"]) == {"k=5", "k=10"}

    out = tmp_path / "curves.png"
    assert cmd_show(["curves", "--run", str(run_dir), "--out", str(out)]) == 0
    size, pixels = png_size(out)
    assert size == (2000, 320)  # 5 panels of 4 x 3.2 inches at 100 dpi
    assert pixels.std() > 10


def test_curves_resumed_and_cut_off_log(tmp_path):
    step = {"epoch": 0, "loss": 9.0, "cls": 6.0, "patch": 3.0, "lr": 1e-4,
            "teacher_temp": 0.04, "teacher_patch_temp": 0.05}
    lines = [json.dumps({**step, "iter": it, "loss": float(it)}) for it in (5, 10, 15)]
    lines.append(json.dumps({**step, "iter": 10, "loss": 100.0}))  # resumed at iteration 5
    lines.append('{"iter": 20, "loss": 1')  # the run was killed mid-write
    (tmp_path / "log.jsonl").write_text("\n".join(lines) + "\n")
    panels = dict(curve_panels(read_log(tmp_path)))
    assert panels["loss"]["loss"] == ((5, 10, 15), (5.0, 100.0, 15.0))
    assert "k-NN top-1 (%)" not in panels  # no k-NN logged: three panels
    out = tmp_path / "curves.png"
    cmd_show(["curves", "--run", str(tmp_path), "--out", str(out)])
    assert png_size(out)[0] == (1200, 320)

    with pytest.raises(UserError, match="no training log"):
        cmd_show(["curves", "--run", str(tmp_path / "nowhere"), "--out", str(out)])
    with pytest.raises(UserError, match=".png"):
        cmd_show(["curves", "--run", str(tmp_path), "--out", str(tmp_path / "c.jpg")])

"""Pictures: the last block's CLS attention per head, and the training curves.

    ibot-fast show attention --checkpoint runs/demo/checkpoint.pth --image digit.png \\
        --out attention.png [--which teacher] [--size 32]
    ibot-fast show curves --run runs/demo --out curves.png

`attention`: the image goes through the evaluation transform (resize to 256/224 of the
size, centre crop); the panels are the crop, then one heat map per head of the CLS
token's attention probabilities over the patches in the last block, upsampled (nearest)
to the crop's size, as DINO shows them. The probabilities are computed here from the
block's own modules (norm1, attn.qkv, the head split): softmax(q k^T / sqrt(head_dim)).

`curves`: from <run>/log.jsonl, or, when there is none, the TensorBoard event files in
<run> (`train.tensorboard=true`), over iterations: the loss and its CLS and patch terms;
the learning rate; the teacher temperatures (CLS and patch); the k-NN top-1 when logged.
When a run was resumed from an earlier checkpoint, the later record of an iteration wins.
"""
import argparse
import json
import logging
import math
from pathlib import Path

import torch

from . import UserError

log = logging.getLogger(__name__)

PANEL_INCHES, DPI = 2.0, 100  # attention panels: 200 x 200 px each


@torch.no_grad()
def cls_attention(backbone, x: torch.Tensor) -> torch.Tensor:
    """The last block's attention probabilities of the CLS query over all tokens (CLS
    first): [B, heads, 1 + h*w] for images x [B, 3, H, W]; each head's row sums to 1."""
    tokens = backbone.prepare_tokens(x)
    for block in backbone.blocks[:-1]:
        tokens = block(tokens)
    block = backbone.blocks[-1]
    B, N, C = tokens.shape
    heads = block.attn.heads
    qkv = block.attn.qkv(block.norm1(tokens)).reshape(B, N, 3, heads, C // heads)
    q = qkv[:, :1, 0].transpose(1, 2)  # [B, heads, 1, head_dim]: the CLS query
    k = qkv[:, :, 1].transpose(1, 2)  # [B, heads, N, head_dim]
    return (q @ k.transpose(-2, -1) * (C // heads) ** -0.5).softmax(-1)[:, :, 0]


def attention_maps(backbone, x: torch.Tensor) -> torch.Tensor:
    """The CLS attention over the h x w patch grid, each patch's probability repeated over
    its pixels (nearest upsampling): [B, heads, H, W]."""
    h, w = x.shape[-2] // backbone.patch_size, x.shape[-1] // backbone.patch_size
    probs = cls_attention(backbone, x)[:, :, 1:].reshape(x.shape[0], -1, h, w)
    return probs.repeat_interleave(backbone.patch_size, 2).repeat_interleave(
        backbone.patch_size, 3)


def _grid(n: int):
    cols = min(n, 5)
    return math.ceil(n / cols), cols


def attention_figure_size(heads: int):
    """(width, height) in pixels of the attention PNG for a number of heads."""
    rows, cols = _grid(heads + 1)
    return int(cols * PANEL_INCHES * DPI), int(rows * PANEL_INCHES * DPI)


def show_attention(checkpoint_path, image_path, out, which: str = "teacher",
                   size: int = None, trusted: bool = False) -> Path:
    import numpy as np
    from PIL import Image

    from .data.cpu import MEAN, STD
    from .eval.knn import eval_transform, load_backbone

    out = _png_path(out)
    cfg, backbone = load_backbone(checkpoint_path, which, trusted)
    size = size or cfg.data.global_size
    if size % backbone.patch_size:
        raise UserError(f"--size {size} is not a multiple of the patch size "
                        f"{backbone.patch_size}")
    try:
        with Image.open(image_path) as img:
            img = img.convert("RGB")
    except Exception as e:
        raise UserError(f"cannot read image {image_path}: {type(e).__name__}: {e}") from None
    x = eval_transform(img, size)[None]
    backbone.eval()
    maps = attention_maps(backbone, x)[0].numpy()  # [heads, size, size]
    picture = (x[0].permute(1, 2, 0).numpy() * np.array(STD) + np.array(MEAN)).clip(0, 1)

    heads = maps.shape[0]
    rows, cols = _grid(heads + 1)
    plt = _pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=(cols * PANEL_INCHES, rows * PANEL_INCHES),
                             dpi=DPI, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(picture, interpolation="nearest")
    axes.flat[0].set_title("image", fontsize=8)
    for i in range(heads):
        axes.flat[i + 1].imshow(maps[i], cmap="inferno", interpolation="nearest")
        axes.flat[i + 1].set_title(f"head {i}", fontsize=8)
    fig.suptitle(f"last-block CLS attention ({which}, {cfg.model.arch})", fontsize=9)
    return _save(fig, out)


def read_log(run_dir) -> list:
    """The records of <run>/log.jsonl (else of its TensorBoard event files), one per
    iteration and kind, in iteration order."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        if list(Path(run_dir).glob("events.out.tfevents.*")):
            return read_tensorboard(run_dir)
        raise UserError(f"no training log at {path} (nor TensorBoard event files): pass "
                        "--run DIR, a run's output_dir")
    records = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s line %d is not JSON (a run cut off mid-write?): skipped", path, n)
                continue
            if "iter" not in record:
                continue
            kind = "knn" if any(k.startswith("knn_top1") for k in record) else "step"
            records[(record["iter"], kind)] = record  # a resumed run rewrites iterations
    if not records:
        raise UserError(f"{path} has no records yet")
    return [records[key] for key in sorted(records)]


def read_tensorboard(run_dir) -> list:
    """log.jsonl's records rebuilt from the TensorBoard event files in run_dir (tags
    `group/key`, logger.metric_tag), in iteration order. TensorBoard's reader drops the
    points that a resumed run's purge step overrides."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        raise UserError(f"{run_dir} holds TensorBoard event files and no log.jsonl: "
                        "reading them needs the tensorboard package (pip install "
                        "tensorboard)") from None
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})  # 0: keep all
    # the reader warns of "a TensorFlow restart" where it applies a resume's purge step
    quiet = logging.getLogger("tensorboard")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        events.Reload()
    finally:
        quiet.setLevel(level)
    by_iter = {}
    for tag in events.Tags()["scalars"]:
        key = tag.split("/", 1)[-1]
        for point in events.Scalars(tag):
            by_iter.setdefault(point.step, {})[key] = point.value
    records = {}
    for step, values in by_iter.items():
        knn = {k: v for k, v in values.items() if k.startswith("knn_top1")}
        rest = {k: v for k, v in values.items() if k not in knn}
        if rest:
            records[(step, "step")] = {"iter": step, **rest}
        if knn:
            records[(step, "knn")] = {"iter": step, **knn}
    if not records:
        raise UserError(f"the TensorBoard event files in {run_dir} have no scalars yet")
    return [records[key] for key in sorted(records)]


def curve_panels(records: list) -> list:
    """[(title, {label: (iters, values)})] for the panels that have data."""
    def series(key):
        points = [(r["iter"], r[key]) for r in records if key in r]
        return tuple(zip(*points)) if points else None

    knn_keys = sorted({k for r in records for k in r if k.startswith("knn_top1_k")},
                      key=lambda k: int(k.rsplit("k", 1)[1]))
    wanted = [("loss", [("loss", "loss"), ("cls", "CLS term"), ("patch", "patch (MIM) term")]),
              ("teacher CLS target entropy (nats)",
               [("cls_target_entropy", "per image"), ("cls_target_batch_entropy", "batch mean")]),
              ("learning rate", [("lr", "lr")]),
              ("teacher temperature", [("teacher_temp", "CLS"),
                                       ("teacher_patch_temp", "patch")]),
              ("k-NN top-1 (%)", [(k, f"k={k.rsplit('k', 1)[1]}") for k in knn_keys])]
    panels = []
    for title, keys in wanted:
        lines = {label: s for key, label in keys if (s := series(key)) is not None}
        if lines:
            panels.append((title, lines))
    return panels


def show_curves(run_dir, out) -> Path:
    out = _png_path(out)
    panels = curve_panels(read_log(run_dir))
    if not panels:
        raise UserError(f"the log in {run_dir} has no loss, lr, temperature or k-NN "
                        "values")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), dpi=DPI,
                             squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels):
        for label, (iters, values) in lines.items():
            ax.plot(iters, values, label=label, marker="o" if len(iters) < 20 else None,
                    markersize=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(f"{Path(run_dir).resolve().name}", fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def _pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display needed)."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("ibot-fast show needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png_path(out) -> Path:
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: use a .png file name")
    return out


def _save(fig, out: Path) -> Path:
    plt = _pyplot()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def cmd_show(argv) -> int:
    p = argparse.ArgumentParser("ibot-fast show", description="attention maps and "
                                "training curves as PNG")
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("attention", help="last block's CLS attention per head over an image")
    a.add_argument("--checkpoint", required=True)
    a.add_argument("--image", required=True)
    a.add_argument("--out", required=True, help="PNG file")
    a.add_argument("--which", default="teacher", choices=("teacher", "student"))
    a.add_argument("--trust-pickle", action="store_true",
                   help="unpickle the file whatever it holds (it can run code: only a file "
                   "you trust)")
    a.add_argument("--size", type=int, default=None,
                   help="crop side in px (default: the run's global crop size)")
    c = sub.add_parser("curves", help="loss terms, lr, teacher temperatures, k-NN")
    c.add_argument("--run", required=True, help="a run's output_dir (with log.jsonl or "
                   "TensorBoard event files)")
    c.add_argument("--out", required=True, help="PNG file")
    args = p.parse_args(argv)
    if args.what == "attention":
        out = show_attention(args.checkpoint, args.image, args.out, args.which, args.size,
                             args.trust_pickle)
    else:
        out = show_curves(args.run, args.out)
    print(f"wrote {out}")
    return 0

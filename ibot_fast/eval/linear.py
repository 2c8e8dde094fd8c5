"""Linear probe on frozen features (docs/design.md §1.6), as in DINO/iBOT's eval_linear.

Features come from the frozen (teacher) backbone with the k-NN's evaluation transform
(resize to 256/224 of the crop size, centre crop): the CLS tokens of the last `n_blocks`
blocks, each after the final norm, concatenated, optionally followed by the average of
the last block's patch tokens. The official choices are the defaults (`feature_spec`):
ViT-S and the demo model n_blocks=4 without pooling; ViT-B and larger n_blocks=1 with.

The features are extracted once, for the training and the held-out split (digits test /
ImageFolder val/), without augmentation. Under torch.distributed each process extracts
its shard and the features are all-gathered. Then one linear classifier per learning
rate is trained in a single pass over them: all classifiers see the same mini-batches and
live in one batched weight [n_lrs, dim, classes] (the multi-lr search of DINOv2's linear
evaluation). As the official LinearClassifier and its optimiser: weights N(0, 0.01),
biases 0, SGD momentum 0.9, weight decay 0 (configurable), lr given for a batch of 256 and
scaled linearly, cosine-annealed to 0 (here per iteration). Every classifier is evaluated
on the held-out split after every epoch; its best epoch is reported, as the official code
reports its best validation accuracy, beside its last epoch.

`--standardize` divides the centred features by their training std (MAE's BatchNorm
without affine). It is off for ViT-S/B/L, as in DINO/iBOT's protocol, and on by default
for the demo model: the demo teacher's CLS features on the digits are nearly one shared
vector (per-dimension std ~0.05 against a norm of ~23), and the few hundred SGD steps
that 1,437 images give cannot fit such badly conditioned inputs (45% top-1 raw, 89%
standardised, for the 12-epoch demo teacher).

    ibot-fast linear --checkpoint runs/demo/checkpoint.pth
    ibot-fast linear --random-init --preset demo
    ibot-fast linear --checkpoint runs/vits16/checkpoint.pth --data /data/imagenet
    torchrun --nproc_per_node=8 -m ibot_fast.cli linear --checkpoint CKPT --data /data/imagenet

Every process trains the same classifiers on the same gathered features (same seed), so
none waits at a barrier while another trains; only rank 0 prints. The features stay in
fp32 on the classifier's device: ImageNet-1k with ViT-S (4 x 384 dims) needs ~8 GB.
"""
import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import UserError, dist
from .features import extract_features
from .knn import (add_backbone_args, backbone_from_args, format_results, knn_classify,
                  on_device)

# DINOv2's linear-evaluation grid.
DEFAULT_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)


def feature_spec(arch: str) -> dict:
    """The default features of an architecture: n_blocks and avgpool as the official
    linear evaluation; standardize only for the demo model (see the module docstring)."""
    large = arch in ("vit_base", "vit_large")
    return {"n_blocks": 1 if large else 4, "avgpool": large, "standardize": arch == "vit_demo"}


def describe_features(n_blocks: int, avgpool: bool, standardized: bool = False) -> str:
    what = f"CLS of the last {n_blocks} blocks" if n_blocks > 1 else "CLS"
    return (what + (" + average-pooled patch tokens" if avgpool else "") +
            (", standardised" if standardized else ""))


class LinearClassifiers(nn.Module):
    """n independent linear classifiers dim -> classes, as one batched weight."""

    def __init__(self, n: int, dim: int, num_classes: int, generator=None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, dim, num_classes, generator=generator) * 0.01)
        self.bias = nn.Parameter(torch.zeros(n, 1, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, dim] -> logits [n, B, classes], as one [B, dim] x [dim, n * classes] GEMM."""
        n, dim, classes = self.weight.shape
        logits = x @ self.weight.transpose(0, 1).reshape(dim, n * classes)
        return logits.view(-1, n, classes).transpose(0, 1) + self.bias


@torch.no_grad()
def _sgd_step_(params, grads, bufs, lr: torch.Tensor, momentum: float, weight_decay: float):
    """torch.optim.SGD's update (dampening 0, no Nesterov) with one lr per classifier
    (lr [n], broadcast over each parameter's leading classifier axis)."""
    for p, g, buf in zip(params, grads, bufs):
        d = g.add(p, alpha=weight_decay) if weight_decay else g
        buf.mul_(momentum).add_(d)
        p.sub_(lr.view(-1, *([1] * (p.ndim - 1))) * buf)


def train_linear(features, labels, lrs, num_classes: int, epochs: int = 100,
                 batch_size: int = 256, momentum: float = 0.9, weight_decay: float = 0.0,
                 device=torch.device("cpu"), seed: int = 0, eval_features=None,
                 eval_labels=None):
    """One classifier per lr, all trained on the same mini-batches in one pass per epoch.

    Loss: the sum over classifiers of each one's mean cross-entropy, so their gradients
    are independent. lrs are for a batch of 256 and scaled by batch_size / 256 (the
    official linear scaling rule), then annealed per iteration: lr (1 + cos(pi t / T)) / 2.
    Returns (classifiers, top-1 % of every classifier on the eval split after every
    epoch [epochs, n_lrs], or None without an eval split).
    """
    g = torch.Generator().manual_seed(seed)
    n = features.shape[0]
    clf = LinearClassifiers(len(lrs), features.shape[1], num_classes, g).to(device)
    params = list(clf.parameters())
    bufs = [torch.zeros_like(p) for p in params]
    base_lr = torch.tensor(lrs, dtype=torch.float32, device=device) * batch_size / 256.0
    features, labels = features.to(device), labels.to(device)
    total = epochs * math.ceil(n / batch_size)
    history = []
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g).to(device)
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            logits = clf(features[idx])
            loss = F.cross_entropy(logits.flatten(0, 1), labels[idx].repeat(len(lrs)),
                                   reduction="sum") / idx.numel()
            grads = torch.autograd.grad(loss, params)
            scale = 0.5 * (1.0 + math.cos(math.pi * step / total))
            _sgd_step_(params, grads, bufs, base_lr * scale, momentum, weight_decay)
            step += 1
        if eval_features is not None:
            history.append(accuracy(clf, eval_features, eval_labels))
    return clf, (torch.stack(history) if history else None)


@torch.no_grad()
def accuracy(clf: LinearClassifiers, features, labels, chunk: int = 4096) -> torch.Tensor:
    """Top-1 (%) of every classifier: [n]."""
    device = clf.weight.device
    correct = torch.zeros(clf.weight.shape[0], device=device)
    for start in range(0, features.shape[0], chunk):
        f = features[start:start + chunk].to(device)
        y = labels[start:start + chunk].to(device)
        correct += (clf(f).argmax(-1) == y).sum(1)
    return (100.0 * correct / features.shape[0]).cpu()


def standardize(train_f, *others, eps: float = 1e-6):
    """Features minus the training mean, over the training std, per dimension: what a
    BatchNorm1d without affine parameters in front of the classifier (MAE's linear probe)
    computes at evaluation, here exact because the features are fixed."""
    mean, std = train_f.mean(0), train_f.std(0) + eps
    return [(f - mean) / std for f in (train_f,) + others]


def linear_probe(train_f, train_y, test_f, test_y, lrs=DEFAULT_LRS,
                 standardize_features: bool = False, **train_kwargs) -> dict:
    """Train on (train_f, train_y), evaluate on the held-out split after every epoch.

    Returns {"lrs", "final" (top-1 per lr after the last epoch), "top1" (per lr, the best
    epoch's: what the official eval_linear reports), "best_lr", "best_top1" (the max of
    "top1"), "classifiers"}.
    """
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    if standardize_features:
        train_f, test_f = standardize(train_f, test_f)
    clf, history = train_linear(train_f, train_y, list(lrs), num_classes,
                                eval_features=test_f, eval_labels=test_y, **train_kwargs)
    top1 = history.max(0).values.tolist()
    best = max(range(len(lrs)), key=lambda i: top1[i])
    return {"lrs": list(lrs), "final": history[-1].tolist(), "top1": top1,
            "best_lr": lrs[best], "best_top1": top1[best], "classifiers": clf}


def linear_eval_backbone(cfg, backbone, device, lrs=DEFAULT_LRS, n_blocks=None,
                         avgpool=None, standardize_features=None, train_source=None,
                         test_source=None, knn: bool = True, **train_kwargs) -> dict:
    """Extract features once, train the classifiers, and (knn=True) the k-NN of the last
    block's CLS from the same (raw) features, for free. None picks `feature_spec`'s
    default. Returns linear_probe's dict plus "features" (the description), "dim",
    "n_train", "n_test" and "knn" (or None)."""
    from ..data.datasets import build_dataset

    spec = feature_spec(cfg.model.arch)
    n_blocks = spec["n_blocks"] if n_blocks is None else n_blocks
    avgpool = spec["avgpool"] if avgpool is None else avgpool
    if standardize_features is None:
        standardize_features = spec["standardize"]
    if not 1 <= n_blocks <= len(backbone.blocks):
        raise UserError(f"--n-blocks must be between 1 and the depth {len(backbone.blocks)}")
    train_source = train_source or build_dataset(cfg, "train")
    test_source = test_source or build_dataset(cfg, "test")
    kwargs = dict(size=cfg.data.global_size, device=device, n_blocks=n_blocks,
                  avgpool=avgpool, batch_size=cfg.eval.batch_size,
                  num_workers=cfg.data.num_workers, precision=cfg.eval.precision)
    train_f, train_y = extract_features(backbone, train_source, **kwargs)
    test_f, test_y = extract_features(backbone, test_source, **kwargs)
    results = linear_probe(train_f, train_y, test_f, test_y, lrs, device=device,
                           standardize_features=standardize_features, **train_kwargs)
    results.update(features=describe_features(n_blocks, avgpool, standardize_features),
                   dim=train_f.shape[1],
                   n_train=train_f.shape[0], n_test=test_f.shape[0], knn=None)
    if knn:
        d = backbone.embed_dim
        last_cls = slice((n_blocks - 1) * d, n_blocks * d)
        results["knn"] = knn_classify(F.normalize(train_f[:, last_cls], dim=-1), train_y,
                                      F.normalize(test_f[:, last_cls], dim=-1), test_y,
                                      cfg.eval.knn_k, cfg.eval.knn_temp, device=device)
    return results


def format_linear(results: dict) -> str:
    lines = ["  lr (per 256)  top-1 best epoch  top-1 last epoch"]
    for lr, best, final in zip(results["lrs"], results["top1"], results["final"]):
        mark = "  <- best" if lr == results["best_lr"] else ""
        lines.append(f"  {lr:<12g}  {best:14.2f}%  {final:15.2f}%{mark}")
    return "\n".join(lines)


def get_args_parser():
    p = argparse.ArgumentParser(
        "ibot-fast linear", description="linear probe on frozen backbone features: one "
        "classifier per lr, trained in one pass over features extracted once")
    add_backbone_args(p, "probe")
    p.add_argument("--epochs", type=int, default=100, help="passes over the features")
    p.add_argument("--batch-size", type=int, default=256, help="classifier mini-batch")
    p.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_LRS),
                   help="one classifier per lr, each for a batch of 256 (scaled by "
                   "batch-size / 256)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--wd", type=float, default=0.0, help="weight decay")
    p.add_argument("--n-blocks", type=int, default=None,
                   help="CLS of the last N blocks (default: 4 for ViT-S/demo, 1 for B/L)")
    p.add_argument("--avgpool", action=argparse.BooleanOptionalAction, default=None,
                   help="append the average-pooled patch tokens (default: on for B/L)")
    p.add_argument("--standardize", action=argparse.BooleanOptionalAction, default=None,
                   help="standardise each feature with the training split's mean and std "
                   "(BatchNorm without affine, as MAE's probe). Default: on for the demo "
                   "model, off for ViT-S/B/L (DINO/iBOT's protocol)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def cmd_linear(argv) -> int:
    args = get_args_parser().parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or not args.lrs or min(args.lrs) <= 0:
        raise UserError("--epochs and --batch-size must be >= 1 and every --lrs value > 0")
    cfg, backbone, what = backbone_from_args(args, "linear")
    _, _, device = dist.init("auto")
    results = linear_eval_backbone(cfg, on_device(backbone, device), device, args.lrs,
                                   args.n_blocks, args.avgpool, epochs=args.epochs,
                                   batch_size=args.batch_size, momentum=args.momentum,
                                   weight_decay=args.wd, seed=args.seed,
                                   standardize_features=args.standardize)
    if dist.is_main():
        print(f"linear probe ({what}; {results['features']}, dim {results['dim']}; "
              f"{results['n_train']} train / {results['n_test']} held-out images; "
              f"{args.epochs} epochs, {device}):")
        print(format_linear(results))
        print(f"linear top-1: {results['best_top1']:.2f}% (lr {results['best_lr']:g})")
        print(f"k-NN top-1 (same backbone, last CLS): {format_results(results['knn'])}")
    return 0  # the group is ended by cli.main (dist.end)

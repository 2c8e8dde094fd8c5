"""Weighted k-NN classification on frozen features (docs/design.md §1.6), as in DINO/iBOT.

Features: the backbone's CLS token after the final norm, images resized to 256/224 of
the crop size and centre-cropped (224 px for ImageNet, 32 px for the digits), then
L2-normalised. Each test image takes its k most cosine-similar training images; their
votes are weighted by exp(sim / T) (T = 0.07), and the class with most weight wins.

The search runs on the evaluation device: the training features stream past all the
held-out ones in blocks, each held-out image keeping a running top k. Under
torch.distributed each process extracts and searches only its shard of the training
images and the [n_test, k] candidate lists are merged, so no process ever holds all the
training features (ImageNet with ViT-B: 3.9 GB of them).
"""
import math

import torch
import torch.nn.functional as F

from .. import UserError, dist
from ..data.datasets import build_dataset
from .features import EvalImages, eval_transform  # noqa: F401 (the k-NN's transform)
from .features import extract_features as extract_blocks


def extract_features(backbone, source, size: int, device, batch_size: int = 256,
                     num_workers: int = 0, gather: bool = True, precision: str = "fp32"):
    """L2-normalised CLS features [n, dim] (fp32, CPU) and labels [n] of a source (the
    last block's CLS after the final norm). Under torch.distributed every process must
    call it; it returns all features (gather=True) or the process's shard."""
    feats, labels = extract_blocks(backbone, source, size, device, 1, False, batch_size,
                                   num_workers, gather, precision)
    return F.normalize(feats, dim=-1), labels


def _nearest(train_features, train_labels, test_features, k: int, device, chunk: int,
             block: int):
    """For every test row, the k largest similarities to the training rows (sorted,
    -inf where fewer than k exist) and those rows' labels. The training features go to
    the device `block` rows at a time; each test row keeps a running top k, so the
    memory is O(block x chunk + n_test x k), never O(n_test x n_train)."""
    test = test_features.to(device)
    best = torch.full((test.shape[0], k), -math.inf, device=device)
    best_labels = torch.zeros((test.shape[0], k), dtype=torch.int64, device=device)
    for first in range(0, train_features.shape[0], block):
        train = train_features[first:first + block].to(device, non_blocking=True)
        labels = train_labels[first:first + block].to(device, non_blocking=True)
        for row in range(0, test.shape[0], chunk):
            sim, idx = (test[row:row + chunk] @ train.T).topk(min(k, train.shape[0]), dim=1)
            sim = torch.cat([best[row:row + chunk], sim], dim=1)
            lab = torch.cat([best_labels[row:row + chunk], labels[idx]], dim=1)
            best[row:row + chunk], keep = sim.topk(k, dim=1)
            best_labels[row:row + chunk] = lab.gather(1, keep)
    return best, best_labels


def _merge_shards(best, best_labels, k: int, budget: int = 1 << 28):
    """Each process's top k (of its training shard) -> the top k over all shards, on
    every process; all-gathered a slice of test rows at a time, the slice sized so that
    the gathered candidates take about `budget` bytes whatever the process count."""
    world = dist.world_size()
    rows = max(1, budget // (world * k * 12 * 2))  # fp32 + int64, gathered then concatenated
    for row in range(0, best.shape[0], rows):
        sims = [torch.empty_like(best[row:row + rows]) for _ in range(world)]
        labels = [torch.empty_like(best_labels[row:row + rows]) for _ in range(world)]
        torch.distributed.all_gather(sims, best[row:row + rows].contiguous())
        torch.distributed.all_gather(labels, best_labels[row:row + rows].contiguous())
        best[row:row + rows], keep = torch.cat(sims, dim=1).topk(k, dim=1)
        best_labels[row:row + rows] = torch.cat(labels, dim=1).gather(1, keep)
    return best, best_labels


@torch.no_grad()
def knn_classify(train_features, train_labels, test_features, test_labels,
                 ks=(10, 20, 100, 200), temperature: float = 0.07, chunk: int = 1024,
                 block: int = 65536, device=None, sharded: bool = False) -> dict:
    """Top-1 accuracy (%) of weighted k-NN for each k (k capped at the training size).

    Runs on `device` (default: the test features'), streaming the training features in
    blocks of `block` rows. sharded=True (under torch.distributed): `train_*` are this
    process's shard of the training set (extract_features(gather=False)) and every
    process holds all test features; each searches its shard, the candidates are merged,
    and every process returns the same accuracies.
    """
    device = torch.device(device) if device is not None else test_features.device
    sharded = sharded and dist.is_initialized()
    n_train = torch.tensor([train_features.shape[0]], device=device)
    top_label = torch.tensor([int(train_labels.max()) if len(train_labels) else 0,
                              int(test_labels.max())], device=device)
    if sharded:
        dist.all_reduce_(n_train)
        dist.all_reduce_(top_label, torch.distributed.ReduceOp.MAX)
    num_classes = int(top_label.max()) + 1
    k_max = min(max(ks), int(n_train))
    if k_max == 0:
        raise UserError("k-NN: no training features")
    best, best_labels = _nearest(train_features, train_labels, test_features, k_max,
                                 device, chunk, block)
    if sharded:
        best, best_labels = _merge_shards(best, best_labels, k_max)
    weights = (best / temperature).exp()
    test_labels = test_labels.to(device)
    accuracy = {}
    for k in ks:
        kk = min(k, k_max)
        votes = torch.zeros(best.shape[0], num_classes, device=device)
        votes.scatter_add_(1, best_labels[:, :kk], weights[:, :kk])
        correct = int((votes.argmax(1) == test_labels).sum())
        accuracy[k] = 100.0 * correct / test_features.shape[0]
    return accuracy


def knn_eval_backbone(cfg, backbone, device, train_source=None, test_source=None) -> dict:
    """k-NN accuracy of a backbone on the config's held-out split (digits test / val/).
    Under torch.distributed every process must call it: each extracts and searches its
    shard of the training images (nobody holds all their features), the held-out
    features are all-gathered, and every process gets the result."""
    train_source = train_source or build_dataset(cfg, "train")
    test_source = test_source or build_dataset(cfg, "test")
    size = cfg.data.global_size
    was_training = backbone.training
    kwargs = dict(batch_size=cfg.eval.batch_size, num_workers=cfg.data.num_workers,
                  precision=cfg.eval.precision)
    train_f, train_y = extract_features(backbone, train_source, size, device, gather=False,
                                        **kwargs)
    test_f, test_y = extract_features(backbone, test_source, size, device, **kwargs)
    backbone.train(was_training)
    return knn_classify(train_f, train_y, test_f, test_y, cfg.eval.knn_k, cfg.eval.knn_temp,
                        device=device, sharded=True)


def random_init_backbone(cfg, seed: int = None):
    """A freshly initialised backbone of the config's architecture (the k-NN baseline)."""
    from ..models import build_backbone

    torch.manual_seed(cfg.train.seed if seed is None else seed)
    return build_backbone(cfg)


def on_device(backbone, device):
    """The backbone on the evaluation device; on a GPU with SDPA's fused attention (a
    backbone built for evaluation starts with the `math` reference, which writes every
    [heads, 197, 197] attention matrix to memory: slower for 1.28 M ImageNet images)."""
    if device.type == "cuda":
        backbone.set_attention_backend("sdpa")
    return backbone.to(device)


def add_backbone_args(p, verb: str) -> None:
    """The arguments that choose the backbone an evaluation command runs on."""
    p.add_argument("--checkpoint", help="ibot_fast checkpoint (omit with --random-init)")
    p.add_argument("--which", default="teacher", choices=("teacher", "student"))
    p.add_argument("--random-init", action="store_true",
                   help=f"{verb} a randomly initialised network of the same architecture")
    p.add_argument("--preset", default=None, help="with --random-init and no checkpoint")
    p.add_argument("--config", default=None, metavar="FILE.yaml",
                   help="with --random-init: keys from a YAML file, after the preset")
    p.add_argument("--data", default=None, help="ImageFolder root with train/ and val/")
    p.add_argument("--trust-pickle", action="store_true", help="unpickle the file whatever it holds (it can run code: only a file you trust)")


def backbone_from_args(args, command: str):
    """(config, backbone, description) from `add_backbone_args`' arguments and the
    key=value overrides in `args.overrides`."""
    from ..config import apply_overrides, build_config

    if args.checkpoint and args.config:
        raise UserError("--config is for --random-init: a checkpoint carries its own "
                        "config (override its keys as key=value)")
    overrides = list(args.overrides)
    if args.data:
        overrides += ["data.source=folder", f"data.path={args.data}"]
    if args.checkpoint:
        cfg, backbone = load_backbone(args.checkpoint, args.which, args.trust_pickle)
        apply_overrides(cfg, overrides)
    elif args.random_init:  # validated with the overrides (a paper preset needs --data)
        cfg = build_config(args.preset or "demo", overrides, config_file=args.config)
    else:
        raise UserError(f"{command} needs --checkpoint PATH (or --random-init)")
    if args.random_init:
        backbone = random_init_backbone(cfg)
    what = "random init" if args.random_init else f"{args.which} of {args.checkpoint}"
    return cfg, backbone, what


def load_backbone(path, which: str = "teacher", trusted: bool = False):
    """(config, backbone) from an ibot_fast checkpoint; which = teacher | student;
    trusted: unpickle whatever the file holds (ibot_fast/checkpoint.py)."""
    from .. import checkpoint
    from ..config import from_dict
    from ..models import backbone_state_dict, build_backbone

    ckpt = checkpoint.load(path, trusted=trusted)
    if not isinstance(ckpt, dict) or "config" not in ckpt or which not in ckpt:
        raise UserError(f"{path} is not an ibot_fast training checkpoint")
    cfg = from_dict(ckpt["config"])
    backbone = build_backbone(cfg)
    try:
        backbone.load_state_dict(backbone_state_dict(ckpt[which]))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{path}: the {which} weights do not fit its own config "
                        f"({first})") from None
    return cfg, backbone


def format_results(results: dict) -> str:
    return "  ".join(f"k={k}: {acc:5.2f}%" for k, acc in results.items())

"""Weighted k-NN classification on frozen features (DESIGN.md §1.6), as in DINO/iBOT.

Features: the backbone's CLS token after the final norm, images resized to 256/224 of
the crop size and centre-cropped (224 px for ImageNet, 32 px for the digits), then
L2-normalised. Each test image takes its k most cosine-similar training images; their
votes are weighted by exp(sim / T) (T = 0.07), and the class with most weight wins.
"""
import torch
import torch.nn.functional as F

from .. import UserError
from ..data.datasets import build_dataset
from .features import EvalImages, eval_transform  # noqa: F401 (the k-NN's transform)
from .features import extract_features as extract_blocks


def extract_features(backbone, source, size: int, device, batch_size: int = 256,
                     num_workers: int = 0):
    """L2-normalised CLS features [n, dim] (fp32) and labels [n] of a source (the last
    block's CLS after the final norm; sharded and all-gathered under torch.distributed,
    so every process must call it)."""
    feats, labels = extract_blocks(backbone, source, size, device, 1, False, batch_size,
                                   num_workers)
    return F.normalize(feats, dim=-1), labels


@torch.no_grad()
def knn_classify(train_features, train_labels, test_features, test_labels,
                 ks=(10, 20, 100, 200), temperature: float = 0.07, chunk: int = 512) -> dict:
    """Top-1 accuracy (%) of weighted k-NN for each k (k capped at the training size)."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k_max = min(max(ks), train_features.shape[0])
    correct = {k: 0 for k in ks}
    for start in range(0, test_features.shape[0], chunk):
        f = test_features[start:start + chunk]
        y = test_labels[start:start + chunk]
        sim, idx = (f @ train_features.T).topk(k_max, dim=1)  # sorted, most similar first
        neighbour_labels = train_labels[idx]
        weights = (sim / temperature).exp()
        for k in ks:
            kk = min(k, k_max)
            votes = torch.zeros(f.shape[0], num_classes)
            votes.scatter_add_(1, neighbour_labels[:, :kk], weights[:, :kk])
            correct[k] += int((votes.argmax(1) == y).sum())
    return {k: 100.0 * correct[k] / test_features.shape[0] for k in ks}


def knn_eval_backbone(cfg, backbone, device, train_source=None, test_source=None) -> dict:
    """k-NN accuracy of a backbone on the config's held-out split (digits test / val/).
    Under torch.distributed every process must call it (the features are extracted in
    shards and all-gathered) and every process gets the result."""
    train_source = train_source or build_dataset(cfg, "train")
    test_source = test_source or build_dataset(cfg, "test")
    size = cfg.data.global_size
    was_training = backbone.training
    kwargs = dict(batch_size=cfg.eval.batch_size, num_workers=cfg.data.num_workers)
    train_f, train_y = extract_features(backbone, train_source, size, device, **kwargs)
    test_f, test_y = extract_features(backbone, test_source, size, device, **kwargs)
    backbone.train(was_training)
    return knn_classify(train_f, train_y, test_f, test_y, cfg.eval.knn_k, cfg.eval.knn_temp)


def random_init_backbone(cfg, seed: int = None):
    """A freshly initialised backbone of the config's architecture (the k-NN baseline)."""
    from ..models import build_backbone

    torch.manual_seed(cfg.train.seed if seed is None else seed)
    return build_backbone(cfg)


def add_backbone_args(p, verb: str) -> None:
    """The arguments that choose the backbone an evaluation command runs on."""
    p.add_argument("--checkpoint", help="ibot_fast checkpoint (omit with --random-init)")
    p.add_argument("--which", default="teacher", choices=("teacher", "student"))
    p.add_argument("--random-init", action="store_true",
                   help=f"{verb} a randomly initialised network of the same architecture")
    p.add_argument("--preset", default=None, help="with --random-init and no checkpoint")
    p.add_argument("--data", default=None, help="ImageFolder root with train/ and val/")


def backbone_from_args(args, command: str):
    """(config, backbone, description) from `add_backbone_args`' arguments and the
    key=value overrides in `args.overrides`."""
    from ..config import apply_overrides, build_config

    if args.checkpoint:
        cfg, backbone = load_backbone(args.checkpoint, args.which)
    elif args.random_init:
        cfg, backbone = build_config(args.preset or "demo"), None
    else:
        raise UserError(f"{command} needs --checkpoint PATH (or --random-init)")
    overrides = list(args.overrides)
    if args.data:
        overrides += ["data.source=folder", f"data.path={args.data}"]
    apply_overrides(cfg, overrides)
    if args.random_init:
        backbone = random_init_backbone(cfg)
    what = "random init" if args.random_init else f"{args.which} of {args.checkpoint}"
    return cfg, backbone, what


def load_backbone(path, which: str = "teacher"):
    """(config, backbone) from an ibot_fast checkpoint; which = teacher | student."""
    from .. import checkpoint
    from ..config import from_dict
    from ..models import backbone_state_dict, build_backbone

    ckpt = checkpoint.load(path)
    if "config" not in ckpt or which not in ckpt:
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

"""Export a pre-trained backbone for timm: safetensors or .pth with timm's parameter names.

    ibot-fast export --checkpoint runs/vits16/checkpoint.pth --out vits16_ibot.safetensors
    ibot-fast export --checkpoint runs/demo/checkpoint.pth --out demo.pth --which student

The file holds the backbone's state dict under timm's `VisionTransformer` names
(`vit_small_patch16_224`, `vit_base_patch16_224`, `vit_large_patch16_224`; the demo model
as `vit_tiny_patch16_224` with its own sizes), without the mask token (timm has none) and
without a classifier head (num_classes=0). The timm model name and the keyword arguments
that give the matching shapes go into the safetensors metadata and, for either format,
into a sidecar JSON next to the file (`<out without extension>.json`):

    import json, timm
    from safetensors.torch import load_file
    meta = json.load(open("vits16_ibot.json"))
    model = timm.create_model(meta["timm_model"], pretrained=False, **meta["timm_kwargs"])
    model.load_state_dict(load_file("vits16_ibot.safetensors"))   # strict: every key matches
    features = model(images)   # [B, dim]: the CLS token after the final norm

Inputs are normalised with the ImageNet mean and std (also in the metadata). ibot_fast's
ViT uses timm's (and DINO's) layout, so the mapping renames nothing: it drops the mask
token and checks that every other key is one timm has.
"""
import argparse
import json
import re
from pathlib import Path

import torch

from . import UserError

TIMM_MODELS = {"vit_demo": "vit_tiny_patch16_224", "vit_tiny": "vit_tiny_patch16_224",
               "vit_small": "vit_small_patch16_224",
               "vit_base": "vit_base_patch16_224", "vit_large": "vit_large_patch16_224"}

# ibot_fast backbone key -> timm key. Keys matching a pattern keep their name; DROPPED
# keys have no timm counterpart. Anything else is an error, so that a change to the
# backbone's parameters cannot silently produce a file timm will not load.
_SAME_NAME = [re.compile(p) for p in (
    r"cls_token", r"pos_embed", r"patch_embed\.proj\.(weight|bias)",
    r"blocks\.\d+\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)",
    r"norm\.(weight|bias)")]
DROPPED = ("mask_token",)


def to_timm_name(name: str):
    """timm's name for an ibot_fast backbone parameter, or None for a dropped one."""
    if name in DROPPED:
        return None
    if any(p.fullmatch(name) for p in _SAME_NAME):
        return name
    raise ValueError(f"backbone parameter {name!r} has no timm counterpart")


def to_timm_state_dict(state: dict) -> dict:
    """ibot_fast backbone state dict -> timm VisionTransformer state dict (contiguous)."""
    out = {}
    for name, value in state.items():
        timm_name = to_timm_name(name)
        if timm_name is not None:
            out[timm_name] = value.detach().contiguous().clone()
    return out


def from_timm_state_dict(state: dict, dim: int) -> dict:
    """The inverse: a timm state dict -> ibot_fast backbone names (mask token zero)."""
    out = {}
    for name, value in state.items():
        if to_timm_name(name) != name:
            raise ValueError(f"{name!r} is not a timm VisionTransformer backbone key")
        out[name] = value
    out["mask_token"] = torch.zeros(1, dim, dtype=next(iter(state.values())).dtype)
    return out


def timm_spec(cfg) -> tuple:
    """(timm model name, create_model kwargs) for the architecture of a config."""
    from .models import ARCHS

    arch = ARCHS[cfg.model.arch]
    kwargs = dict(img_size=cfg.data.global_size, patch_size=cfg.model.patch_size,
                  embed_dim=arch["dim"], depth=arch["depth"], num_heads=arch["heads"],
                  num_classes=0)
    return TIMM_MODELS[cfg.model.arch], kwargs


def export(checkpoint_path, out, which: str = "teacher", trusted: bool = False) -> tuple:
    """Write the backbone of a checkpoint for timm; returns (file, sidecar json).
    trusted: unpickle whatever the checkpoint holds (ibot_fast/checkpoint.py)."""
    from . import checkpoint
    from .config import from_dict
    from .data.cpu import MEAN, STD
    from .models import backbone_state_dict

    out = Path(out)
    fmt = {".safetensors": "safetensors", ".pth": "pth", ".pt": "pth"}.get(out.suffix.lower())
    if fmt is None:
        raise UserError(f"--out {out}: use a .safetensors or .pth file name")
    ckpt = checkpoint.load(checkpoint_path, trusted=trusted)
    if not isinstance(ckpt, dict) or "config" not in ckpt or which not in ckpt:
        raise UserError(f"{checkpoint_path} is not an ibot_fast training checkpoint")
    cfg = from_dict(ckpt["config"])
    state = to_timm_state_dict(backbone_state_dict(ckpt[which]))
    name, kwargs = timm_spec(cfg)
    meta = {"timm_model": name, "timm_kwargs": kwargs, "mean": list(MEAN), "std": list(STD),
            "source": {"checkpoint": str(checkpoint_path), "which": which,
                       "arch": cfg.model.arch, "epoch": ckpt.get("epoch"),
                       "iteration": ckpt.get("iteration")},
            "features": "model(x) is the CLS token after the final norm (global_pool='token')"}
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(out), metadata={
            "format": "pt", "timm_model": name, "timm_kwargs": json.dumps(kwargs),
            "ibot_fast": json.dumps(meta)})
    else:
        torch.save(state, out)
    sidecar = out.with_suffix(".json")
    sidecar.write_text(json.dumps(meta, indent=2) + "\n")
    return out, sidecar


def load_exported(path) -> dict:
    """The state dict of an exported file (either format), on the CPU."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def cmd_export(argv) -> int:
    p = argparse.ArgumentParser("ibot-fast export", description="write a checkpoint's "
                                "backbone with timm's parameter names (.safetensors or .pth)")
    p.add_argument("--checkpoint", required=True, help="ibot_fast checkpoint")
    p.add_argument("--out", required=True, help="FILE.safetensors or FILE.pth")
    p.add_argument("--which", default="teacher", choices=("teacher", "student"))
    p.add_argument("--trust-pickle", action="store_true",
                   help="unpickle the checkpoint whatever it holds (it can run code: only a "
                   "file you trust)")
    args = p.parse_args(argv)
    out, sidecar = export(args.checkpoint, args.out, args.which, args.trust_pickle)
    meta = json.loads(sidecar.read_text())
    kwargs = ", ".join(f"{k}={v}" for k, v in meta["timm_kwargs"].items())
    print(f"wrote {out} ({args.which} backbone, timm names) and {sidecar}")
    print(f"load with: timm.create_model('{meta['timm_model']}', pretrained=False, {kwargs})"
          f".load_state_dict(...)")
    return 0

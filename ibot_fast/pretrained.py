"""Start a new run from pre-trained weights: `model.init_from=PATH`.

Continued pre-training on one's own images usually starts from published weights rather
than from random ones. The step counter, schedules, optimizer state and loss centers
start fresh (it is a new run, unlike `--resume`); student and teacher both start from
the chosen weights, as they start from one initialisation in a fresh run.

Files read (the format is recognised from the keys; the file is unpickled, so load
only files you trust, as with `torch.load(weights_only=False)`):
- an ibot_fast checkpoint (`checkpoint.pth`), or the official iBOT / DINO training
  checkpoint: `model.init_which` (teacher by default, the network DINO and iBOT evaluate
  and publish, or student) with its backbone and head (DINO's head, which has no
  `last_layer2`, fits a shared head); a DDP `module.` prefix is dropped;
- the official iBOT `checkpoint_teacher.pth` (`{"state_dict": backbone}`), a DINO
  backbone release (`dino_vitbase16_pretrain.pth`: a bare backbone state dict), a timm
  ViT state dict (its classifier `head.*` is left out) or an `ibot-fast export` file
  (`.safetensors` or `.pth`): the backbone only, the head starts fresh.

The backbone must fit `model.arch` and `model.patch_size` exactly; position embeddings
trained for another grid are resized bicubically to `data.global_size`. The mask token
(official name `masked_embed`) starts at zero when the file has none (DINO, timm). The
head is loaded only when every one of its tensors is present with the shapes of this
run's head (`model.out_dim`, `head_*` keys); otherwise it starts fresh, and the log says
which and why.
"""
import logging
from pathlib import Path

import torch

from . import UserError, checkpoint
from .models.vit import resize_pos_embed

log = logging.getLogger(__name__)

# a timm ViT's classifier (and its pooled-feature norm): not part of the backbone here
_CLASSIFIER = ("head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias")


def read_weights(path, which: str = "teacher") -> tuple:
    """(backbone state, head state ({} when the file has none), what the file was)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"model.init_from={path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj, what = load_file(str(path)), "a safetensors backbone"
    else:
        obj, what = checkpoint.load(path), None
    if not isinstance(obj, dict):
        raise UserError(f"model.init_from={path} holds a {type(obj).__name__}, not weights")
    if isinstance(obj.get(which), dict):  # ibot_fast / official iBOT or DINO training run
        state, what = obj[which], f"the {which} of a training checkpoint"
    elif isinstance(obj.get("state_dict"), dict):  # official checkpoint_teacher.pth
        state, what = obj["state_dict"], "a backbone state dict ('state_dict')"
    elif isinstance(obj.get("model"), dict):
        state, what = obj["model"], "a backbone state dict ('model')"
    else:
        state, what = obj, what or "a backbone state dict"
    state = {k.removeprefix("module."): v for k, v in state.items() if torch.is_tensor(v)}
    if not state:
        raise UserError(f"model.init_from={path} holds no tensors (for a training "
                        f"checkpoint: no '{which}' network)")
    if any(k.startswith("backbone.") for k in state):
        backbone = {k[len("backbone."):]: v for k, v in state.items()
                    if k.startswith("backbone.")}
        head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
    else:
        backbone = {k: v for k, v in state.items() if k not in _CLASSIFIER}
        head = {}
    if "masked_embed" in backbone:  # the official iBOT name of the mask token
        backbone["mask_token"] = backbone.pop("masked_embed").reshape(1, -1)
    return backbone, head, what


def fit_backbone(backbone: dict, target: dict, path) -> list:
    """Check `backbone` against the model's state `target` (and resize its position
    embeddings to the model's grid, in place); returns notes for the log."""
    notes = []
    pos, want = backbone.get("pos_embed"), target["pos_embed"]
    if pos is not None and pos.ndim == 3 and pos.shape[1] != want.shape[1] and \
            pos.shape[2] == want.shape[2]:
        side = int(round((want.shape[1] - 1) ** 0.5))
        backbone["pos_embed"] = resize_pos_embed(pos, side, side)
        notes.append(f"position embeddings resized from {pos.shape[1] - 1} to {side}x{side} "
                     "patches")
    if "mask_token" not in backbone:
        backbone["mask_token"] = torch.zeros_like(target["mask_token"])
        notes.append("no mask token in the file: it starts at zero")
    missing = sorted(target.keys() - backbone.keys())
    unexpected = sorted(backbone.keys() - target.keys())
    wrong = [f"{k} {tuple(backbone[k].shape)} vs {tuple(v.shape)}" for k, v in target.items()
             if k in backbone and backbone[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = ([f"shapes differ: {', '.join(wrong[:3])}"] if wrong else []) + \
            ([f"missing: {', '.join(missing[:3])}"] if missing else []) + \
            ([f"not in this model: {', '.join(unexpected[:3])}"] if unexpected else [])
        raise UserError(f"model.init_from={path}: the backbone does not fit this model "
                        f"(check model.arch and model.patch_size): {'; '.join(parts)}")
    return notes


def head_mismatch(head: dict, target: dict) -> str:
    """Why `head` cannot be loaded into a head whose state is `target` ('' if it can)."""
    if not head:
        return "the file has no head"
    missing = sorted(target.keys() - head.keys())
    if missing:
        return f"the file's head has no {missing[0]}"
    for k, v in target.items():
        if head[k].shape != v.shape:
            return f"head {k} is {tuple(head[k].shape)} in the file, {tuple(v.shape)} here"
    return ""


@torch.no_grad()
def init_networks(student, teacher, path, which: str = "teacher") -> None:
    """Load the weights at `path` into the student (`IBOTNet`: backbone and head), then
    copy the student into the teacher. Before any wrapping, sharding or compiling."""
    backbone, head, what = read_weights(path, which)
    notes = fit_backbone(backbone, student.backbone.state_dict(), path)
    student.backbone.load_state_dict(backbone)
    target = student.head.state_dict()
    # a shared head (last_layer2 is last_layer) takes the CLS layer's weights, so a DINO
    # head (no last_layer2) loads too
    source = {k: k.replace("last_layer2.", "last_layer.") if student.head.shared_head else k
              for k in target}
    why = head_mismatch(head, {source[k]: v for k, v in target.items()})
    if why:
        notes.append(f"head not loaded ({why}): it starts fresh")
    else:
        student.head.load_state_dict({k: head[source[k]] for k in target})
    teacher.load_state_dict(student.state_dict())
    log.info("initialised student and teacher from %s (%s)%s", path, what,
             "".join(f"; {n}" for n in notes))

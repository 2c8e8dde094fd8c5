"""Start a new run from pre-trained weights: `model.init_from=PATH`.

Continued pre-training on one's own images usually starts from published weights rather
than from random ones. The step counter, schedules, optimizer state and loss centers
start fresh (it is a new run, unlike `--resume`); student and teacher both start from
the chosen weights, as they start from one initialisation in a fresh run. A resumed run
does not read the file again.

Files read (the format is recognised from the keys; a torch file is read with
`torch.load(weights_only=True)` and the types the official checkpoints need, so it cannot
run code: ibot_fast/checkpoint.py, `train.trust_pickle` for anything else; it is
memory-mapped, so the processes of a multi-GPU run do not each hold it whole):
- an ibot_fast checkpoint (`checkpoint.pth`), or the official iBOT / DINO training
  checkpoint: `model.init_which` (teacher by default, the network DINO and iBOT evaluate
  and publish, or student) with its backbone and head (DINO's head, which has no
  `last_layer2`, fits a shared head); a DDP `module.` prefix is dropped. The official
  iBOT teacher has no mask token (only its student is built with one): it is taken from
  the student of the same file;
- the official iBOT `checkpoint_teacher.pth` (`{"state_dict": backbone}`, with the head
  beside it when extracted `--with_head`), a DINO backbone release
  (`dino_vitbase16_pretrain.pth`: a bare backbone state dict), a timm ViT state dict (its
  classifier `head.weight/bias` is left out) or an `ibot-fast export` file
  (`.safetensors` or `.pth`): the backbone only, the head starts fresh.

The backbone must fit `model.arch` and `model.patch_size` exactly (DINOv2's layer scale
and register tokens do not). Position embeddings of a CLS row and a square grid trained
for another grid are resized bicubically to `data.global_size`'s grid, and the run keeps
them at that grid (as a run from scratch does): 224-px weights loaded into a 96-px run
keep a 6 x 6 table. The mask token starts at zero when the file has none (DINO, timm,
backbone-only iBOT files). The head is loaded only when every one of its tensors is
present with the shapes of this run's head (`model.out_dim`, `head_*` keys); otherwise it
starts fresh. With `model.norm_last_layer=true` the last layer's scale g is set to 1 and
stays frozen there, as in a run from scratch. The log says what was loaded and why not.
"""
import logging
from pathlib import Path

import torch

from . import UserError, checkpoint
from .models import backbone_state_dict
from .models.vit import resize_pos_embed

log = logging.getLogger(__name__)

# a timm ViT's classifier (and its pooled-feature norm): not part of the backbone here
_CLASSIFIER = ("head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias")
_MASK_TOKEN = ("mask_token", "masked_embed")  # ours, the official iBOT name


def _load(path: Path, trusted: bool = False):
    """A safetensors file (by its suffix, any case) or a torch.save'd object, mapped
    rather than read whole (each process of a multi-GPU run reads the file)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), "a safetensors backbone"
        except Exception as e:
            raise UserError(f"model.init_from={path} cannot be read as safetensors "
                            f"({type(e).__name__}: {e})") from None
    return checkpoint.load(path, mmap=True, trusted=trusted), None


def _split(state: dict) -> tuple:
    """(backbone, head) of a network's state dict: MultiCropWrapper keys (`backbone.*`,
    `head.*`), or a bare backbone, possibly with an iBOT/DINO head beside it (the official
    extract_backbone_weights.py --with_head) or a timm classifier (left out)."""
    head = {k[len("head."):]: v for k, v in state.items()
            if k.startswith("head.") and k not in _CLASSIFIER}
    if any(k.startswith("backbone.") for k in state):
        return backbone_state_dict(state), head
    backbone = {k: v for k, v in state.items()
                if not k.startswith("head.") and k not in _CLASSIFIER}
    return backbone, head


def _mask_token(state: dict):
    for name in _MASK_TOKEN:
        for key in (f"backbone.{name}", name):
            if key in state:
                return state[key]
    return None


def _tensors(state: dict) -> dict:
    return {k.removeprefix("module."): v for k, v in state.items() if torch.is_tensor(v)}


def read_weights(path, which: str = "teacher", trusted: bool = False) -> tuple:
    """(backbone state, head state ({} when the file has none), what the file was, notes
    for the log)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"model.init_from={path}: no such file")
    obj, what = _load(path, trusted)
    if not isinstance(obj, dict):
        raise UserError(f"model.init_from={path} holds a {type(obj).__name__}, not weights")
    notes, other = [], {"teacher": "student", "student": "teacher"}[which]
    if isinstance(obj.get(which), dict):  # ibot_fast / official iBOT or DINO training run
        state, what = _tensors(obj[which]), f"the {which} of a training checkpoint"
        if _mask_token(state) is None and isinstance(obj.get(other), dict):
            # the official iBOT teacher is built without a mask token; the student has it
            token = _mask_token(_tensors(obj[other]))
            if token is not None:
                state["backbone.mask_token" if any(k.startswith("backbone.") for k in state)
                      else "mask_token"] = token
                notes.append(f"the mask token is the {other}'s (the {which} has none)")
    else:
        if isinstance(obj.get("state_dict"), dict):  # official checkpoint_teacher.pth
            state, what = obj["state_dict"], "a backbone state dict ('state_dict')"
        elif isinstance(obj.get("model"), dict):
            state, what = obj["model"], "a backbone state dict ('model')"
        else:
            state, what = obj, what or "a backbone state dict"
        state = _tensors(state)
        if which != "teacher":
            notes.append(f"model.init_which={which} does not apply: the file holds one "
                         "network")
    if not state:
        raise UserError(f"model.init_from={path} holds no tensors (for a training "
                        f"checkpoint: no '{which}' network)")
    backbone, head = _split(state)
    if "masked_embed" in backbone:
        backbone["mask_token"] = backbone.pop("masked_embed").reshape(1, -1)
    return backbone, head, what, notes


def _square_grid(n_tokens: int) -> int:
    """The side of a CLS + side x side token table, or 0 when it is not one."""
    side = int(round((n_tokens - 1) ** 0.5))
    return side if side * side == n_tokens - 1 else 0


def fit_backbone(backbone: dict, target: dict, path) -> list:
    """Check `backbone` against the model's state `target` (and resize its position
    embeddings to the model's grid, in place); returns notes for the log."""
    notes = []
    pos, want = backbone.get("pos_embed"), target["pos_embed"]
    if pos is not None and pos.ndim == 3 and pos.shape[1] != want.shape[1] and \
            pos.shape[2] == want.shape[2] and _square_grid(pos.shape[1]):
        side = _square_grid(want.shape[1])
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
        hint = "check model.arch and model.patch_size"
        if any(".ls1." in k or "reg_token" in k or "register_tokens" in k for k in unexpected):
            hint += "; layer scale and register tokens (DINOv2) are not part of this ViT"
        elif "pos_embed" in backbone and not _square_grid(backbone["pos_embed"].shape[1]):
            hint += "; position embeddings must be a CLS row and a square grid"
        raise UserError(f"model.init_from={path}: the backbone does not fit this model "
                        f"({hint}): {'; '.join(parts)}")
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
def init_networks(student, teacher, path, which: str = "teacher",
                  trusted: bool = False) -> None:
    """Load the weights at `path` into the student (`IBOTNet`: backbone and head), then
    copy the student into the teacher. Before any wrapping, sharding or compiling."""
    backbone, head, what, notes = read_weights(path, which, trusted)
    notes += fit_backbone(backbone, student.backbone.state_dict(), path)
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
        frozen = [m for m in {id(m): m for m in (student.head.last_layer,
                                                 student.head.last_layer2)}.values()
                  if not m.weight_g.requires_grad]
        if any(not torch.all(m.weight_g == 1) for m in frozen):  # norm_last_layer: g is
            # frozen at 1, as in a run from scratch (DINO/iBOT ViT-S/B trained it free)
            for m in frozen:
                m.weight_g.fill_(1.0)
            notes.append("the last layer's scale g set to 1 (model.norm_last_layer=true)")
    teacher.load_state_dict(student.state_dict())
    log.info("initialised student and teacher from %s (%s)%s", path, what,
             "".join(f"; {n}" for n in notes))

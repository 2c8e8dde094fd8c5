"""Optimizer, gradient clipping, last-layer freezing, the teacher EMA (docs/design.md §1.5).

Parameter groups follow the official rule: no weight decay on biases and on parameters
with a single dimension (group 1); everything else (group 0) follows the weight-decay
schedule. Frozen parameters (requires_grad False, e.g. g under norm_last_layer) are left
out. Nothing here synchronises with the host.
"""
import torch

from . import UserError


OPTIMIZERS = ("adamw", "apex_adamw", "apex_lamb")  # optim.name
CLIP_MODES = ("per_param", "global")  # optim.clip_mode: official (each tensor) | one norm


def param_groups(model: torch.nn.Module):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg, model: torch.nn.Module, fused: bool):
    """AdamW from torch (fused=True: one multi-tensor kernel, device-side skip of
    non-finite steps), or apex's FusedAdam / FusedLAMB when `optim.name` asks for them."""
    o = cfg.optim
    groups = param_groups(model)
    if o.name == "adamw":
        kwargs = {"fused": True} if fused else {"foreach": None}
        return torch.optim.AdamW(groups, lr=0.0, betas=tuple(o.betas),
                                 weight_decay=o.weight_decay, **kwargs)
    try:
        import apex.optimizers as apex_optim
    except ImportError:
        raise UserError(f"optim.name={o.name} needs NVIDIA apex, which is not importable "
                        "here; use optim.name=adamw (torch's fused AdamW)") from None
    if o.name == "apex_adamw":
        return apex_optim.FusedAdam(groups, lr=0.0, betas=tuple(o.betas), adam_w_mode=True,
                                    weight_decay=o.weight_decay)
    return apex_optim.FusedLAMB(groups, lr=0.0, betas=tuple(o.betas),
                                weight_decay=o.weight_decay)


def set_hyperparameters(optimizer, lr: float, wd: float):
    """Per-iteration lr for every group; the scheduled weight decay for group 0 only."""
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = lr
        if i == 0:
            group["weight_decay"] = wd


def last_layer_params(model: torch.nn.Module):
    """The weight-normalised last layer(s) of the head, frozen in the first epoch(s)."""
    return [p for n, p in model.named_parameters() if "last_layer" in n]


def cancel_last_layer_grads(params) -> None:
    """Official `cancel_gradients_last_layer`: drop the gradients, so AdamW skips them.
    They are zeroed first: with flat buffers the storage stays and must not count in the
    gradient norm."""
    for p in params:
        if p.grad is not None:
            p.grad.zero_()
        p.grad = None


def clip_gradients(params, max_norm: float, mode: str = "global"):
    """Clip in place; returns the total gradient norm (a device tensor, no sync).

    global: one norm over all gradients (torch's clip_grad_norm_);
    per_param: the official iBOT/DINO rule, each parameter's gradient clipped on its own.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if mode == "global":
        return torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None],
                                              max_norm, foreach=True)
    norms = torch.stack(torch._foreach_norm(grads)).float()
    coefs = torch.clamp(max_norm / (norms + 1e-6), max=1.0)  # one op for all tensors
    torch._foreach_mul_(grads, list(coefs.unbind()))
    return torch.linalg.vector_norm(norms)


def flat_group(name: str, param: torch.Tensor) -> str:
    """Flat-buffer segments for the fast path: the official weight-decay groups, with the
    head's last layer(s) in segments of their own (they are frozen in the first epoch)."""
    from .flat import default_group

    return ("last_" if "last_layer" in name else "") + default_group(name, param)


class AdamWEMA(torch.optim.Optimizer):
    """AdamW on the flat student and the teacher EMA in one pass per flat segment
    (`ibot_fast.kernels.adamw_ema_`): reads gradient, moments, parameter and teacher once.

    Parameter groups are torch AdamW's (group 0 with the scheduled weight decay, group 1
    without). The moments live in flat buffers with the student's layout and the step
    counts per segment; `state_dict` / `load_state_dict` speak torch AdamW's format, so a
    checkpoint moves between this optimizer and `torch.optim.AdamW` in both directions.
    `step()` takes the teacher's EMA momentum, whether the last layer is frozen this
    step, and optionally the clipping coefficient (`grad_scale`, a device scalar) and
    `found_inf` (a device flag: the step is skipped without a host sync).
    """

    def __init__(self, groups, flat_student, flat_teacher, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.0):
        super().__init__(groups, dict(lr=0.0, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay))
        self.flat, self.teacher = flat_student, flat_teacher
        self.exp_avg, self.exp_avg_sq = flat_student.zeros_like(), flat_student.zeros_like()
        device = next(iter(flat_student.data.values())).device
        self.steps = {seg: torch.zeros((), device=device) for seg in flat_student.segments}
        names = {id(p): n for n, p in flat_student.module.named_parameters()}
        self._names = [[names[id(p)] for p in g["params"]] for g in self.param_groups]

    @torch.no_grad()
    def step(self, closure=None, *, momentum: float, frozen_last_layer: bool = False,
             grad_scale=None, found_inf=None):
        from ibot_fast.kernels.adamw_ema import adamw_ema_
        from ibot_fast.kernels.ema import ema_

        lr = self.param_groups[0]["lr"]
        beta1, beta2 = self.param_groups[0]["betas"]
        for seg in self.flat.segments:
            teacher = seg.of(self.teacher.data)
            kind = seg.group.replace("last_", "")
            if kind == "frozen":  # no gradient ever (g under norm_last_layer): EMA only
                ema_(teacher, seg.of(self.flat.data), momentum)
                continue
            wd = self.param_groups[0 if kind == "decay" else 1]["weight_decay"]
            adamw_ema_(seg.of(self.flat.data), seg.of(self.flat.grad), seg.of(self.exp_avg),
                       seg.of(self.exp_avg_sq), teacher, self.steps[seg], lr=lr,
                       weight_decay=wd, momentum=momentum, beta1=beta1, beta2=beta2,
                       eps=self.param_groups[0]["eps"], grad_scale=grad_scale,
                       found_inf=found_inf,
                       frozen=frozen_last_layer and seg.group.startswith("last_"))

    def _slots(self):
        """(index in torch AdamW's state numbering, slot, segment) per optimised param."""
        slot_of = {s.name: s for s in self.flat.slots}
        seg_of = {name: seg for seg in self.flat.segments for name in seg.names}
        out, i = [], 0
        for names in self._names:
            for name in names:
                out.append((i, slot_of[name], seg_of[name]))
                i += 1
        return out

    def state_dict(self):
        state = {}
        for i, slot, seg in self._slots():
            step = self.steps[seg]
            if float(step) == 0:
                continue  # torch AdamW has no state for a parameter it never updated
            view = slice(slot.offset, slot.offset + slot.numel)
            state[i] = {"step": step.detach().clone().cpu(),
                        "exp_avg": self.exp_avg[slot.dtype][view].view(slot.shape).clone(),
                        "exp_avg_sq": self.exp_avg_sq[slot.dtype][view].view(slot.shape).clone()}
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        i = 0
        for g, gs in zip(self.param_groups, groups):
            gs["params"] = list(range(i, i + len(g["params"])))
            i += len(g["params"])
        return {"state": state, "param_groups": groups}

    @torch.no_grad()
    def load_state_dict(self, state_dict):
        saved_groups = state_dict["param_groups"]
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("optimizer state has other parameter groups than this model")
        for group, saved in zip(self.param_groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k in ("lr", "weight_decay",
                                                                 "betas", "eps")})
        state = {int(k): v for k, v in state_dict["state"].items()}
        seen = {}
        for i, slot, seg in self._slots():
            view = slice(slot.offset, slot.offset + slot.numel)
            s = state.get(i)
            step = float(s["step"]) if s is not None else 0.0
            if seen.setdefault(seg, step) != step:
                raise ValueError(f"parameters of segment {seg.group} have different step "
                                 "counts: this optimizer keeps one per segment")
            for key, buf in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
                buf[slot.dtype][view].copy_(s[key].reshape(-1) if s is not None else 0)
        for seg, step in seen.items():
            self.steps[seg].fill_(step)

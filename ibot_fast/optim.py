"""Optimizer, gradient clipping, last-layer freezing and the teacher EMA (DESIGN.md §1.5).

Parameter groups follow the official rule: no weight decay on biases and on parameters
with a single dimension (group 1); everything else (group 0) follows the weight-decay
schedule. Frozen parameters (requires_grad False, e.g. g under norm_last_layer) are left
out. Nothing here synchronises with the host.
"""
import torch

from . import UserError


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
    """Official `cancel_gradients_last_layer`: drop the gradients, so AdamW skips them."""
    for p in params:
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
    norms = torch._foreach_norm(grads)
    coefs = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, coefs)
    return torch.linalg.vector_norm(torch.stack(norms))


@torch.no_grad()
def ema_loop_(teacher: torch.nn.Module, student: torch.nn.Module, m: float) -> None:
    """The official teacher update, one parameter at a time: t <- m t + (1 - m) s."""
    for ps, pt in zip(student.parameters(), teacher.parameters()):
        pt.data.mul_(m).add_((1 - m) * ps.detach().data)

"""The iBOT loss written as loops, straight from docs/design.md §1.4. Slow and obvious.

This is what `ibot_fast.loss.IBOTLoss` is tested against: every image, crop pair and
patch is visited one at a time.
"""
import torch
import torch.nn.functional as F


def cross_entropy(p: torch.Tensor, s: torch.Tensor, student_temp: float) -> torch.Tensor:
    """CE(p, s) = -sum_k p_k log_softmax(s / ts)_k, no gradient into p."""
    return -(p.detach() * F.log_softmax(s / student_temp, dim=-1)).sum(-1)


def ibot_loss_loop(student_cls, student_patch, teacher_cls, teacher_patch, masks, center,
                   center2, student_temp, teacher_temp, teacher_patch_temp, lambda1=1.0,
                   lambda2=1.0):
    """Loss terms for one step; inputs crop-major as in IBOTLoss.forward.

    student_cls [(2+L)B, K], student_patch [2B, N, K2], teacher_cls [2B, K],
    teacher_patch [2B, N, K2], masks [2B, N], center [K], center2 [K2].
    Returns dict(cls, patch, loss).
    """
    n_global = 2
    B = teacher_cls.shape[0] // n_global
    n_crops = student_cls.shape[0] // B
    cls_terms, patch_terms = [], []
    for q in range(n_global):
        for v in range(n_crops):
            per_image = []
            for b in range(B):
                t_cls = teacher_cls[q * B + b]
                if v == q:
                    m = masks[q * B + b]
                    total = student_cls.new_zeros(())
                    for i in range(masks.shape[1]):
                        if m[i]:
                            p = F.softmax((teacher_patch[q * B + b, i] - center2) /
                                          teacher_patch_temp, dim=-1)
                            total = total + cross_entropy(p, student_patch[v * B + b, i],
                                                          student_temp)
                    per_image.append(total / max(1, int(m.sum())))
                else:
                    p = F.softmax((t_cls - center) / teacher_temp, dim=-1)
                    per_image.append(cross_entropy(p, student_cls[v * B + b], student_temp))
            term = torch.stack(per_image).mean()
            (patch_terms if v == q else cls_terms).append(term)
    cls = lambda1 * torch.stack(cls_terms).sum() / len(cls_terms)
    patch = lambda2 * torch.stack(patch_terms).sum() / len(patch_terms)
    return {"cls": cls, "patch": patch, "loss": cls + patch}


def center_update_loop(center, center2, teacher_cls, teacher_patch, momentum, momentum2):
    """c <- m c + (1 - m) mean over rows of t_cls;
    c2 <- m2 c2 + (1 - m2) mean over images of (mean over patches of t_patch)."""
    cls_mean = sum(teacher_cls[r] for r in range(teacher_cls.shape[0])) / teacher_cls.shape[0]
    patch_mean = sum(teacher_patch[r].mean(0) for r in range(teacher_patch.shape[0]))
    patch_mean = patch_mean / teacher_patch.shape[0]
    return (center * momentum + cls_mean * (1 - momentum),
            center2 * momentum2 + patch_mean * (1 - momentum2))

"""Pure-PyTorch twins of `kernels/centered_ce.py`: the truth the kernels are tested against.

iBOT's loss (docs/design.md §1.4) is, row by row, a cross-entropy between a centred and
sharpened teacher distribution and the student's tempered distribution over K outputs:

    p      = softmax((t - c) / tt)            teacher, no gradient
    ce_row = -sum_k p_k log_softmax(s / ts)_k = logsumexp(s / ts) - sum_k p_k s_k / ts
    loss_row = w_row * ce_row

A row whose weight is exactly 0 is padding: its inputs are never looked at (they may hold
anything, NaN included), its loss and gradient are 0, and it is left out of the teacher
column sum that feeds the center update. With `weight=None` every row has weight 1.

Everything is computed in fp32 for fp32, fp16 and bf16 inputs (in fp64 for fp64 inputs);
the student gradient comes back in the student's dtype (autograd casts it).
"""
import torch
import torch.nn.functional as F


def _wide(x):
    """x in fp32, or fp64 when it already is: the precision the twins compute in."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _keep_rows(weight, rows, device):
    """(weight [rows] in fp32 or wider, boolean [rows] of the rows that are not padding)."""
    if weight is None:
        weight = torch.ones(rows, device=device, dtype=torch.float32)
    weight = _wide(weight)
    return weight, weight != 0


def centered_softmax_ce_and_colsum(student, teacher, center, student_temp, teacher_temp,
                                   weight=None):
    """Per-row centred, sharpened cross-entropy, and the teacher logits' column sum.

    student, teacher: [rows, K]; center: [K]; weight: [rows] or None.
    Returns (loss [rows], colsum [K]), fp32 (fp64 for fp64 inputs): colsum = sum over
    non-padding rows of `teacher` (the raw logits, not centred). Differentiable with
    respect to `student`.
    """
    weight, keep = _keep_rows(weight, student.shape[0], student.device)
    s = torch.where(keep[:, None], _wide(student), 0.0)
    t = torch.where(keep[:, None], _wide(teacher.detach()), 0.0)
    p = F.softmax((t - _wide(center.detach())) / teacher_temp, dim=-1)
    log_q = F.log_softmax(s / student_temp, dim=-1)
    loss = weight * -(p * log_q).sum(dim=-1)
    return loss, t.sum(dim=0)


def centered_softmax_ce(student, teacher, center, student_temp, teacher_temp, weight=None):
    """Per-row loss only; see `centered_softmax_ce_and_colsum`."""
    loss, _ = centered_softmax_ce_and_colsum(student, teacher, center, student_temp,
                                             teacher_temp, weight)
    return loss

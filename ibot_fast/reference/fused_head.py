"""Pure-PyTorch twin of `kernels/fused_head.py`: the head's last layer, then the loss.

The head ends in a weight-normalised `Linear(D, K, bias=False)` (docs/design.md §1.3),
W = g * v / ||v|| with norms over the rows of v. The twin applies it to the student's and
the teacher's features and hands the logits to
`ibot_fast.reference.centered_ce.centered_softmax_ce_and_colsum` (docs/design.md §1.4):
the same padding rule (weight 0: never looked at, loss and gradient 0, out of the column
sum) and the same precision (fp32, fp64 for fp64 inputs).
"""
import torch

from .centered_ce import _keep_rows, _wide, centered_softmax_ce_and_colsum


def weight_norm_weight(v, g):
    """The weight of a weight-normalised Linear: W = g * v / ||v||, norms over each row.

    v: [K, D]; g: [K, 1] (as `torch.nn.utils.weight_norm` stores it) or [K].
    """
    v = _wide(v)
    return _wide(g).reshape(-1, 1) * v / v.norm(dim=1, keepdim=True)


def fused_head_ce(student_feat, student_v, student_g, teacher_feat, teacher_v, teacher_g,
                  center, student_temp, teacher_temp, weight=None):
    """The head's weight-normalised last layer followed by the loss, unfused.

    student_feat, teacher_feat: [rows, D] (the L2-normalised bottleneck features);
    student_v, teacher_v: [K, D]; student_g, teacher_g: [K, 1] or [K].
    Student logits = student_feat @ W_s^T, teacher logits = teacher_feat @ W_t^T, then
    `centered_softmax_ce_and_colsum`. Returns (loss [rows], colsum [K]), fp32 (fp64 for
    fp64 inputs). Differentiable with respect to student_feat, student_v and student_g.
    """
    _, keep = _keep_rows(weight, student_feat.shape[0], student_feat.device)
    student_feat = torch.where(keep[:, None], _wide(student_feat), 0.0)
    student = student_feat @ weight_norm_weight(student_v, student_g).t()
    with torch.no_grad():
        teacher_feat = torch.where(keep[:, None], _wide(teacher_feat), 0.0)
        teacher = teacher_feat @ weight_norm_weight(teacher_v, teacher_g).t()
    return centered_softmax_ce_and_colsum(student, teacher, center, student_temp,
                                          teacher_temp, weight)

"""IBOTLoss: the CLS (DINO) and masked-patch (MIM) self-distillation terms.

docs/design.md §1.4 states the loss; §2.4-2.5 the fast path's masked rows and kernels.

    Pt_cls = softmax((t_cls - c) / tt)            Pt_patch = softmax((t_patch - c2) / tt2)
    CE(p, s) = -sum_k p_k log_softmax(s / ts)_k   (no gradient into p)

For teacher global crop q and student crop v: v == q gives a MIM term (mean over images
of the mask-weighted mean CE over patches), v != q a CLS term (mean over images).
loss = lambda1 * mean(CLS terms) + lambda2 * mean(MIM terms). The centers are updated
after the loss, with the teacher outputs of this step averaged over all processes.

`impl="reference"` computes the official eager formula; `impl="fast"` computes the same
numbers through `ibot_fast.kernels.centered_softmax_ce` (one fused pass per row, no
probabilities in memory) and, with `forward_masked`, on the masked rows only.

`koleo_loss` is DINOv2's KoLeo regulariser (an option, `loss.koleo_weight`; 0, not part
of iBOT, by default): it spreads the student's backbone CLS features of each global crop
over the batch.

`centering="sinkhorn"` replaces centering + sharpening of the teacher by DINOv2's
Sinkhorn-Knopp normalisation (3 iterations over the global batch: every prototype gets
the same total mass). It is an option, not iBOT's semantics. It cannot make targets out
of teacher outputs that do not differ between images: on the demo's digits its CLS
targets go uniform as iBOT's do (docs/demo.md).
"""
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

N_GLOBAL = 2
CENTERINGS = ("center", "sinkhorn")  # loss.centering: iBOT's | DINOv2's Sinkhorn-Knopp
CENTER2_FROM = ("all", "masked")  # loss.center2_from: every patch (official) | masked rows


def teacher_temp_schedule(warmup_temp, temp, warmup_epochs, n_epochs,
                          delay_epochs=0) -> np.ndarray:
    """Per-epoch teacher temperature: linear warm-up over warmup_epochs, then constant.
    `delay_epochs` holds the warm-up value first (the official patch temperature waits
    for masking to start, `pred_start_epoch`)."""
    warm = np.concatenate((np.ones(delay_epochs) * warmup_temp,
                           np.linspace(warmup_temp, temp, warmup_epochs)))
    warmup_epochs += delay_epochs
    rest = np.ones(max(0, n_epochs - warmup_epochs)) * temp
    return np.concatenate((warm, rest))[:max(n_epochs, 1)] if n_epochs else warm


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """Low-precision inputs are upcast; fp32 and fp64 (tests) are kept."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _at(schedule: np.ndarray, epoch) -> float:
    """Schedule value at an integer epoch (official) or a fractional one (interpolated)."""
    if float(epoch).is_integer():
        return float(schedule[min(int(epoch), len(schedule) - 1)])
    return float(np.interp(epoch, np.arange(len(schedule)), schedule))


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temp: float, n_iters: int = 3,
                   valid: torch.Tensor = None) -> torch.Tensor:
    """Teacher targets by Sinkhorn-Knopp (DINOv2): [rows, K] probabilities.

    Q = exp(logits / temp), then alternately every prototype (column) is given mass 1/K
    and every row mass 1/n, over the rows of all processes (`valid` rows only: padding
    rows get a uniform row that no loss term reads). Rows sum to 1 on return.
    """
    x = _fp32(logits) / temp
    n_valid = (valid.sum() if valid is not None else torch.tensor(x.shape[0])).to(x)
    top = x.max() if valid is None else torch.where(valid[:, None], x, -torch.inf).max()
    if _distributed():
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
        dist.all_reduce(n_valid)
    q = torch.exp(x - top)  # a global scale: Sinkhorn-Knopp is invariant to it
    if valid is not None:
        q = q * valid[:, None]
    K = q.shape[1]
    for _ in range(n_iters):
        per_prototype = q.sum(0)
        if _distributed():
            dist.all_reduce(per_prototype)
        q = q / per_prototype.clamp_min(1e-30) / K
        q = q / q.sum(1, keepdim=True).clamp_min(1e-30) / n_valid
    q = q * n_valid
    if valid is not None:
        q = torch.where(valid[:, None], q, 1.0 / K)
    return q


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo (Kozachenko-Leonenko entropy estimate, as DINOv2 uses it) of the rows of x
    [B, D]: -mean_i log ||u_i - u_n(i)|| over the L2-normalised rows u, n(i) the nearest
    other row (largest cosine). fp32 at least. B >= 2."""
    u = F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=-1, eps=eps)
    with torch.no_grad():
        sims = u @ u.T
        sims.fill_diagonal_(-2.0)  # never one's own neighbour (cosines are >= -1)
        nearest = sims.argmax(dim=1)
    distance = torch.linalg.vector_norm(u - u[nearest] + eps, dim=-1)
    return -torch.log(distance + eps).mean()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class IBOTLoss(nn.Module):
    def __init__(self, out_dim, patch_out_dim, n_local_crops, warmup_teacher_temp,
                 teacher_temp, warmup_teacher_patch_temp, teacher_patch_temp,
                 warmup_teacher_temp_epochs, n_epochs, student_temp=0.1, center_momentum=0.9,
                 center_momentum2=0.9, lambda1=1.0, lambda2=1.0, impl="reference",
                 centering="center", mim_start_epoch=0):
        super().__init__()
        if impl not in ("reference", "fast"):
            raise ValueError(f"impl must be 'reference' or 'fast', got {impl!r}")
        if centering not in CENTERINGS:
            raise ValueError(f"centering must be 'center' or 'sinkhorn', got {centering!r}")
        self.impl = impl
        self.centering = centering
        self.n_crops = N_GLOBAL + n_local_crops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.center_momentum2 = center_momentum2
        self.lambda1 = lambda1
        self.lambda2 = lambda2
        self.register_buffer("center", torch.zeros(out_dim))
        self.register_buffer("center2", torch.zeros(patch_out_dim))
        self.teacher_temps = teacher_temp_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, n_epochs)
        self.teacher_patch_temps = teacher_temp_schedule(
            warmup_teacher_patch_temp, teacher_patch_temp, warmup_teacher_temp_epochs, n_epochs,
            delay_epochs=mim_start_epoch)
        self._pending = None  # an all-reduce of center statistics still in flight
        self._cls_target = None  # the last step's (t, c, temp): `cls_target_entropies`

    def teacher_temp(self, epoch) -> float:
        return _at(self.teacher_temps, epoch)

    def teacher_patch_temp(self, epoch) -> float:
        return _at(self.teacher_patch_temps, epoch)

    # -- the loss ------------------------------------------------------------------------

    def teacher_args(self, teacher, center, temp, valid=None):
        """(logits, center, temperature) whose centred softmax is the teacher target:
        iBOT's (t, c, tt), or for Sinkhorn-Knopp (log P, 0, 1), so that both the eager
        formula and the kernels take either unchanged."""
        if self.centering == "center":
            return teacher.detach(), center, temp
        p = sinkhorn_knopp(teacher, temp, valid=valid)
        return p.clamp_min(1e-30).log(), torch.zeros_like(center), 1.0

    @torch.no_grad()
    def cls_target_entropies(self) -> dict:
        """Collapse diagnostics of the last step's teacher CLS targets (this process's 2B
        rows), in nats: `cls_target_entropy`, the mean entropy of one image's target, and
        `cls_target_batch_entropy`, the entropy of the batch's mean target. Both at ln(K):
        every target is uniform (centring won); both near 0: one prototype takes every
        image (sharpening won); a run that learns keeps the first below ln(K) and the
        second well above the first (needed, not enough). The DINO paper's collapse
        study reads the target entropy so. Under Sinkhorn-Knopp they are its targets'
        entropies, the batch mean near uniform by construction."""
        if self._cls_target is None:
            return {}
        t, c, temp = self._cls_target
        logp = F.log_softmax((_fp32(t) - c) / temp, dim=-1)
        p = logp.exp()
        mean = p.mean(0)
        return {"cls_target_entropy": float(-(p * logp).sum(-1).mean()),
                "cls_target_batch_entropy": float(-(mean * mean.clamp_min(1e-30).log()).sum())}

    def _update_centers(self, teacher_cls, patch_sum, n_patch_rows):
        if self.centering == "center":  # Sinkhorn-Knopp uses no centers
            self.update_center(teacher_cls, patch_sum, n_patch_rows)

    def forward(self, student_cls, student_patch, teacher_cls, teacher_patch, masks, epoch):
        """Shapes: student_cls [(2+L)B, K] crop-major, student_patch [2B, N, K2],
        teacher_cls [2B, K], teacher_patch [2B, N, K2], masks [2B, N] bool.

        Returns {"loss", "cls", "patch"} (fp32 scalars, loss == cls + patch) and then
        updates the centers with this step's teacher outputs.
        """
        self.finish_center_update()
        tt, tt2 = self.teacher_temp(epoch), self.teacher_patch_temp(epoch)
        if self.impl == "reference":
            cls = self._cls_loss_reference(student_cls, teacher_cls, tt)
            patch = self._patch_loss_reference(student_patch, teacher_patch, masks, tt2)
        else:
            cls = self._cls_loss_fast(student_cls, teacher_cls, tt)
            patch = self._patch_loss_fast(student_patch, teacher_patch, masks, tt2)
        cls, patch = self.lambda1 * cls, self.lambda2 * patch
        self._update_centers(teacher_cls, _fp32(teacher_patch).mean(1).sum(0),
                             teacher_patch.shape[0])
        return {"loss": cls + patch, "cls": cls, "patch": patch}

    def forward_masked(self, student_cls, student_patch, teacher_cls, teacher_patch,
                       row_weight, n_rows, epoch, patch_sum=None, last_layers=None):
        """The fast path's loss on the masked rows only (same terms as `forward`).

        student_cls [(2+L)B, K], teacher_cls [2B, K]; student_patch / teacher_patch [M, K2]
        logits of the masked rows (the same rows for both), or with `last_layers` their
        bottleneck features [M, D]; row_weight [M] (`MaskedRows.weight`: 0 on padding);
        n_rows the number of real rows. center2 is updated from `patch_sum` (sum over the
        2B crops of the mean teacher patch logit, center2_from=all) when given, else from
        the teacher rows themselves (center2_from=masked, a mean over masked tokens).
        last_layers: ((v_s, g_s), (v_t, g_t)) of the student's and teacher's last_layer2
        for the fused last layer + loss kernel (`ibot_fast.kernels.fused_head_ce`).
        """
        from ibot_fast.kernels import centered_softmax_ce_and_colsum, fused_head_ce

        self.finish_center_update()
        tt, tt2 = self.teacher_temp(epoch), self.teacher_patch_temp(epoch)
        cls = self.lambda1 * self._cls_loss_fast(student_cls, teacher_cls, tt)
        if last_layers is None:
            t, c, temp = self.teacher_args(teacher_patch, self.center2, tt2, row_weight > 0)
            rows, colsum = centered_softmax_ce_and_colsum(
                student_patch, t, c, self.student_temp, temp, weight=row_weight)
        else:
            if self.centering != "center":
                raise ValueError("the fused last layer computes the teacher logits on chip: "
                                 "it needs centering='center'")
            (v_s, g_s), (v_t, g_t) = last_layers
            rows, colsum = fused_head_ce(student_patch, v_s, g_s, teacher_patch.detach(),
                                         v_t.detach(), g_t.detach(), self.center2,
                                         self.student_temp, tt2, weight=row_weight)
        patch = self.lambda2 * rows.sum()
        if patch_sum is None:
            self._update_centers(teacher_cls, colsum, n_rows)
        else:
            self._update_centers(teacher_cls, patch_sum, teacher_cls.shape[0])
        return {"loss": cls + patch, "cls": cls, "patch": patch}

    def _cls_loss_reference(self, student_cls, teacher_cls, tt):
        """Official eager formula: mean over the (2 x (n_crops - 1)) CLS terms."""
        s = (_fp32(student_cls) / self.student_temp).chunk(self.n_crops)
        t, c, temp = self.teacher_args(teacher_cls, self.center, tt)
        self._cls_target = (t, c, temp)
        t = F.softmax((_fp32(t) - c) / temp, dim=-1).detach().chunk(N_GLOBAL)
        total, n_terms = 0.0, 0
        for q in range(N_GLOBAL):
            for v in range(self.n_crops):
                if v != q:
                    total = total + torch.sum(-t[q] * F.log_softmax(s[v], dim=-1), -1).mean()
                    n_terms += 1
        return total / n_terms

    def _patch_loss_reference(self, student_patch, teacher_patch, masks, tt2):
        """Official eager formula over every patch token, weighted by the masks."""
        s = (_fp32(student_patch) / self.student_temp).chunk(N_GLOBAL)
        K2 = teacher_patch.shape[-1]
        t, c, temp = self.teacher_args(teacher_patch.reshape(-1, K2), self.center2, tt2,
                                       masks.reshape(-1))
        t = F.softmax((_fp32(t) - c) / temp, dim=-1).detach()
        t = t.view_as(teacher_patch).chunk(N_GLOBAL)
        m = masks.to(s[0].dtype).chunk(N_GLOBAL)
        total = 0.0
        for q in range(N_GLOBAL):
            per_patch = torch.sum(-t[q] * F.log_softmax(s[q], dim=-1), dim=-1)
            per_image = (per_patch * m[q]).sum(-1) / m[q].sum(-1).clamp(min=1.0)
            total = total + per_image.mean()
        return total / N_GLOBAL

    def _cls_loss_fast(self, student_cls, teacher_cls, tt):
        """All CLS terms in one kernel call: row (q, v, b) pairs student crop v, image b
        with teacher crop q, weighted 1 / (B * n_terms)."""
        from ibot_fast.kernels import centered_softmax_ce

        B = teacher_cls.shape[0] // N_GLOBAL
        pairs = [(q, v) for q in range(N_GLOBAL) for v in range(self.n_crops) if v != q]
        s_rows = torch.cat([student_cls[v * B:(v + 1) * B] for _, v in pairs])
        # s_rows is a fresh buffer read by nothing else: the kernel may write the gradient
        # into it during the forward (no separate gradient buffer, teacher rows freed)
        t, c, temp = self.teacher_args(teacher_cls, self.center, tt)
        self._cls_target = (t, c, temp)
        t_rows = torch.cat([t[q * B:(q + 1) * B] for q, _ in pairs])
        rows = centered_softmax_ce(s_rows, t_rows, c, self.student_temp, temp, inplace_grad=True)
        return rows.sum() / (B * len(pairs))

    def _patch_loss_fast(self, student_patch, teacher_patch, masks, tt2):
        """Full-token patch term through the kernel: each patch row weighted by
        m_i / max(1, sum m) / (B * n_terms)."""
        from ibot_fast.kernels import centered_softmax_ce

        B = masks.shape[0] // N_GLOBAL
        weight = masks.float() / masks.float().sum(-1, keepdim=True).clamp(min=1.0)
        weight = (weight / (B * N_GLOBAL)).reshape(-1)
        K2 = student_patch.shape[-1]
        t, c, temp = self.teacher_args(teacher_patch.reshape(-1, K2), self.center2, tt2,
                                       masks.reshape(-1))
        rows = centered_softmax_ce(student_patch.reshape(-1, K2), t, c, self.student_temp, temp,
                                   weight=weight)
        return rows.sum()

    # -- centers -------------------------------------------------------------------------

    @torch.no_grad()
    def update_center(self, teacher_cls, patch_sum, n_patch_rows):
        """Start the center update from this step's teacher outputs.

        teacher_cls [2B, K]; patch_sum [K2] = sum over images of the per-image mean patch
        logit (or, for center2_from=masked, the sum over masked rows); n_patch_rows the
        count it divides by. Across processes the sums are all-reduced asynchronously;
        the update lands in `finish_center_update` (next forward, or state_dict), so the
        reduction overlaps the backward pass. Non-finite statistics leave the centers as
        they were.
        """
        counts = self.center.new_empty(2)  # filled on the device: no copy from the host
        counts[0], counts[1] = float(teacher_cls.shape[0]), float(n_patch_rows)
        stats = torch.cat([_fp32(teacher_cls.detach()).sum(0).to(self.center.dtype),
                           patch_sum.detach().to(self.center.dtype), counts])
        # the counts are summed with the statistics: with center2_from=masked and the
        # i.i.d. sampler each process has its own number of masked rows
        work = dist.all_reduce(stats, async_op=True) if _distributed() else None
        self._pending = (work, stats)
        if work is None:
            self.finish_center_update()

    @torch.no_grad()
    def finish_center_update(self):
        if self._pending is None:
            return
        work, stats = self._pending
        self._pending = None
        if work is not None:
            work.wait()
        K, K2 = self.center.numel(), self.center2.numel()
        n_cls, n_patch = stats[K + K2], stats[K + K2 + 1].clamp(min=1.0)
        ok = torch.isfinite(stats).all()
        new_c = self.center * self.center_momentum + stats[:K] / n_cls * (1 - self.center_momentum)
        new_c2 = (self.center2 * self.center_momentum2 +
                  stats[K:K + K2] / n_patch * (1 - self.center_momentum2))
        # new tensors, not in-place writes: the previous centers may still be saved for
        # the backward pass of this step's loss
        self.center = torch.where(ok, new_c, self.center)
        self.center2 = torch.where(ok, new_c2, self.center2)

    def state_dict(self, *args, **kwargs):
        self.finish_center_update()
        return super().state_dict(*args, **kwargs)


def build_loss(cfg, impl: str = None) -> IBOTLoss:
    c = cfg.loss
    return IBOTLoss(
        out_dim=cfg.model.out_dim, patch_out_dim=cfg.model.patch_out_dim,
        n_local_crops=cfg.data.n_local, warmup_teacher_temp=c.warmup_teacher_temp,
        teacher_temp=c.teacher_temp, warmup_teacher_patch_temp=c.warmup_teacher_patch_temp,
        teacher_patch_temp=c.teacher_patch_temp,
        warmup_teacher_temp_epochs=c.warmup_teacher_temp_epochs, n_epochs=cfg.train.epochs,
        student_temp=c.student_temp, center_momentum=c.center_momentum,
        center_momentum2=c.center_momentum2, lambda1=c.lambda1, lambda2=c.lambda2,
        impl=impl or cfg.train.impl, centering=c.centering,
        mim_start_epoch=cfg.masks.pred_start_epoch if cfg.masks.enabled else 0)

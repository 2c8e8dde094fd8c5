"""IBOTLoss against the loop-written docs/design.md §1.4 (ibot_fast.reference.loss)."""
import numpy as np
import pytest
import torch

from ibot_fast.config import build_config
from ibot_fast.loss import IBOTLoss, build_loss
from ibot_fast.reference.loss import center_update_loop, ibot_loss_loop

B, N, K, K2 = 3, 6, 17, 11


def make_loss(n_local, impl="reference", **kw):
    args = dict(out_dim=K, patch_out_dim=K2, n_local_crops=n_local, warmup_teacher_temp=0.04,
                teacher_temp=0.07, warmup_teacher_patch_temp=0.04, teacher_patch_temp=0.07,
                warmup_teacher_temp_epochs=5, n_epochs=10, student_temp=0.1,
                center_momentum=0.9, center_momentum2=0.8, impl=impl)
    args.update(kw)
    return IBOTLoss(**args).double()


def make_inputs(n_local, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    student_cls = torch.randn((2 + n_local) * B, K, generator=g, dtype=dtype) * 3
    student_patch = torch.randn(2 * B, N, K2, generator=g, dtype=dtype) * 3
    teacher_cls = torch.randn(2 * B, K, generator=g, dtype=dtype) * 3
    teacher_patch = torch.randn(2 * B, N, K2, generator=g, dtype=dtype) * 3
    masks = torch.rand(2 * B, N, generator=g) < 0.4
    masks[1] = False  # an unmasked image in crop 0
    masks[B + 2] = False  # and one in crop 1
    masks[0, :2] = True
    return student_cls, student_patch, teacher_cls, teacher_patch, masks


@pytest.mark.parametrize("n_local", [0, 1, 3])
@pytest.mark.parametrize("epoch", [0, 2, 7])
def test_loss_equals_loop(n_local, epoch):
    loss = make_loss(n_local)
    loss.center.normal_()
    loss.center2.normal_()
    s_cls, s_patch, t_cls, t_patch, masks = make_inputs(n_local, seed=epoch)
    s_cls.requires_grad_(True)
    s_patch.requires_grad_(True)
    expected = ibot_loss_loop(s_cls, s_patch, t_cls, t_patch, masks, loss.center.clone(),
                              loss.center2.clone(), 0.1, loss.teacher_temp(epoch),
                              loss.teacher_patch_temp(epoch))
    g_expected = torch.autograd.grad(expected["loss"], [s_cls, s_patch])
    out = loss(s_cls, s_patch, t_cls, t_patch, masks, epoch)
    for key in ("loss", "cls", "patch"):
        torch.testing.assert_close(out[key], expected[key], rtol=1e-12, atol=1e-12)
    assert torch.equal(out["loss"], out["cls"] + out["patch"])
    g_out = torch.autograd.grad(out["loss"], [s_cls, s_patch])
    for a, b in zip(g_out, g_expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_term_counts_with_ten_local_crops():
    """22 CLS terms and 2 MIM terms: with identical rows every CLS term is equal, so the
    CLS loss equals one term, whatever the count; the weights must sum to one."""
    loss = make_loss(10)
    s_cls, s_patch, t_cls, t_patch, masks = make_inputs(10)
    s_cls = s_cls[:B].repeat(12, 1)
    t_cls = s_cls[:B].repeat(2, 1)
    out = loss(s_cls, s_patch, t_cls, t_patch, masks, 0)
    one = ibot_loss_loop(s_cls[:2 * B], s_patch, t_cls, t_patch, masks,
                         torch.zeros(K, dtype=torch.float64), torch.zeros(K2, dtype=torch.float64),
                         0.1, 0.04, 0.04)
    torch.testing.assert_close(out["cls"], one["cls"])


def test_no_gradient_reaches_teacher():
    loss = make_loss(2)
    s_cls, s_patch, t_cls, t_patch, masks = make_inputs(2)
    for t in (s_cls, s_patch, t_cls, t_patch):
        t.requires_grad_(True)
    loss(s_cls, s_patch, t_cls, t_patch, masks, 1)["loss"].backward()
    assert t_cls.grad is None and t_patch.grad is None
    assert s_cls.grad is not None and s_patch.grad.abs().sum() > 0


def test_centers_after_two_calls():
    loss = make_loss(1)
    c = torch.zeros(K, dtype=torch.float64)
    c2 = torch.zeros(K2, dtype=torch.float64)
    for seed in (1, 2):
        s_cls, s_patch, t_cls, t_patch, masks = make_inputs(1, seed=seed)
        loss(s_cls, s_patch, t_cls, t_patch, masks, 0)
        c, c2 = center_update_loop(c, c2, t_cls, t_patch, 0.9, 0.8)
    torch.testing.assert_close(loss.center, c, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss.center2, c2, rtol=1e-12, atol=1e-12)


def test_center_is_used_before_update():
    """Each step uses the previous step's center: the first call sees zeros."""
    loss = make_loss(1)
    s_cls, s_patch, t_cls, t_patch, masks = make_inputs(1)
    first = loss(s_cls, s_patch, t_cls, t_patch, masks, 0)["loss"]
    zero = ibot_loss_loop(s_cls, s_patch, t_cls, t_patch, masks,
                          torch.zeros(K, dtype=torch.float64),
                          torch.zeros(K2, dtype=torch.float64), 0.1, 0.04, 0.04)["loss"]
    torch.testing.assert_close(first, zero)
    assert loss.center.abs().sum() > 0


def test_non_finite_teacher_leaves_centers():
    loss = make_loss(0)
    s_cls, s_patch, t_cls, t_patch, masks = make_inputs(0)
    loss(s_cls, s_patch, t_cls, t_patch, masks, 0)
    before = loss.center.clone()
    t_cls[0, 0] = float("nan")
    loss(s_cls, s_patch, t_cls, t_patch, masks, 0)
    assert torch.equal(loss.center, before)


def test_teacher_temperature_schedule():
    loss = make_loss(0, warmup_teacher_temp=0.04, teacher_temp=0.07,
                     warmup_teacher_temp_epochs=4, n_epochs=10)
    assert loss.teacher_temp(0) == pytest.approx(0.04)
    assert loss.teacher_temp(3) == pytest.approx(0.07)
    assert loss.teacher_temp(9) == pytest.approx(0.07)
    assert loss.teacher_temp(1) == pytest.approx(0.05)
    assert loss.teacher_temp(1.5) == pytest.approx(0.055)
    assert loss.teacher_patch_temp(0) == pytest.approx(0.04)
    np.testing.assert_allclose(loss.teacher_temps[:4], [0.04, 0.05, 0.06, 0.07])


def test_the_patch_temperature_waits_for_masking_to_start():
    """Official: with pred_start_epoch > 0 the patch temperature holds its warm-up value
    until masking starts, then warms up; the CLS temperature does not wait."""
    loss = make_loss(0, warmup_teacher_temp=0.04, teacher_temp=0.07,
                     warmup_teacher_temp_epochs=4, n_epochs=10, mim_start_epoch=3)
    np.testing.assert_allclose(loss.teacher_patch_temps,
                               [0.04] * 3 + [0.04, 0.05, 0.06, 0.07] + [0.07] * 3)
    np.testing.assert_allclose(loss.teacher_temps[:4], [0.04, 0.05, 0.06, 0.07])
    temps = ["loss.warmup_teacher_patch_temp=0.04", "loss.teacher_patch_temp=0.07",
             "loss.warmup_teacher_temp_epochs=5", "masks.pred_start_epoch=2"]
    delayed = build_loss(build_config("demo", temps))
    assert [delayed.teacher_patch_temp(e) for e in (1, 2, 4, 6)] == pytest.approx(
        [0.04, 0.04, 0.055, 0.07])
    no_masks = build_loss(build_config("demo", temps + ["masks.enabled=false"]))
    assert no_masks.teacher_patch_temp(4) == pytest.approx(0.07)


def test_unmasked_batch_gives_zero_patch_term():
    loss = make_loss(1)
    s_cls, s_patch, t_cls, t_patch, masks = make_inputs(1)
    out = loss(s_cls, s_patch, t_cls, t_patch, torch.zeros_like(masks), 0)
    assert out["patch"] == 0 and out["cls"] > 0


def assert_same_terms_and_grads(ref, fast, inputs, epoch):
    """Both losses on the same inputs: equal terms and student gradients."""
    s_cls, s_patch, t_cls, t_patch, masks = inputs
    outs, grads = [], []
    for loss in (ref, fast):
        a, b = s_cls.clone().requires_grad_(True), s_patch.clone().requires_grad_(True)
        out = loss(a, b, t_cls, t_patch, masks, epoch)
        grads.append(torch.autograd.grad(out["loss"], [a, b]))
        outs.append(out)
    for key in ("loss", "cls", "patch"):
        torch.testing.assert_close(outs[1][key], outs[0][key], rtol=1e-5, atol=1e-5)
    # gradients reach ~1 here; the kernels evaluate exp as exp2(x * log2 e), as a GPU does,
    # so fp32 rounding of the exponents leaves a few 1e-6 (test_kernel_centered_ce's table)
    for g_fast, g_ref in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n_local", [0, 2])
def test_fast_impl_equals_reference(n_local):
    """The kernel path (under the Triton interpreter on the CPU) gives the same terms,
    student gradients and centers as the eager reference."""
    ref, fast = make_loss(n_local).float(), make_loss(n_local, impl="fast").float()
    for step in range(2):
        inputs = [x.float() if x.is_floating_point() else x
                  for x in make_inputs(n_local, seed=10 + step)]
        assert_same_terms_and_grads(ref, fast, inputs, step)
    torch.testing.assert_close(fast.center, ref.center)
    torch.testing.assert_close(fast.center2, ref.center2)


def entropies_after(loss, teacher_cls, epoch=7):
    """cls_target_entropies after one forward with these teacher CLS logits [2B, K]."""
    s_cls, s_patch, _, t_patch, masks = make_inputs(0)
    loss(s_cls, s_patch, teacher_cls, t_patch, masks, epoch)
    return loss.cls_target_entropies()


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_cls_target_entropies_tell_the_two_collapses_from_learning(impl):
    """Equal logits (the uniform collapse): both entropies ln K; every image on one
    prototype (the other collapse): both 0; each image on its own prototype: 0 per image
    and ln(2B) for the batch; random logits: the entropy of the centred, sharpened softmax
    the loss uses, against a direct computation."""
    assert make_loss(0, impl=impl).cls_target_entropies() == {}  # no step yet
    lnK = np.log(K)
    e = entropies_after(make_loss(0, impl=impl), torch.zeros(2 * B, K, dtype=torch.float64))
    assert e["cls_target_entropy"] == pytest.approx(lnK)
    assert e["cls_target_batch_entropy"] == pytest.approx(lnK)
    one = torch.zeros(2 * B, K, dtype=torch.float64)
    one[:, 3] = 5.0  # 5 / 0.07 apart: the others get exp(-71) each
    e = entropies_after(make_loss(0, impl=impl), one)
    assert e["cls_target_entropy"] < 1e-20 and e["cls_target_batch_entropy"] < 1e-20
    own = 5.0 * torch.eye(2 * B, K, dtype=torch.float64)
    e = entropies_after(make_loss(0, impl=impl), own)
    assert e["cls_target_entropy"] < 1e-20
    assert e["cls_target_batch_entropy"] == pytest.approx(np.log(2 * B))
    loss = make_loss(0, impl=impl)
    t = make_inputs(0, seed=3)[2]
    loss.center = torch.randn(K, dtype=torch.float64)
    c = loss.center.clone()
    e = entropies_after(loss, t, epoch=2)
    p = torch.softmax((t - c) / loss.teacher_temp(2), dim=-1)  # the center before the step
    assert e["cls_target_entropy"] == pytest.approx(float(-(p * p.log()).sum(-1).mean()))
    m = p.mean(0)
    assert e["cls_target_batch_entropy"] == pytest.approx(float(-(m * m.log()).sum()))


def test_cls_target_entropies_under_sinkhorn_are_those_of_its_targets():
    """With centering="sinkhorn" the entropies are those of the Sinkhorn-Knopp targets,
    whose batch mean is near uniform by construction (every prototype gets equal mass)."""
    from ibot_fast.loss import sinkhorn_knopp

    t = make_inputs(0, seed=3)[2]
    e = entropies_after(make_loss(0, centering="sinkhorn"), t, epoch=2)
    p = sinkhorn_knopp(t, make_loss(0).teacher_temp(2))
    assert e["cls_target_entropy"] == pytest.approx(float(-(p * p.log()).sum(-1).mean()))
    m = p.mean(0)
    assert e["cls_target_batch_entropy"] == pytest.approx(float(-(m * m.log()).sum()))
    assert e["cls_target_batch_entropy"] > 0.9 * np.log(K) > e["cls_target_entropy"]


# -- Sinkhorn-Knopp centering (DINOv2 option) ---------------------------------------------

def test_sinkhorn_knopp_balances_prototypes_over_valid_rows():
    from ibot_fast.loss import sinkhorn_knopp
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, K, generator=g, dtype=torch.float64) * 0.3
    valid = torch.rand(40, generator=g) < 0.7
    q = sinkhorn_knopp(logits, 0.05, n_iters=200, valid=valid)
    torch.testing.assert_close(q.sum(1), torch.ones(40, dtype=q.dtype))
    n = int(valid.sum())
    torch.testing.assert_close(q[valid].sum(0), torch.full((K,), n / K, dtype=q.dtype),
                               rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(q[~valid], torch.full_like(q[~valid], 1.0 / K))
    # padding rows change nothing for the valid ones
    torch.testing.assert_close(sinkhorn_knopp(logits[valid], 0.05, n_iters=200), q[valid])
    # the default 3 iterations already spread the mass more evenly than the softmax does
    soft = torch.softmax(logits / 0.05, -1).sum(0)
    q3 = sinkhorn_knopp(logits, 0.05).sum(0)
    assert q3.std() < 0.75 * soft.std()


def _sinkhorn_loss_loop(s_cls, s_patch, t_cls, t_patch, masks, n_local, tt, tt2, ts=0.1):
    """§1.4 with the teacher targets replaced by Sinkhorn-Knopp, written as loops."""
    from ibot_fast.loss import sinkhorn_knopp
    n_crops = 2 + n_local
    q_cls = sinkhorn_knopp(t_cls, tt)
    flat = t_patch.reshape(-1, t_patch.shape[-1])
    q_patch = sinkhorn_knopp(flat, tt2, valid=masks.reshape(-1)).view_as(t_patch)
    cls_terms = []
    for q in range(2):
        for v in range(n_crops):
            if v == q:
                continue
            per_image = [-(q_cls[q * B + b] *
                           torch.log_softmax(s_cls[v * B + b] / ts, -1)).sum()
                         for b in range(B)]
            cls_terms.append(sum(per_image) / B)
    patch_terms = []
    for q in range(2):
        per_image = []
        for b in range(B):
            i = q * B + b
            ce = -(q_patch[i] * torch.log_softmax(s_patch[i] / ts, -1)).sum(-1)
            per_image.append((ce * masks[i]).sum() / max(1, int(masks[i].sum())))
        patch_terms.append(sum(per_image) / B)
    return sum(cls_terms) / len(cls_terms), sum(patch_terms) / 2


@pytest.mark.parametrize("n_local", [0, 2])
def test_sinkhorn_centering_equals_loop_and_keeps_centers(n_local):
    loss = make_loss(n_local, centering="sinkhorn")
    s_cls, s_patch, t_cls, t_patch, masks = make_inputs(n_local, seed=5)
    s_cls.requires_grad_(True)
    t_cls.requires_grad_(True)
    out = loss(s_cls, s_patch, t_cls, t_patch, masks, epoch=7)
    cls, patch = _sinkhorn_loss_loop(s_cls, s_patch, t_cls.detach(), t_patch, masks, n_local,
                                     0.07, 0.07)
    torch.testing.assert_close(out["cls"], cls)
    torch.testing.assert_close(out["patch"], patch)
    out["loss"].backward()
    assert t_cls.grad is None and s_cls.grad is not None
    assert not loss.center.any() and not loss.center2.any()  # no centers are kept


@pytest.mark.parametrize("n_local", [0, 2])
def test_sinkhorn_fast_impl_equals_reference(n_local):
    ref = make_loss(n_local, centering="sinkhorn").float()
    fast = make_loss(n_local, impl="fast", centering="sinkhorn").float()
    inputs = [x.float() if x.is_floating_point() else x for x in make_inputs(n_local, 9)]
    assert_same_terms_and_grads(ref, fast, inputs, 1)


def test_unknown_centering_is_an_error():
    with pytest.raises(ValueError, match="centering"):
        make_loss(0, centering="softmax")


def koleo_loop(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo written out: each L2-normalised row's distance to its nearest other row."""
    u = [row / max(row.norm(), eps) for row in x.double()]
    terms = []
    for i, ui in enumerate(u):
        nearest = min((uj for j, uj in enumerate(u) if j != i),
                      key=lambda uj: (ui - uj).norm())
        terms.append(-torch.log((ui - nearest + eps).norm() + eps))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("rows,dim", [(2, 3), (7, 16), (33, 64)])
def test_koleo_equals_loop_and_ignores_row_scale(rows, dim):
    from ibot_fast.loss import koleo_loss

    g = torch.Generator().manual_seed(rows * 1000 + dim)
    x = torch.randn(rows, dim, dtype=torch.float64, generator=g)
    torch.testing.assert_close(koleo_loss(x), koleo_loop(x))
    scaled = x * torch.rand(rows, 1, dtype=torch.float64, generator=g).add(0.5)
    torch.testing.assert_close(koleo_loss(scaled), koleo_loss(x))
    assert koleo_loss(x.float()).dtype == torch.float32


def test_koleo_gradient():
    """Against finite differences (the nearest neighbours are fixed near a random point)."""
    from ibot_fast.loss import koleo_loss

    g = torch.Generator().manual_seed(9)
    x = torch.randn(9, 5, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(koleo_loss, (x,))
    koleo_loss(x).backward()
    assert x.grad.abs().sum() > 0

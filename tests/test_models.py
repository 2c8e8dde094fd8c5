"""ViT backbone and iBOT head (docs/design.md §1.3)."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ibot_fast.config import build_config
from ibot_fast.models import IBOTHead, build_student_teacher
from ibot_fast.models.vit import resize_pos_embed, vit


def test_mask_token_replaces_patch_embedding_before_position():
    torch.manual_seed(0)
    model = vit("vit_demo", 32, 4)
    with torch.no_grad():
        model.mask_token.normal_()
    x = torch.randn(3, 3, 32, 32)
    mask = torch.rand(3, 64) < 0.4
    tokens = model.prepare_tokens(x, mask)
    pos = model.pos_embed[0, 1:]
    plain = model.patch_embed(x) + pos
    expected = torch.where(mask[..., None], model.mask_token + pos, plain)
    torch.testing.assert_close(tokens[:, 1:], expected)
    torch.testing.assert_close(tokens[:, 0], (model.cls_token + model.pos_embed[:, :1])[0].expand(3, -1))


def test_mask_token_starts_at_zero_and_gets_gradient():
    model = vit("vit_demo", 32, 4)
    assert torch.count_nonzero(model.mask_token) == 0
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[0, :5] = True
    model(torch.randn(2, 3, 32, 32), mask).sum().backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0


@pytest.mark.parametrize("arch,dim,params", [("vit_tiny", 192, 5.52e6), ("vit_small", 384, 21.7e6)])
@pytest.mark.parametrize("size,tokens", [(224, 197), (96, 37)])
def test_vit_shapes(arch, dim, params, size, tokens):
    model = vit(arch, 224, 16)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=0.02)
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size))
    assert out.shape == (1, tokens, dim)


def bicubic_matrix(n_in: int, n_out: int, step: float) -> torch.Tensor:
    """[n_out, n_in] weights of bicubic sampling (Keys, a = -0.75, edges clamped) at
    positions step x (i + 0.5) - 0.5: written out, not torch's kernel."""
    a = -0.75

    def kernel(x):
        x = abs(x)
        if x <= 1:
            return ((a + 2) * x - (a + 3)) * x * x + 1
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a if x < 2 else 0.0

    weights = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        pos = step * (i + 0.5) - 0.5
        base = math.floor(pos)
        for j in range(-1, 3):
            weights[i, min(max(base + j, 0), n_in - 1)] += kernel(j - (pos - base))
    return weights


@pytest.mark.parametrize("side, h, w", [(14, 6, 6), (8, 4, 4), (8, 5, 5), (14, 6, 9)])
def test_position_embeddings_are_resampled_as_the_official_code_does(side, h, w):
    """The official interpolate_pos_encoding samples the 14 x 14 table every 14 / 6.1
    cells for a 6 x 6 grid (scale factor (6 + 0.1) / 14), not every 14 / 6; rows by
    the grid's height, columns by its width."""
    pos = torch.randn(1, 1 + side * side, 8, dtype=torch.float64)
    got = resize_pos_embed(pos, h, w)
    assert got.shape == (1, 1 + h * w, 8) and torch.equal(got[:, 0], pos[:, 0])
    grid = pos[0, 1:].reshape(side, side, 8)
    rows, cols = (bicubic_matrix(side, n, side / (n + 0.1)) for n in (h, w))
    expected = torch.einsum("oi,ijc,pj->opc", rows, grid, cols).reshape(-1, 8)
    torch.testing.assert_close(got[0, 1:], expected, rtol=1e-5, atol=1e-5)  # fp32 inside
    rows, cols = (bicubic_matrix(side, n, side / n) for n in (h, w))
    other = torch.einsum("oi,ijc,pj->opc", rows, grid, cols).reshape(-1, 8)
    assert (other - expected).abs().max() > 0.05  # the two rules differ
    assert resize_pos_embed(pos, side, side) is pos


def test_stochastic_depth_only_in_training():
    torch.manual_seed(0)
    model = vit("vit_demo", 32, 4, drop_path_rate=0.5)
    x = torch.randn(8, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        a, b = model(x), model(x)
    assert not torch.allclose(a, b)
    rates = [blk.drop_path for blk in model.blocks]
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.5)


def test_student_and_teacher():
    cfg = build_config("demo", ["model.patch_size=4"])  # the 8x8 grid of the masks below
    student, teacher = build_student_teacher(cfg)
    assert all(b.drop_path == 0 for b in teacher.backbone.blocks)
    assert student.backbone.blocks[-1].drop_path == pytest.approx(cfg.model.drop_path_rate)
    assert not any(p.requires_grad for p in teacher.parameters())
    for (n1, p1), (n2, p2) in zip(student.named_parameters(), teacher.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    g = torch.randn(4, 3, 32, 32)
    local = torch.randn(6, 3, 16, 16)
    masks = torch.rand(4, 64) < 0.3
    cls, patch, _ = student(g, masks, local)
    assert cls.shape == (10, cfg.model.out_dim) and patch.shape == (4, 64, cfg.model.patch_out_dim)
    cls, patch, _ = teacher(g)
    assert cls.shape == (4, cfg.model.out_dim)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_head_last_layers(shared, norm_last_layer):
    head = IBOTHead(32, out_dim=50, patch_out_dim=50 if shared else 40, hidden_dim=64,
                    bottleneck_dim=16, shared_head=shared, norm_last_layer=norm_last_layer)
    assert (head.last_layer2 is head.last_layer) == shared
    assert head.last_layer.weight_g.requires_grad == (not norm_last_layer)
    assert torch.equal(head.last_layer.weight_g, torch.ones(50, 1))
    cls, patch = head(torch.randn(2, 5, 32))
    assert cls.shape == (2, 50) and patch.shape == (2, 4, 50 if shared else 40)
    # weight-normalised rows have norm g
    w = head.last_layer.weight()
    torch.testing.assert_close(w.norm(dim=1), torch.ones(50))
    # the bottleneck features are unit vectors
    torch.testing.assert_close(head.features(torch.randn(3, 32)).norm(dim=-1), torch.ones(3))
    names = [n for n, _ in head.named_parameters()]
    assert ("last_layer2.weight_v" in names) == (not shared)


def test_residual_fp32_keeps_the_stream_closer_to_fp64():
    """Under bf16 autocast the residual stream runs in bf16 by default (DINOv2) and in
    fp32 with residual_fp32 (the official code under AMP): every block's output is then
    fp32, and the backbone's output and gradients are closer to an fp64 run."""
    torch.manual_seed(0)
    truth_model = vit("vit_demo", 32, 4).double()
    errors = {False: torch.zeros(2), True: torch.zeros(2)}
    # errors summed over three inputs: one bf16 GEMM's rounding (AVX-512 BF16 or not)
    # moves a single measurement by ~5%
    for _ in range(3):
        x = torch.randn(8, 3, 32, 32, dtype=torch.float64)
        w = torch.randn(128, dtype=torch.float64)
        truth = truth_model(x)
        truth_grad = torch.autograd.grad((truth * w).sum(), truth_model.pos_embed)[0]
        for fp32 in (False, True):
            model = vit("vit_demo", 32, 4, residual_fp32=fp32)
            model.load_state_dict(truth_model.state_dict())
            dtypes = []
            for block in model.blocks:
                block.register_forward_hook(lambda mod, i, o: dtypes.append(o.dtype))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x.float())
            grad = torch.autograd.grad((out.double() * w).sum(), model.pos_embed)[0]
            assert set(dtypes) == {torch.float32 if fp32 else torch.bfloat16}
            errors[fp32] += torch.stack([(out.double() - truth).norm() / truth.norm(),
                                         (grad.double() - truth_grad).norm() /
                                         truth_grad.norm()]).float()
    assert errors[True][0] < 0.7 * errors[False][0], errors
    assert errors[True][1] <= errors[False][1], errors
    student, teacher = build_student_teacher(build_config("demo", ["model.residual_fp32=true"]))
    assert student.backbone.residual_fp32 and teacher.backbone.residual_fp32


def test_layernorm_in_the_compute_dtype_skips_the_fp32_round_trip():
    """model.layernorm_fp32=false: under autocast (CUDA's fp32 policy, replayed on the
    CPU) a bf16 input gives a bf16 output, computed by F.layer_norm on the bf16 input with
    bf16 weight and bias (values and every gradient), where the default gives autocast's
    fp32 LayerNorm of the same input. Outside autocast, or on an fp32 input
    (residual_fp32), it is nn.LayerNorm."""
    from benchmarks.cuda_autocast import CudaAutocastPolicy
    from ibot_fast.models.vit import LayerNorm

    torch.manual_seed(0)
    x = (3 * torch.randn(37, 64) + 1).bfloat16().requires_grad_()
    dy = torch.randn(37, 64).bfloat16()
    norms = {fp32: LayerNorm(64, fp32=fp32) for fp32 in (True, False)}
    with torch.no_grad():
        for ln in norms.values():  # the same, non-trivial affine parameters
            ln.weight.copy_(1 + 0.3 * torch.randn(64, generator=torch.Generator().manual_seed(1)))
            ln.bias.copy_(0.3 * torch.randn(64, generator=torch.Generator().manual_seed(2)))
    with torch.autocast("cpu", dtype=torch.bfloat16), CudaAutocastPolicy():
        outs = {fp32: ln(x) for fp32, ln in norms.items()}
    assert outs[True].dtype == torch.float32 and outs[False].dtype == torch.bfloat16
    ln = norms[True]
    torch.testing.assert_close(outs[True], torch.nn.functional.layer_norm(
        x.float(), (64,), ln.weight, ln.bias, 1e-6))
    w, b = (p.detach().bfloat16().requires_grad_() for p in (ln.weight, ln.bias))
    x2 = x.detach().requires_grad_()
    expected = torch.nn.functional.layer_norm(x2, (64,), w, b, 1e-6)
    assert torch.equal(outs[False], expected)
    got = torch.autograd.grad(outs[False], (x, norms[False].weight, norms[False].bias), dy)
    want = torch.autograd.grad(expected, (x2, w, b), dy)
    assert got[1].dtype == got[2].dtype == torch.float32  # the fp32 parameters' gradients
    for g, e in zip(got, want):
        assert torch.equal(g, e.to(g.dtype))
    # no autocast, or an fp32 input (residual_fp32): the plain nn.LayerNorm
    plain = torch.nn.LayerNorm(64, eps=1e-6)
    plain.load_state_dict(norms[False].state_dict())
    x32 = torch.randn(5, 64)
    assert torch.equal(norms[False](x32), plain(x32))
    with torch.autocast("cpu", dtype=torch.bfloat16), CudaAutocastPolicy():
        y = norms[False](x32)
    assert y.dtype == torch.float32 and torch.equal(y, plain(x32))


class Casts(TorchDispatchMode):
    """dtype conversions (`_to_copy` or `copy_` into another dtype) by kind: `parameters`
    (the output has the shape of a parameter of `params`: autocast's weight and bias
    casts, and their gradients' way back to fp32), `activations` (more elements than
    `tokens`), `small` (the rest: per-sample drop-path masks and scales, single tokens)."""

    def __init__(self, tokens: int, params):
        super().__init__()
        self.tokens, self.shapes = tokens, {tuple(p.shape) for p in params}
        self.kinds = {"activations": 0, "parameters": 0, "small": 0}
        self.seen = []  # the shapes cast, in order

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        source = args[1] if name == "copy_" else args[0]
        if name in ("_to_copy", "copy_") and source.dtype != out.dtype:
            kind = "parameters" if tuple(out.shape) in self.shapes else \
                "activations" if out.numel() > self.tokens else "small"
            self.kinds[kind] += 1
            self.seen.append(tuple(out.shape))
        return out


def block_casts(layernorm_fp32: bool, residual_fp32: bool, efficient: bool, pack: bool):
    """(forward, backward) Casts.kinds of one student block (stochastic depth 0.2) under
    bf16 autocast with CUDA's fp32 policy (replayed on the CPU), in the trainer's
    setting: the stream in bf16 (or fp32), one autocast region with its weight cache."""
    from benchmarks.cuda_autocast import CudaAutocastPolicy
    from ibot_fast.models.attention import Seqs
    from ibot_fast.models.vit import Block

    torch.manual_seed(0)
    block = Block(64, 4, drop_path=0.2, backend="sdpa", efficient_drop_path=efficient,
                  layernorm_fp32=layernorm_fp32)
    seqs = Seqs([(4, 17), (6, 5)]) if pack else None
    x = torch.randn(*((seqs.total,) if pack else (4, 17)), 64, requires_grad=True,
                    dtype=torch.float32 if residual_fp32 else torch.bfloat16)
    tokens = x.numel() // 64
    with torch.autocast("cpu", dtype=torch.bfloat16), CudaAutocastPolicy():
        with Casts(tokens, block.parameters()) as forward:
            y = block(x, seqs)
    grad = torch.randn_like(y)
    with Casts(tokens, block.parameters()) as backward:
        y.backward(grad)
    return forward.kinds, backward.kinds


# Per block, forward and backward: (activations, parameters, small) dtype conversions.
# - parameters: autocast casts the 4 linear layers' weights and biases to bf16 (once per
#   autocast region: its cache), and their gradients come back to fp32; bf16 LayerNorms
#   cast their own weight and bias (CUDA's kernel wants the input's dtype) and get 4 more.
# - activations: autocast's fp32 LayerNorm casts its bf16 input up and the next linear
#   casts its output down (2 per LayerNorm, and their gradients back); an fp32 stream
#   (residual_fp32) is cast down before each linear and the branches' bf16 gradients
#   come from the fp32 adds. With bf16 LayerNorms and stream: none.
# - small: the two drop-path masks (one value per sample, bool -> the stream's dtype: a
#   launch each, no traffic; fused under torch.compile). The efficient drop path's
#   scales are made in the stream's dtype: no cast.
CASTS_PER_BLOCK = {
    # (layernorm_fp32, residual_fp32): (forward, backward)
    (True, False): ((4, 8, 2), (4, 8, 0)),
    (False, False): ((0, 12, 2), (0, 12, 0)),
    (True, True): ((2, 8, 2), (4, 8, 0)),
    (False, True): ((2, 8, 2), (4, 8, 0)),  # an fp32 input: a plain fp32 LayerNorm
}


@pytest.mark.parametrize("layernorm_fp32,residual_fp32", list(CASTS_PER_BLOCK))
@pytest.mark.parametrize("efficient,pack", [(False, False), (True, True)])
def test_casts_per_block(layernorm_fp32, residual_fp32, efficient, pack):
    """Pins the dtype conversions of a block's forward and backward per precision
    setting (CASTS_PER_BLOCK says where each comes from)."""
    forward, backward = block_casts(layernorm_fp32, residual_fp32, efficient, pack)
    kinds = ("activations", "parameters", "small")
    (fwd, bwd) = CASTS_PER_BLOCK[(layernorm_fp32, residual_fp32)]
    if efficient:  # its subsets replace the two masks
        fwd = fwd[:2] + (0,)
    assert tuple(forward[k] for k in kinds) == fwd
    assert tuple(backward[k] for k in kinds) == bwd


def test_casts_before_the_blocks():
    """prepare_tokens under bf16 autocast casts the patch embedding's weight and bias and
    the images when they are fp32 (DALI's come in bf16), then one row each of the mask
    token, the CLS token and the position table: nothing else with one row per image
    (the CLS token is cast before it is expanded to the batch)."""
    from benchmarks.cuda_autocast import CudaAutocastPolicy

    model = vit("vit_demo", 32, 4)
    masks = torch.rand(3, 64) < 0.3
    once = [(128, 3, 4, 4), (128,), (1, 128), (1, 1, 128), (1, 65, 128)]
    for images in (torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32).bfloat16()):
        with torch.autocast("cpu", dtype=torch.bfloat16), CudaAutocastPolicy():
            with Casts(1, model.patch_embed.parameters()) as casts:
                tokens = model.prepare_tokens(images, masks)
        assert tokens.dtype == torch.bfloat16
        expected = once + ([(3, 3, 32, 32)] if images.dtype == torch.float32 else [])
        assert sorted(casts.seen) == sorted(expected)


def test_layernorm_fp32_key_reaches_every_layernorm():
    for value in (True, False):
        cfg = build_config("demo", [f"model.layernorm_fp32={str(value).lower()}"])
        student, teacher = build_student_teacher(cfg)
        norms = [m for net in (student, teacher) for m in net.modules()
                 if isinstance(m, torch.nn.LayerNorm)]
        assert len(norms) == 2 * (2 * 4 + 1)  # 2 per block, the final one; both networks
        assert {m.fp32 for m in norms} == {value}


@pytest.mark.gpu
def test_layernorm_in_bf16_is_as_accurate_as_autocast_on_the_gpu():
    """On CUDA: ViT-S blocks with bf16 LayerNorms against fp64, output and gradients (the
    input, a LayerNorm weight, a linear weight) within 2x of autocast's fp32 LayerNorm's
    error (flash-attention's rule), plus bf16's rounding of one value."""
    torch.manual_seed(0)
    truth_model = vit("vit_small", 64, 16).double().cuda()
    with torch.no_grad():
        for m in truth_model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.add_(0.2 * torch.randn_like(m.weight))
                m.bias.add_(0.2 * torch.randn_like(m.bias))
    x = torch.randn(16, 3, 64, 64, dtype=torch.float64, device="cuda")
    w = torch.randn(384, dtype=torch.float64, device="cuda")

    def picks(model):
        return [model.blocks[3].norm1.weight, model.blocks[3].norm2.bias,
                model.blocks[5].mlp.fc1.weight, model.pos_embed]

    truth = truth_model(x)
    truth_grads = torch.autograd.grad((truth * w).sum(), picks(truth_model))
    errors = {}
    for fp32 in (True, False):
        model = vit("vit_small", 64, 16, layernorm_fp32=fp32).cuda()
        model.load_state_dict(truth_model.state_dict())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x.float())
        grads = torch.autograd.grad((out.double() * w).sum(), picks(model))
        errors[fp32] = [float((a.double() - b).norm() / b.norm())
                        for a, b in zip((out, *grads), (truth, *truth_grads))]
    print("relative errors vs fp64 (fp32 LayerNorm, bf16 LayerNorm):", errors)
    for bf16_error, fp32_error in zip(errors[False], errors[True]):
        assert bf16_error <= 2 * fp32_error + 2 ** -9, errors


@pytest.mark.gpu
def test_layernorm_in_bf16_is_not_slower_on_the_gpu():
    """The timing half of model.layernorm_fp32's decision (the accuracy half is the test
    above): the packed ViT-B student backbone, forward + backward under bf16 autocast,
    eager, batch 32 with 2 x 224 + 10 x 96 crops, each setting timed with CUDA events
    (median of 10 after 3 warm-ups). bf16 LayerNorms move fewer bytes (no fp32 round
    trip, benchmarks/results/README.md's census: ~10% of an eager step): they must not
    be slower. Prints both times."""
    times = {}
    g = torch.randn(64, 3, 224, 224, device="cuda")
    loc = torch.randn(320, 3, 96, 96, device="cuda")
    for fp32 in (True, False):
        torch.manual_seed(0)
        model = vit("vit_base", 224, 16, drop_path_rate=0.1, attention_backend="sdpa",
                    pack_crops=True, layernorm_fp32=fp32).cuda()
        runs = []
        for i in range(13):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                tg, tl = model.forward_crops(g, None, loc)
            (tg.float().square().mean() + tl.float().square().mean()).backward()
            end.record()
            torch.cuda.synchronize()
            if i >= 3:
                runs.append(start.elapsed_time(end))
        times[fp32] = sorted(runs)[len(runs) // 2]
    print(f"ViT-B packed student fwd+bwd, batch 32: fp32 LayerNorm {times[True]:.2f} ms, "
          f"bf16 LayerNorm {times[False]:.2f} ms ({times[False] / times[True]:.3f}x)")
    assert times[False] <= 1.03 * times[True], times

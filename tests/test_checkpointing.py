"""Activation checkpointing of the student's blocks: same outputs and gradients, fewer
bytes kept for the backward, and (selective) no matmul recomputed."""
import pytest
import torch

from ibot_fast.models.attention import Seqs
from ibot_fast.models.vit import CHECKPOINTING, Block, add_rows, run_block, vit

MODES = [m for m in CHECKPOINTING if m != "none"]


def _model(mode, backend="sdpa", pack=False, efficient=False, dtype=torch.float64):
    torch.manual_seed(0)
    model = vit("vit_demo", 32, 4, drop_path_rate=0.3, attention_backend=backend,
                efficient_drop_path=efficient, pack_crops=pack,
                activation_checkpointing=mode).to(dtype)
    with torch.no_grad():
        model.mask_token.normal_()
    return model


def _inputs(dtype=torch.float64):
    g = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=dtype)
    loc = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(2), dtype=dtype)
    masks = torch.rand(4, 64, generator=torch.Generator().manual_seed(3)) < 0.3
    return g, masks, loc


def _run(model, seed=7):
    """Outputs and every parameter gradient of one forward + backward; drop path drawn
    from `seed`."""
    g, masks, loc = _inputs(next(model.parameters()).dtype)
    torch.manual_seed(seed)
    tg, tl = model.forward_crops(g, masks, loc)
    w = torch.linspace(-1, 1, tg.shape[-1], dtype=tg.dtype)
    loss = (tg * w).sum() + (tl * w).square().sum()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return tg.detach(), tl.detach(), grads


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend,pack,efficient", [
    ("sdpa", False, False), ("math", False, False), ("sdpa", True, False),
    ("sdpa", False, True), ("math", True, True)])
def test_checkpointing_equals_plain(mode, backend, pack, efficient):
    """Same outputs and gradients as keeping every activation, drop path included (the
    recomputation replays the same random draws)."""
    plain = _run(_model("none", backend, pack, efficient))
    ckpt = _run(_model(mode, backend, pack, efficient))
    for a, b in zip(plain[:2], ckpt[:2]):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    names = [n for n, _ in _model("none").named_parameters()]
    for name, a, b in zip(names, plain[2], ckpt[2]):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=name)
    # a different seed draws different drop paths: the comparison above is not vacuous
    other = _run(_model("none", backend, pack, efficient), seed=8)
    assert not torch.allclose(other[0], plain[0])


def _matmuls(model, op_counter):
    """(forward, backward) counts of matmul ops in one forward + backward."""
    g, masks, loc = _inputs(torch.float32)
    with op_counter() as fwd:
        tg, tl = model.forward_crops(g, masks, loc)
    loss = tg.sum() + tl.square().sum()
    with op_counter() as bwd:
        loss.backward()
    count = lambda c: sum(c.counts.get(k, 0) for k in ("mm", "addmm", "bmm"))  # noqa: E731
    return count(fwd), count(bwd)


@pytest.mark.parametrize("pack", [False, True])
def test_which_matmuls_each_mode_recomputes(op_counter, pack):
    """selective: none; selective_mlp: each block's fc1 once; full: all but fc2 (the
    region ends at fc2's output, which the backward never reads). Math attention: two
    matmuls per sequence group, four linear layers, per block and pass."""
    counts = {m: _matmuls(_model(m, "math", pack, dtype=torch.float32), op_counter)
              for m in CHECKPOINTING}
    none_f, none_b = counts["none"]
    assert all(f == none_f for f, _ in counts.values())
    block_passes = 4 if pack else 8  # 4 blocks x (1 pass packed, 2 unpacked)
    assert none_f == block_passes * 4 + 4 * 2 * 2  # (2 groups packed, 1 group x 2 passes)
    assert counts["selective"][1] == none_b
    assert counts["selective_mlp"][1] == none_b + block_passes
    assert counts["full"][1] == none_b + none_f - block_passes


def _kept_per_token(mode, efficient, pack):
    """Bytes a ViT-S-wide block keeps for its backward per token, in units of dim x 2
    bytes (bf16 autocast, its input included), counted storage by storage."""
    from benchmarks.bench_memory import LiveBytes

    torch.manual_seed(0)
    block = Block(384, 6, drop_path=0.1, backend="sdpa", efficient_drop_path=efficient)
    seqs = Seqs([(10, 197), (20, 37)]) if pack else None  # 9 and 18 drawn: 90%
    shape = (seqs.total, 384) if pack else (30, 50, 384)
    # the outer cast cache off: weight casts kept for the whole autocast region are not
    # activations
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        with LiveBytes() as live:
            x = torch.randn(shape, dtype=torch.bfloat16, requires_grad=True)
            y = run_block(block, x, seqs, mode)
            del x
        kept = live.now - y.untyped_storage().nbytes()
    y.float().sum().backward()
    return kept / y.numel() / 2


@pytest.mark.parametrize("efficient,pack", [(False, False), (True, True)])
def test_bytes_each_mode_keeps_per_token(efficient, pack):
    """The module docstring's table: selective 10 (input 1, qkv 3, attention 1, proj 1,
    fc1 4), selective_mlp 6, full 1; with efficient drop path the branches run on 90% of
    the samples. Neither fc2's output nor (efficient) the residual branch scattered by
    index_add is kept."""
    kept = {m: _kept_per_token(m, efficient, pack) for m in CHECKPOINTING}
    branch = 0.9 if efficient else 1.0
    assert kept["full"] == pytest.approx(1.0, abs=0.05)
    assert kept["selective"] == pytest.approx(1 + 9 * branch, abs=0.1)
    assert kept["selective_mlp"] == pytest.approx(1 + 5 * branch, abs=0.1)
    assert kept["none"] > 14  # (its linear layers also keep their weights' bf16 copies)


@pytest.mark.parametrize("shape", [(4, 3), (4, 2, 3)])
def test_add_rows_gradients_and_what_it_keeps(shape):
    """add_rows equals index_add of the scaled rows (values and gradients, fp64; packed
    tokens [T, dim] and samples [B, N, dim]) and keeps the rows and the scale only, not the
    added tensor."""
    x = torch.randn(7, *shape[1:], dtype=torch.float64, requires_grad=True)
    out = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    rows = torch.tensor([5, 0, 2, 6])
    scale = torch.rand(4, dtype=torch.float64) + 0.5
    ref = torch.index_add(x, 0, rows, out * scale.view(-1, *(1,) * (out.dim() - 1)))
    got = add_rows(x, out, rows, scale)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda a, b: add_rows(a, b, rows, scale), (x, out))
    saved = {t.data_ptr() for t in got.grad_fn.saved_tensors}
    assert out.data_ptr() not in saved and rows.data_ptr() in saved


def test_checkpointing_modes_are_validated():
    with pytest.raises(ValueError, match="activation_checkpointing"):
        vit("vit_demo", 32, 4, activation_checkpointing="some")
    block = _model("none").blocks[0]
    with pytest.raises(ValueError, match="activation_checkpointing"):
        run_block(block, torch.randn(2, 5, 128, dtype=torch.float64), None, "all")


def test_compiled_selective_checkpointing_equals_eager():
    """torch.compile of a checkpointed, packed student (inductor on the CPU, ~30 s): the
    same outputs and gradients as the eager model keeping every activation. No drop path:
    compiled random draws differ from eager ones by design."""
    def model(m):
        torch.manual_seed(0)
        net = vit("vit_demo", 32, 4, attention_backend="sdpa", pack_crops=True,
                  activation_checkpointing=m)
        with torch.no_grad():
            net.mask_token.normal_()
        return net

    eager = _run(model("none"))
    compiled = model("selective_mlp")  # its policy matches fc1 / fc2 by traced shapes
    compiled.forward_crops = torch.compile(compiled.forward_crops)
    out = _run(compiled)
    for a, b in zip(eager[:2], out[:2]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    for a, b in zip(eager[2], out[2]):
        assert (b - a).norm() <= 1e-4 * a.norm() + 1e-8


# Checkpointed vs plain gradients under bf16 autocast, measured on the CPU: bit for bit
# when packed (each block runs once) and with full checkpointing; unpacked (the blocks
# run twice in one autocast region) with selective / selective_mlp, fp32 gradients that
# went through bf16 differ by at most one bf16 rounding, u = 2^-8 = 3.9e-3 relative
# (measured: exactly 2^-8 at worst, on ~60% of the elements; the largest ~7e-5 in size,
# so no absolute term).
BF16_GRAD_TOL = 4e-3


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pack", [False, True])
def test_checkpointing_under_bf16_autocast(mode, pack):
    """The trainer's setting: bf16 autocast, the blocks run twice in one autocast region
    when unpacked (global, then local crops). Selective checkpointing must meet in its
    recomputation the same weight casts as in the forward (it failed here with autocast's
    cast cache on); the gradients equal those of keeping every activation."""
    def run(m):
        model = _model(m, "sdpa", pack, True, dtype=torch.float32)
        g, masks, loc = _inputs(torch.float32)
        torch.manual_seed(7)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tg, tl = model.forward_crops(g, masks, loc)
            loss = tg.float().square().mean() + tl.float().square().mean()
        return tg, torch.autograd.grad(loss, list(model.parameters()))

    plain_out, plain = run("none")
    out, grads = run(mode)
    torch.testing.assert_close(out, plain_out, rtol=0, atol=0)  # same casts, same ops
    tol = BF16_GRAD_TOL if not pack and mode != "full" else 0.0
    for (name, _), a, b in zip(_model("none").named_parameters(), plain, grads):
        torch.testing.assert_close(b, a, rtol=tol, atol=0, msg=name)


@pytest.mark.parametrize("mode", ["selective_mlp", "full"])
@pytest.mark.parametrize("pack", [False, True])
def test_checkpointing_with_bf16_layernorms(mode, pack):
    """model.layernorm_fp32=false: each LayerNorm switches autocast off around itself,
    and the recomputation in the backward does the same; under CUDA's autocast policy
    (replayed on the CPU) the outputs and gradients equal those of keeping every
    activation, within what the bf16 test above allows."""
    from benchmarks.cuda_autocast import CudaAutocastPolicy

    def run(m):
        torch.manual_seed(0)
        model = vit("vit_demo", 32, 4, drop_path_rate=0.3, attention_backend="sdpa",
                    pack_crops=pack, activation_checkpointing=m, layernorm_fp32=False)
        with torch.no_grad():
            model.mask_token.normal_()
        g, masks, loc = _inputs(torch.float32)
        torch.manual_seed(7)
        with torch.autocast("cpu", dtype=torch.bfloat16), CudaAutocastPolicy():
            tg, tl = model.forward_crops(g, masks, loc)
            loss = tg.float().square().mean() + tl.float().square().mean()
        assert tg.dtype == torch.bfloat16  # the final LayerNorm's output
        return tg, torch.autograd.grad(loss, list(model.parameters()))

    plain_out, plain = run("none")
    out, grads = run(mode)
    torch.testing.assert_close(out, plain_out, rtol=0, atol=0)
    tol = BF16_GRAD_TOL if not pack and mode != "full" else 0.0
    for (name, _), a, b in zip(_model("none").named_parameters(), plain, grads):
        torch.testing.assert_close(b, a, rtol=tol, atol=0, msg=name)


@pytest.mark.parametrize("pack", [False, True])
def test_checkpointing_with_fp32_residual_under_bf16(pack):
    """model.residual_fp32: an fp32 stream meets bf16 branch outputs in every residual add
    (efficient drop path's add_rows included); selective_mlp still equals keeping
    everything, and the blocks' outputs are fp32."""
    def run(m):
        model = _model(m, "sdpa", pack, True, dtype=torch.float32)
        model.residual_fp32 = True
        dtypes = []
        model.blocks[-1].register_forward_hook(lambda mod, i, o: dtypes.append(o.dtype))
        g, masks, loc = _inputs(torch.float32)
        torch.manual_seed(7)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tg, tl = model.forward_crops(g, masks, loc)
            loss = tg.float().square().mean() + tl.float().square().mean()
        return tg, torch.autograd.grad(loss, list(model.parameters())), dtypes

    plain_out, plain, dtypes = run("none")
    assert dtypes and set(dtypes) == {torch.float32}
    out, grads, _ = run("selective_mlp")
    torch.testing.assert_close(out, plain_out, rtol=0, atol=0)
    tol = 0.0 if pack else BF16_GRAD_TOL
    for (name, _), a, b in zip(_model("none").named_parameters(), plain, grads):
        torch.testing.assert_close(b, a, rtol=tol, atol=0, msg=name)


@pytest.mark.parametrize("impl,mode,extra", [
    ("reference", "selective", ()),
    ("fast", "selective_mlp", ()),
    ("fast", "selective_mlp", ("model.residual_fp32=true", "model.pack_crops=true")),
])
def test_trainer_step_with_checkpointing_in_bf16(tmp_path, impl, mode, extra):
    """A training step of either path (two passes, bf16 autocast, stochastic depth) with
    selective checkpointing gives the loss and student gradients of one without; also
    with the fp32 residual stream, packed."""
    from ibot_fast.train import Trainer
    from tests.test_train import tiny_config

    results = []
    for m in ("none", mode):
        torch.manual_seed(0)
        trainer = Trainer(tiny_config(tmp_path / m, "train.precision=bf16",
                                      "train.device=cpu", "optim.freeze_last_layer=0",
                                      "optim.clip_grad=0",  # (clipping: test_train.py)
                                      f"model.activation_checkpointing={m}", *extra,
                                      impl=impl))
        trainer.loader.set_epoch(0)
        batch = next(iter(trainer.loader))
        torch.manual_seed(1)
        losses = trainer.train_step(batch, 5, 0)
        grads = [p.grad.detach().clone() for p in trainer.student_module.parameters()
                 if p.grad is not None]
        results.append((float(losses["loss"]), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_b == loss_a and len(grads_a) == len(grads_b) > 10  # the forward: same ops
    # packed: bit for bit; unpacked: one bf16 rounding (BF16_GRAD_TOL)
    tol = 0.0 if "model.pack_crops=true" in extra else BF16_GRAD_TOL
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, rtol=tol, atol=0)


def test_selective_policy_keeps_every_attention_kernel_and_matmul():
    """The GPU's attention ops (never run on the CPU) are kept, not recomputed; the
    elementwise work is recomputed."""
    import torch.nn.attention.varlen  # noqa: F401  (registers torch_attn::_varlen_attn)
    from torch.utils.checkpoint import CheckpointPolicy

    from ibot_fast.models.vit import _keep_matmuls_and_attention as policy

    ops = torch.ops
    kept = [ops.aten._scaled_dot_product_flash_attention.default,
            ops.aten._scaled_dot_product_efficient_attention.default,
            ops.aten._scaled_dot_product_cudnn_attention.default,
            ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
            ops.torch_attn._varlen_attn.default,
            ops.aten.mm.default, ops.aten.addmm.default, ops.aten.bmm.default]
    recomputed = [ops.aten.native_layer_norm.default, ops.aten.gelu.default,
                  ops.aten._to_copy.default, ops.aten.add.Tensor, ops.aten.index_add.default,
                  ops.aten._softmax.default]
    assert all(policy(None, op) == CheckpointPolicy.MUST_SAVE for op in kept)
    assert all(policy(None, op) == CheckpointPolicy.PREFER_RECOMPUTE for op in recomputed)


def test_policy_finds_the_mlp_matmuls_by_shape():
    """fc2 ([hidden, dim] weight) is never kept; fc1 ([dim, hidden]) only by `selective`;
    qkv and proj always, also where the MLP is as wide as one of them. addmm(bias, x, w.t())
    and mm(x, w.t()) alike."""
    from torch.utils.checkpoint import CheckpointPolicy

    from ibot_fast.models.vit import _keep_matmuls_and_attention as policy
    from ibot_fast.models.vit import _recomputed_matmuls

    ops, save = torch.ops.aten, CheckpointPolicy.MUST_SAVE
    dim = 8
    qkv, proj = torch.empty(dim, 3 * dim), torch.empty(dim, dim)
    for mode in ("selective", "selective_mlp"):
        recompute = _recomputed_matmuls(Block(dim, 2, mlp_ratio=4), mode)
        decide = lambda op, *args: policy(None, op, *args, recompute=recompute)  # noqa: E731
        x, h = torch.empty(5, dim), torch.empty(5, 4 * dim)
        fc1, fc2 = torch.empty(dim, 4 * dim), torch.empty(4 * dim, dim)
        assert (decide(ops.addmm.default, torch.empty(4 * dim), x, fc1) == save) == \
            (mode == "selective")
        assert (decide(ops.mm.default, x, fc1) == save) == (mode == "selective")
        assert decide(ops.addmm.default, torch.empty(dim), h, fc2) != save
        assert decide(ops.mm.default, x, qkv) == save and decide(ops.mm.default, x, proj) == save
    # an MLP as wide as proj (ratio 1) or qkv (ratio 3): those shapes are never recomputed
    assert _recomputed_matmuls(Block(dim, 2, mlp_ratio=1), "selective_mlp") == frozenset()
    assert _recomputed_matmuls(Block(dim, 2, mlp_ratio=3), "selective_mlp") == {(3 * dim, dim)}
    with pytest.raises(ValueError, match="mlp_ratio=3"):
        vit_demo = dict(img_size=32, patch_size=4, dim=128, depth=1, heads=4)
        from ibot_fast.models.vit import VisionTransformer
        VisionTransformer(**vit_demo, mlp_ratio=3, activation_checkpointing="selective_mlp")


def test_compiled_policy_recomputes_what_eager_does():
    """torch.compile applies the policy through its own tracing (fake tensors): count the
    matmuls in the compiled backward graphs (aot_eager, min-cut partitioner) of a block."""
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    mm_ops = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
    counts = {}

    def backend(mode):
        def compile_fn(gm, inputs):
            def bw(graph, _):
                counts[mode] = sum(n.target in mm_ops for n in graph.graph.nodes)
                return graph
            return aot_module_simplified(gm, inputs, fw_compiler=lambda g, _: g,
                                         bw_compiler=bw,
                                         partition_fn=min_cut_rematerialization_partition)
        return compile_fn

    for mode in CHECKPOINTING:
        torch._dynamo.reset()
        torch.manual_seed(0)
        block = Block(32, 2, backend="math")
        fn = torch.compile(lambda x: run_block(block, x, None, mode), backend=backend(mode))
        fn(torch.randn(3, 5, 32, requires_grad=True)).sum().backward()
    torch._dynamo.reset()
    # none: 2 per linear layer (dx, dW) = 8; + fc1 for selective_mlp; + qkv, proj, fc1 for full
    assert counts == {"none": 8, "selective": 8, "selective_mlp": 9, "full": 11}


def test_efficient_drop_path_compiles_with_dynamic_batch_sizes():
    """With symbolic batch sizes (dynamic=True) the subset size is a derived symbol: a
    Python float B / k, or that size inside an autograd.Function, could not be lifted by
    dynamo; add_rows is a custom op, opaque to it. drop_path 0.05 keeps round(0.95 B) = B
    samples at these sizes, so the (compiled, differently drawn) permutation does not
    matter and the result equals the eager block's."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = Block(32, 2, drop_path=0.05, efficient_drop_path=True)
    fn = torch.compile(block, dynamic=True)  # inductor
    for B in (5, 7):
        x = torch.randn(B, 4, 32, requires_grad=True)
        out = fn(x)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        ref = block(x)
        (ref_grad,) = torch.autograd.grad(ref.square().sum(), x)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(grad, ref_grad)
    torch._dynamo.reset()

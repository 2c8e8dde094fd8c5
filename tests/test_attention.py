"""Attention backends, packed global + local crops, efficient stochastic depth."""
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ibot_fast import UserError
from ibot_fast.models.attention import (Seqs, attention, packed_attention, resolve_backend,
                                        varlen_status, xformers_status)
from ibot_fast.models.vit import Block, vit


def test_seqs_split_and_sample():
    seqs = Seqs([(3, 5), (4, 2)])
    x = torch.arange(seqs.total).float()[:, None]
    a, b = seqs.split(x)
    assert a.shape == (3, 5, 1) and b.shape == (4, 2, 1) and b[0, 0, 0] == 15
    assert seqs.per_token(torch.arange(7.)).tolist() == [0] * 5 + [1] * 5 + [2] * 5 + \
        [3, 3, 4, 4, 5, 5, 6, 6]
    rows, sub, scale = seqs.sample(0.5, torch.device("cpu"))
    assert sub.groups == [(2, 5), (2, 2)] and rows.numel() == sub.total == scale.numel()
    assert set(scale.tolist()) == {1.5, 2.0}
    assert rows[:5].tolist() == list(range(rows[0].item(), rows[0].item() + 5))


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_sdpa_equals_math(dtype, atol):
    q, k, v = (torch.randn(3, 4, 17, 8, dtype=dtype) for _ in range(3))
    torch.testing.assert_close(attention(q, k, v, "sdpa"), attention(q, k, v, "math"),
                               atol=atol, rtol=atol)


def test_packed_attention_equals_per_sequence():
    torch.manual_seed(0)
    seqs = Seqs([(2, 7), (3, 4)])
    qkv = torch.randn(seqs.total, 3 * 12, dtype=torch.float64)
    out = packed_attention(qkv, seqs, heads=3, backend="math")
    start = 0
    for n, length in seqs.groups:
        for _ in range(n):
            q, k, v = qkv[start:start + length].view(length, 3, 3, 4).permute(1, 2, 0, 3)
            ref = attention(q[None], k[None], v[None], "math")[0].transpose(0, 1).reshape(length, 12)
            torch.testing.assert_close(out[start:start + length], ref)
            start += length


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_packed_pass_equals_two_passes(dtype, tol, backend):
    """Outputs and every gradient of the packed student pass equal two separate passes."""
    torch.manual_seed(0)
    two = vit("vit_demo", 32, 4, attention_backend=backend).to(dtype)
    packed = vit("vit_demo", 32, 4, attention_backend=backend, pack_crops=True).to(dtype)
    packed.load_state_dict(two.state_dict())
    with torch.no_grad():
        for m in (two, packed):
            m.mask_token.fill_(0.3)
    g = torch.randn(4, 3, 32, 32, dtype=dtype)
    loc = torch.randn(6, 3, 16, 16, dtype=dtype)
    masks = torch.rand(4, 64) < 0.3
    outs = []
    for model in (two, packed):
        tg, tl = model.forward_crops(g, masks, loc)
        assert tg.shape == (4, 65, 128) and tl.shape == (6, 17, 128)
        loss = (tg * torch.linspace(-1, 1, 128, dtype=dtype)).sum() + tl.square().sum()
        grads = torch.autograd.grad(loss, list(model.parameters()))
        outs.append((tg, tl, grads))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=tol, atol=tol)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=tol, atol=tol)
    for (name, _), a, b in zip(two.named_parameters(), outs[1][2], outs[0][2]):
        torch.testing.assert_close(a, b, rtol=tol * 10, atol=tol * 10, msg=name)


def _varlen_on_cpu(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, **kwargs):
    """A CPU stand-in for torch's varlen_attn (CUDA only), same arguments and layout
    ([T, heads, head_dim]): the math attention of each sequence in turn."""
    assert torch.equal(cu_seq_q, cu_seq_k) and cu_seq_q.dtype == torch.int32 and not kwargs
    bounds = cu_seq_q.tolist()
    assert bounds[0] == 0 and bounds[-1] == query.shape[0]
    assert max_q == max_k == max(b - a for a, b in zip(bounds, bounds[1:]))
    outs = [attention(*(x[a:b].transpose(0, 1)[None] for x in (query, key, value)), "math")
            [0].transpose(0, 1) for a, b in zip(bounds, bounds[1:])]
    return torch.cat(outs)


def test_varlen_packed_attention_plumbing(monkeypatch):
    """The varlen backend hands torch's varlen_attn the packed q, k, v and the cumulative
    lengths it expects, and reshapes its output back: with a CPU stand-in for the CUDA
    kernel, outputs and gradients equal the math backend's."""
    varlen_module = pytest.importorskip("torch.nn.attention.varlen")
    monkeypatch.setattr(varlen_module, "varlen_attn", _varlen_on_cpu)
    torch.manual_seed(0)
    seqs = Seqs([(2, 7), (3, 4)])
    qkv = torch.randn(seqs.total, 3 * 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(seqs.total, 12, dtype=torch.float64)
    out = packed_attention(qkv, seqs, heads=3, backend="varlen")
    (grad,) = torch.autograd.grad((out * w).sum(), qkv)
    ref = packed_attention(qkv, seqs, heads=3, backend="math")
    (grad_ref,) = torch.autograd.grad((ref * w).sum(), qkv)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad, grad_ref)
    assert seqs.cu_seqlens("cpu").tolist() == [0, 7, 14, 18, 22, 26]


@pytest.fixture
def cpu_flash_kernels():
    """CPU kernels for aten's flash-attention ops, which torch's varlen_attn calls (CUDA
    only): the real `torch_attn::_varlen_attn` custom op, its autograd and checkpointing
    then run on the CPU. Exact per-sequence attention in fp64; counts the calls."""
    calls = {"fwd": 0, "bwd": 0}

    def segments(cu, *tensors):
        bounds = cu.tolist()
        for a, b in zip(bounds, bounds[1:]):
            yield a, b, [x[a:b].transpose(0, 1).double() for x in tensors]  # [heads, n, d]

    def forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout, causal, debug, *, scale=None,
                **unused):
        assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32 and not causal
        assert max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())
        assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
        calls["fwd"] += 1
        scale = scale or q.shape[-1] ** -0.5
        out, lse = torch.empty_like(q), torch.empty(q.shape[1], q.shape[0])
        for a, b, (qs, ks, vs) in segments(cu_q, q, k, v):
            scores = qs @ ks.transpose(-1, -2) * scale
            lse[:, a:b] = torch.logsumexp(scores, -1).float()
            out[a:b] = (scores.softmax(-1) @ vs).transpose(0, 1).to(q.dtype)
        return out, lse, torch.zeros(2, dtype=torch.uint64), torch.empty(0), torch.empty(0)

    def backward(grad, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, dropout, causal, rng,
                 unused, *, scale=None, **more):
        calls["bwd"] += 1
        scale = scale or q.shape[-1] ** -0.5
        dq, dk, dv = (torch.empty_like(x) for x in (q, k, v))
        for a, b, (qs, ks, vs, gs) in segments(cu_q, q, k, v, grad):
            p = (qs @ ks.transpose(-1, -2) * scale).softmax(-1)
            dp = gs @ vs.transpose(-1, -2)
            ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * scale
            dv[a:b] = (p.transpose(-1, -2) @ gs).transpose(0, 1).to(v.dtype)
            dq[a:b] = (ds @ ks).transpose(0, 1).to(q.dtype)
            dk[a:b] = (ds.transpose(-1, -2) @ qs).transpose(0, 1).to(k.dtype)
        return dq, dk, dv

    pytest.importorskip("torch.nn.attention.varlen")
    lib = torch.library.Library("aten", "IMPL")
    lib.impl("_flash_attention_forward", forward, "CPU")
    lib.impl("_flash_attention_backward", backward, "CPU")
    yield calls
    lib._destroy()


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_varlen_backend_through_torch_op(cpu_flash_kernels, mode):
    """The packed student with model.attention=varlen, through torch's own varlen op and
    its autograd (CPU flash kernels from the fixture): outputs and gradients equal the
    math backend's; selective checkpointing keeps the attention outputs (no rerun), full
    reruns them."""
    outs = {}
    for backend in ("math", "varlen"):
        torch.manual_seed(0)
        model = vit("vit_demo", 32, 4, drop_path_rate=0.2, attention_backend=backend,
                    pack_crops=True, efficient_drop_path=True,
                    activation_checkpointing=mode).double()
        gen = torch.Generator().manual_seed(1)
        g = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=gen)
        loc = torch.randn(4, 3, 16, 16, dtype=torch.float64, generator=gen)
        torch.manual_seed(3)
        tg, tl = model.forward_crops(g, torch.rand(2, 64) < 0.3, loc)
        forwards = cpu_flash_kernels["fwd"]
        grads = torch.autograd.grad(tg.square().sum() + tl.sum(), list(model.parameters()))
        outs[backend] = (tg, tl, grads, forwards, cpu_flash_kernels["fwd"] - forwards)
    (tg, tl, grads, _, _), (tg_v, tl_v, grads_v, fwd_calls, rerun) = outs["math"], outs["varlen"]
    torch.testing.assert_close(tg_v, tg)
    torch.testing.assert_close(tl_v, tl)
    for a, b in zip(grads, grads_v):
        torch.testing.assert_close(b, a)
    assert fwd_calls == 4 and cpu_flash_kernels["bwd"] == 4  # one call per block, each way
    assert rerun == (4 if mode == "full" else 0)


def test_efficient_drop_path_matches_in_expectation():
    """Subset stochastic depth and the per-sample mask give the same mean output when
    B (1 - p) is a whole number (each sample is kept with the same probability)."""
    torch.manual_seed(0)
    plain = Block(8, 2, drop_path=0.5).double()
    subset = Block(8, 2, drop_path=0.5, efficient_drop_path=True).double()
    subset.load_state_dict(plain.state_dict())
    x = torch.randn(10, 3, 8, dtype=torch.float64)
    n = 600
    with torch.no_grad():
        a = torch.stack([plain(x) for _ in range(n)])
        b = torch.stack([subset(x) for _ in range(n)])
        plain.eval()
        deterministic = plain(x)
    se = (a.var(0) / n + b.var(0) / n).sqrt()
    assert ((a.mean(0) - b.mean(0)).abs() < 5 * se + 1e-12).float().mean() > 0.99
    # and the subset variant does drop: single draws differ from the deterministic pass
    assert (b[0] - deterministic).abs().max() > 1e-3
    subset.eval()
    with torch.no_grad():
        torch.testing.assert_close(subset(x), deterministic)


@pytest.mark.parametrize("pack", [False, True])
def test_attention_backward_assembles_dqkv_with_one_copy(pack, op_counter):
    """The backward stacks dq, dk, dv straight into the qkv projection's layout (one
    `stack` per attention call; packed, into each group's rows of one buffer): no
    zero-filled full-size gradient (select_backward, slice_backward), no extra clone, and
    no per-block `cat` of the groups' gradients."""
    torch.manual_seed(0)
    model = vit("vit_demo", 32, 4, attention_backend="sdpa", pack_crops=pack)
    tg, tl = model.forward_crops(torch.randn(2, 3, 32, 32), None, torch.randn(4, 3, 16, 16))
    loss = tg.square().sum() + tl.square().sum()
    with op_counter() as backward:
        loss.backward()
    counts = backward.counts
    assert "select_backward" not in counts and "clone" not in counts
    # the only slices: the position embedding's, split for the local crops' interpolation
    assert counts.get("slice_backward", 0) == 2
    assert counts.get("stack", 0) == len(model.blocks) * 2  # one per group of sequences
    # packed: only the backward of forward_crops' output split, once per pass
    assert counts.get("cat", 0) == (1 if pack else 0)


COPY_OPS = {"copy_", "clone", "cat", "stack", "_to_copy", "index", "index_select",
            "index_put", "index_add", "gather", "scatter"}


class TokenCopies(TorchDispatchMode):
    """Counts, by op name, the copies (`COPY_OPS`: contiguous() and copying reshapes
    dispatch as clone) whose output has more elements than there are tokens, and names
    the attention kernels that ran. Per-sequence or per-token vectors (drop-path masks)
    are not counted; every activation is."""

    def __init__(self, tokens: int):
        super().__init__()
        self.tokens, self.copies, self.kernels = tokens, {}, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if "attention" in name or "attn" in name:
            self.kernels.add(name)
        first = out[0] if isinstance(out, (tuple, list)) else out
        if name in COPY_OPS and first.numel() > self.tokens:
            self.copies[name] = self.copies.get(name, 0) + 1
        return out


def block_copies(backend, pack, kernel=contextlib.nullcontext):
    """(forward copies, backward copies, attention kernels) of one block, packed
    (two groups of sequences) or not, with stochastic depth."""
    torch.manual_seed(0)
    block = Block(64, 4, drop_path=0.2, backend=backend)
    seqs = Seqs([(4, 17), (6, 5)]) if pack else None
    x = torch.randn(*((seqs.total,) if pack else (4, 17)), 64, requires_grad=True)
    tokens = x.numel() // 64
    with kernel():
        with TokenCopies(tokens) as forward:
            y = block(x, seqs)
        grad = torch.randn_like(y)
        with TokenCopies(tokens) as backward:
            y.backward(grad)
    return forward.copies, backward.copies, forward.kernels | backward.kernels


def _sdpa_math_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


# (forward, backward) copies of token-sized tensors per block and attention call group:
# the fused kernels read the qkv projection's strided views and write their output in
# the layout the output projection reads (attention.py's docstring); the backward's one
# copy per call is the stack of dq, dk, dv. The explicit softmax (ours, and SDPA's math
# kernel) needs contiguous operands for its batched matmuls.
COPIES_PER_BLOCK = {
    ("sdpa", False): ({}, {"stack": 1}),
    ("sdpa", True): ({"cat": 1}, {"stack": 2}),  # one dense call per group
    ("sdpa_math_kernel", False): ({"clone": 4}, {"clone": 1, "stack": 1}),
    ("sdpa_math_kernel", True): ({"clone": 8, "cat": 1}, {"clone": 2, "stack": 2}),
    ("math", False): ({"clone": 4}, {"clone": 1, "stack": 1}),
    ("math", True): ({"clone": 8, "cat": 1}, {"clone": 2, "stack": 2}),
}


@pytest.mark.parametrize("backend,pack", list(COPIES_PER_BLOCK))
def test_copies_per_block(backend, pack):
    """Pins the copies of token-sized tensors in one block's forward and backward, per
    attention backend the CPU runs: SDPA's CPU flash kernel (the trainer's CPU choice)
    reads q, k, v as strided views of the qkv projection and its output feeds the
    output projection as a view, so a block copies nothing in its forward (packed: the
    one `cat` of the groups' outputs) and once per attention call in its backward."""
    kernel = _sdpa_math_kernel if backend == "sdpa_math_kernel" else contextlib.nullcontext
    forward, backward, kernels = block_copies(backend.replace("_math_kernel", ""), pack,
                                              kernel)
    assert (forward, backward) == COPIES_PER_BLOCK[(backend, pack)]
    if backend == "sdpa":
        assert kernels == {"_scaled_dot_product_flash_attention_for_cpu",
                           "_scaled_dot_product_flash_attention_for_cpu_backward"}


def test_varlen_copies_per_block(cpu_flash_kernels):
    """One variable-length call over the packed stream (torch's varlen op, CPU kernels
    from the fixture): no copy in the forward (no per-group `cat`), one `stack` in the
    backward."""
    forward, backward, kernels = block_copies("varlen", True)
    assert (forward, backward) == ({}, {"stack": 1})
    assert cpu_flash_kernels["fwd"] == cpu_flash_kernels["bwd"] == 1


def test_compiled_packed_block_has_no_per_block_split_or_grad_cat():
    """Under torch.compile (the AOT graphs, traced once: aot_eager, no inductor) a packed
    block's forward has one `cat` (the groups' attention outputs) and no `split`, and its
    backward no `cat`: each group's dq, dk, dv are stacked into their rows of one buffer
    (functionalized as stack + slice_scatter, which inductor writes in place)."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import default_partition

    from ibot_fast.models.vit import run_block

    graphs = {}

    def backend(gm, inputs):
        def keep(name):
            def compiler(graph, _):
                graphs[name] = [str(n.target) for n in graph.graph.nodes
                                if n.op == "call_function"]
                return make_boxed_func(graph)
            return compiler
        return aot_module_simplified(gm, inputs, fw_compiler=keep("fw"), bw_compiler=keep("bw"),
                                     partition_fn=default_partition)

    torch._dynamo.reset()
    torch.manual_seed(0)
    block = Block(32, 2, backend="sdpa")
    seqs = Seqs([(3, 5), (4, 3)])
    fn = torch.compile(lambda x: run_block(block, x, seqs, "none"), backend=backend,
                       fullgraph=True)
    x = torch.randn(seqs.total, 32, requires_grad=True)
    fn(x).sum().backward()
    torch._dynamo.reset()
    count = lambda ops, name: sum(op.startswith(f"aten.{name}.") for op in ops)  # noqa: E731
    assert count(graphs["fw"], "cat") == 1
    assert not any("split" in op for op in graphs["fw"])
    assert count(graphs["bw"], "cat") == 0 and count(graphs["bw"], "stack") == 2
    ref = block(x.detach().requires_grad_(), seqs)
    torch.testing.assert_close(fn(x), ref)


def _largest(shapes) -> int:
    """The most elements among the (possibly nested) shapes a profiler event records."""
    if not shapes:
        return 0
    if all(isinstance(n, int) for n in shapes):
        return int(torch.Size(shapes).numel())
    return max(_largest(s) for s in shapes if isinstance(s, (list, tuple)))


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["flash", "efficient", "cudnn", "varlen"])
@pytest.mark.parametrize("pack", [False, True])
def test_copies_per_block_on_cuda(kernel, pack):
    """On CUDA, counted by the profiler (which also sees copies made inside the kernels'
    host code; token-sized only): a bf16 ViT-S block with each SDPA kernel (and varlen,
    packed) makes no copy in its forward but the packed groups' `cat`, and one `stack`
    per attention call in its backward. Prints what it finds."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    if kernel == "varlen":
        if not pack:
            pytest.skip("varlen runs on packed sequences")
        if not varlen_status(torch.device("cuda"))[0]:
            pytest.skip(varlen_status(torch.device("cuda"))[1])
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION}
    torch.manual_seed(0)
    block = Block(384, 6, drop_path=0.1, backend="varlen" if kernel == "varlen" else "sdpa")
    block = block.cuda().to(torch.bfloat16)
    seqs = Seqs([(16, 197), (40, 37)]) if pack else None
    x = torch.randn(*((seqs.total,) if pack else (16, 197)), 384, device="cuda",
                    dtype=torch.bfloat16, requires_grad=True)
    context = sdpa_kernel(backends[kernel]) if kernel in backends else contextlib.nullcontext()
    try:
        with context:
            block(x, seqs).sum().backward()  # warm-up (and: does this kernel run here?)
            torch.cuda.synchronize()
            counts = {}
            for phase in ("fwd", "bwd"):
                if phase == "bwd":
                    grad = torch.randn_like(y)
                with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                    if phase == "fwd":
                        y = block(x, seqs)
                    else:
                        y.backward(grad)
                    torch.cuda.synchronize()
                counts[phase] = {}
                for event in prof.events():
                    if event.name in ("aten::copy_", "aten::cat", "aten::clone") and \
                            _largest(event.input_shapes) > x.numel() // 384:
                        counts[phase][event.name] = counts[phase].get(event.name, 0) + 1
    except RuntimeError as e:
        if "No available kernel" in str(e):
            pytest.skip(f"{kernel} does not run here: {str(e).splitlines()[0]}")
        raise
    print(kernel, "packed" if pack else "dense", counts)
    # stack is a cat inside; a contiguous() or copying reshape is a clone and a copy_
    calls = len(seqs.groups) if pack and kernel != "varlen" else 1
    assert counts["fwd"] == ({"aten::cat": 1} if pack and kernel != "varlen" else {})
    assert counts["bwd"] == {"aten::cat": calls}


def _dropped_rows(branch_grad, seqs):
    """Per group, the number of sequences whose rows all have an exactly zero gradient
    through a residual branch; fails unless every sequence is all-zero or all-nonzero."""
    dropped = []
    for part in seqs.split((branch_grad == 0).all(-1)):  # [count, length] per group
        assert (part.all(1) | ~part.any(1)).all(), "drop path must take whole sequences"
        dropped.append(int(part.all(1).sum()))
    return dropped


def test_efficient_drop_path_packed_runs_and_drops():
    """Packed sequences, drop path 0.5: each residual branch runs on round(n / 2) whole
    sequences of each group (2 of 4, 3 of 6) and the others get exactly zero gradient
    through it; the training output differs from the eval output (no drop path)."""
    torch.manual_seed(0)
    block = Block(16, 2, drop_path=0.5, efficient_drop_path=True).double()
    seqs = Seqs([(4, 5), (6, 3)])
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(seqs.total, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(seqs.total, 16, dtype=torch.float64, generator=gen)
    # forward() is add_mlp(*up_to_mlp(...)): split there to read the gradient at x1, the
    # stream between the attention and MLP residual adds
    x1, mlp_out, rows, scale = block.up_to_mlp(x, seqs)
    x1.retain_grad()
    out = block.add_mlp(x1, mlp_out, rows, scale, seqs)
    (out * w).sum().backward()
    assert out.shape == x.shape and torch.isfinite(x.grad).all()
    # x.grad = x1.grad (residual) + the attention branch's; x1.grad = w + the MLP branch's
    attn_grad, mlp_grad = x.grad - x1.grad, x1.grad - w
    assert _dropped_rows(attn_grad, seqs) == [2, 3]
    assert _dropped_rows(mlp_grad, seqs) == [2, 3]

    block.eval()
    with torch.no_grad():
        assert (block(x, seqs) - out).abs().max() > 1e-3


def test_auto_backend_on_cpu_is_sdpa():
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    assert resolve_backend("math", torch.device("cpu")) == "math"
    with pytest.raises(UserError, match="xformers"):
        resolve_backend("xformers", torch.device("cpu"))
    with pytest.raises(UserError, match="varlen"):
        resolve_backend("varlen", torch.device("cpu"))
    with pytest.raises(UserError, match="pack_crops"):
        resolve_backend("varlen", torch.device("cuda"), packed=False)
    with pytest.raises(UserError, match="bf16 or fp16"):
        resolve_backend("varlen", torch.device("cuda"), low_precision=False)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa", "xformers", "varlen"])
def test_gpu_backends_equal_math(backend):
    if backend == "xformers" and not xformers_status()[0]:
        pytest.skip(xformers_status()[1])
    if backend == "varlen" and not varlen_status(torch.device("cuda"))[0]:
        pytest.skip(varlen_status(torch.device("cuda"))[1])
    torch.manual_seed(0)
    q, k, v = (torch.randn(8, 6, 197, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = attention(q.double(), k.double(), v.double(), "math")
    low = attention(q, k, v, "math").double()
    out = attention(q, k, v, backend).double()
    # flash-attention's rule: at most 2x the error of the plain expression in bf16
    assert (out - ref).abs().max() <= 2 * (low - ref).abs().max() + 1e-3
    seqs = Seqs([(4, 197), (10, 37)])
    qkv = torch.randn(seqs.total, 3 * 384, device="cuda", dtype=torch.bfloat16,
                      requires_grad=True)
    w = torch.randn(seqs.total, 384, device="cuda", dtype=torch.float64)
    packed = packed_attention(qkv, seqs, 6, backend).double()
    qkv64 = qkv.detach().double().requires_grad_(True)
    reference = packed_attention(qkv64, seqs, 6, "math")
    assert (packed - reference).abs().max() < 2e-2
    (grad,) = torch.autograd.grad((packed * w).sum(), qkv)
    (grad64,) = torch.autograd.grad((reference * w).sum(), qkv64)
    assert (grad.double() - grad64).abs().max() <= 2e-2 * grad64.abs().max()

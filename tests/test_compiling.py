"""Regional compilation (ibot_fast/compiling.py) and the automatic choices at start.

Inductor compiles C++ kernels on the CPU here: each compiled test costs tens of seconds,
so the compiled run below checks several things at once. The kernels' torch twins stand
in for Triton (Dynamo cannot trace the Triton interpreter)."""
import logging
import math

import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

from ibot_fast import UserError, compiling
from ibot_fast.config import build_config, from_dict, to_dict
from ibot_fast.train import Trainer

from test_train import tiny_config


def test_compile_setting_resolves_per_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compiling.resolve_compile("auto", cuda) == (True, "auto: CUDA device")
    assert compiling.resolve_compile("auto", cpu)[0] is False
    assert compiling.resolve_compile("true", cpu) == (True, "configured")
    assert compiling.resolve_compile("false", cuda) == (False, "configured")
    assert compiling.resolve_compile(True, cpu) == (True, "configured")  # set in code
    assert compiling.resolve_compile(False, cuda) == (False, "configured")


def test_compile_key_takes_auto_true_false():
    assert build_config().train.compile == "auto"
    for text, value in (("1", "true"), ("True", "true"), ("on", "true"), ("no", "false"),
                        ("AUTO", "auto")):
        assert build_config(None, [f"train.compile={text}"]).train.compile == value
    with pytest.raises(UserError, match="train.compile: expected auto, true or false"):
        build_config(None, ["train.compile=sometimes"])
    saved = to_dict(build_config())
    saved["train"]["compile"] = True  # a checkpoint's config from when the key was a bool
    assert from_dict(saved).train.compile == "true"


def test_data_pipeline_resolves_per_device(monkeypatch, caplog):
    import ibot_fast.data as data

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with caplog.at_level(logging.INFO, logger="ibot_fast"):
        monkeypatch.setattr(data, "dali_importable", lambda: True)
        assert data.resolve_pipeline("auto", cuda) == "dali"
        assert data.resolve_pipeline("auto", cpu) == "cpu"
        assert data.resolve_pipeline("cpu", cuda) == "cpu"
        monkeypatch.setattr(data, "dali_importable", lambda: False)
        assert data.resolve_pipeline("auto", cuda) == "cpu"
        with pytest.raises(UserError, match="data.pipeline=dali needs NVIDIA DALI"):
            data.resolve_pipeline("dali", cuda)
    assert "data.pipeline: dali (auto: DALI imports and a GPU is present)" in caplog.text
    assert "data.pipeline: cpu (auto: DALI does not import" in caplog.text
    assert build_config().data.pipeline == "auto"


def test_presets_pick_the_fast_configuration_and_name_the_dinov2_variant():
    for model in ("vit_small_16", "vit_base_16", "vit_large_16"):
        paper = build_config(f"{model}_paper", ["data.path=/x"])
        assert paper.train.impl == "fast" and paper.train.compile == "auto"
        assert paper.data.pipeline == "auto" and paper.model.attention == "auto"
        # what changes the computation stays off in the paper presets ...
        assert (paper.masks.sampler, paper.loss.center2_from, paper.loss.centering,
                paper.loss.koleo_weight) == ("iid", "all", "center", 0.0)
        assert paper.model.layernorm_fp32 and not paper.model.efficient_drop_path
        # ... and the DINOv2-style preset collects it
        variant = build_config(f"{model}_dinov2style", ["data.path=/x"])
        assert (variant.masks.sampler, variant.loss.center2_from) == ("stratified", "masked")
        assert variant.model.pack_crops and variant.model.efficient_drop_path
        assert not variant.model.layernorm_fp32
        assert variant.model.arch == paper.model.arch and variant.train.epochs == paper.train.epochs
    # the fused AdamW + EMA pass needs flat buffers, which FSDP (ViT-L's) cannot give
    assert build_config("vit_base_16_paper", ["data.path=/x"]).optim.fuse_ema
    assert not build_config("vit_large_16_paper", ["data.path=/x"]).optim.fuse_ema


def test_automatic_choices_are_logged_with_their_reasons(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="ibot_fast"):
        Trainer(tiny_config(tmp_path, impl="fast")).close()
    assert "train.compile: off (auto: eager on cpu" in caplog.text
    assert "data.pipeline: cpu (auto:" in caplog.text
    assert "train.precision: fp32 (auto:" in caplog.text
    assert "attention backend: sdpa (CPU:" in caplog.text


def step_result(trainer, batch):
    losses = trainer.train_step(batch, 1, 0)
    grads = {n: p.grad.detach().clone() for n, p in
             trainer.student_module.named_parameters() if p.grad is not None}
    return float(losses["loss"].detach()), grads


def test_compiled_run_equals_eager_and_recompiles_nothing_after_its_first_steps(
        tmp_path, twins):
    """One compiled block reused by every block (student and teacher): a step equals the
    eager step (loss and every student gradient, fp32 reordering); a multi-epoch run
    across epoch ends, a k-NN, a checkpoint and a resume compiles a few graphs in its
    first steps and none after; no graph breaks."""
    options = ("optim.freeze_last_layer=0", "model.drop_path_rate=0", "optim.clip_grad=0")
    eager = Trainer(tiny_config(tmp_path / "eager", *options, impl="fast"))
    eager.loader.set_epoch(0)
    batch = next(iter(eager.loader))
    eager.close()

    counters.clear()
    compiled = Trainer(tiny_config(tmp_path / "compiled", *options, "train.compile=true",
                                   impl="fast"))
    assert compiled.compiled
    blocks = compiled.student_module.backbone.blocks
    assert compiled.student_module.backbone.block_runner is \
        compiled.teacher.backbone.block_runner  # one compiled function for both
    loss_e, grads_e = step_result(eager, batch)
    loss_c, grads_c = step_result(compiled, batch)
    compiled.close()
    assert loss_c == pytest.approx(loss_e, rel=1e-5)
    assert grads_c.keys() == grads_e.keys() and len(grads_e) > 10
    for name, g in grads_e.items():
        assert (grads_c[name] - g).norm() <= 1e-4 * g.norm() + 1e-12, name
    assert counters["stats"]["unique_graphs"] >= 1

    # a run with stochastic depth (the blocks' rates differ), the k-NN every epoch, a
    # stop after 5 steps (3 per epoch) and a resume to the end of the third epoch
    run_dir = tmp_path / "run"
    first = Trainer(tiny_config(run_dir, "train.compile=true", "train.stop_at_iter=5",
                                "eval.knn_every=1", impl="fast"))
    assert len(blocks) == len(first.student_module.backbone.blocks) > 2
    first.loader.set_epoch(0)
    first.run()
    after_first_run = counters["stats"]["unique_graphs"]
    resumed = Trainer(tiny_config(run_dir, "train.compile=true", "eval.knn_every=1",
                                  impl="fast"), "auto")
    resumed.run()
    assert resumed.iteration == 9
    assert counters["stats"]["unique_graphs"] == after_first_run
    # global and local crops, the first block (no stochastic depth), the teacher: a few
    # graphs for the whole run, not one per block
    assert after_first_run <= 6, dict(counters["stats"])
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    state = torch.load(run_dir / "checkpoint.pth", weights_only=False)
    assert not any("_orig_mod" in k for k in state["student"])


def test_a_compiler_that_fails_at_start_leaves_the_run_eager(tmp_path, monkeypatch,
                                                              caplog):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(compiling, "BACKEND", broken_backend)
    with caplog.at_level(logging.WARNING, logger="ibot_fast"):
        trainer = Trainer(tiny_config(tmp_path, "train.compile=true", "train.stop_at_iter=2",
                                      impl="fast"))
    assert not trainer.compiled
    assert trainer.student_module.backbone.block_runner is compiling.run_block
    warnings = [r for r in caplog.records if "train.compile" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    assert "no C++ compiler here" in warnings[0].getMessage()
    assert "goes on eagerly" in warnings[0].getMessage()
    assert trainer.run()["iteration"] == 2


def test_cuda_graphs_are_refused_where_they_cannot_work(tmp_path):
    """train.cuda_graphs needs CUDA, compiled blocks, the fast path's flat gradient
    buffers and no FSDP: each missing piece is a one-line error at start."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    fast = ["train.impl=fast", "train.cuda_graphs=true"]
    assert not compiling.check_cuda_graphs(build_config(None, ["train.impl=fast"]), cuda)
    assert compiling.check_cuda_graphs(build_config(None, fast), cuda)
    refusals = {
        "CUDA GPU": (fast, cpu, False),
        "train.compile=auto or true": (fast + ["train.compile=false"], cuda, False),
        "train.impl=fast": (["train.impl=reference", "train.cuda_graphs=true"], cuda, False),
        "fsdp": (fast, cuda, True),
    }
    for message, (overrides, device, sharded) in refusals.items():
        with pytest.raises(UserError, match=message) as error:
            compiling.check_cuda_graphs(build_config(None, overrides), device, sharded)
        assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="CUDA GPU"):  # the trainer asks at start
        Trainer(tiny_config(tmp_path, "train.cuda_graphs=true", impl="fast"))


def test_cuda_graphs_compile_the_blocks_in_reduce_overhead_mode(monkeypatch):
    """With cuda_graphs the one block runner is torch.compile's mode reduce-overhead (CUDA
    Graph Trees, forward and backward); without, the default mode."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append(kwargs) or fn)
    compiling.compiled_block_runner(cuda_graphs=True)
    compiling.compiled_block_runner()
    assert calls == [{"backend": "inductor", "mode": "reduce-overhead"}, {"backend": "inductor"}]


class HostSyncs(TorchDispatchMode):
    """What would make the host wait for a GPU, counted by name: reading a value on the
    host (item, bool, int, float: `_local_scalar_dense`; `tolist`, `numpy`, `cpu`), ops
    whose output size depends on the values (nonzero, masked_select, unique, boolean
    indexing, repeat_interleave without output_size, equal), and
    `torch.cuda.synchronize`. On the CPU nothing waits, but the same calls would on a
    GPU, so a CPU run shows where a GPU run synchronises."""

    VALUE_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique",
                 "_unique2", "unique_dim", "unique_consecutive", "equal", "bincount"}
    HOST_READS = ("tolist", "numpy", "cpu")

    def __init__(self):
        super().__init__()
        self.counts = {}
        self._patches = []

    def _count(self, name):
        self.counts[name] = self.counts.get(name, 0) + 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in self.VALUE_OPS:
            self._count(name)
        elif name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool
                for i in (args[1] if len(args) > 1 else ())):
            self._count(f"{name} (boolean)")
        elif name == "repeat_interleave" and isinstance(args[0], torch.Tensor) and \
                kwargs.get("output_size") is None and (
                    len(args) == 1 or isinstance(args[1], torch.Tensor)):
            self._count("repeat_interleave (no output_size)")
        return func(*args, **kwargs)

    def __enter__(self):
        for owner, name in [(torch.Tensor, n) for n in self.HOST_READS] + \
                [(torch.cuda, "synchronize")]:
            original = getattr(owner, name)

            def counted(*args, _original=original, _name=name, **kwargs):
                self._count(_name)
                return _original(*args, **kwargs)

            setattr(owner, name, counted)
            self._patches.append((owner, name, original))
        return super().__enter__()

    def __exit__(self, *exc):
        for owner, name, original in self._patches:
            setattr(owner, name, original)
        self._patches.clear()
        return super().__exit__(*exc)


def test_host_syncs_are_seen():
    """The detector's own check: each kind of synchronising call is counted."""
    x = torch.randn(6)
    with HostSyncs() as syncs:
        float(x.sum())
        bool(x[0] > 0)
        x.tolist()
        x[x > 0]
        x.nonzero()
        torch.arange(3).repeat_interleave(torch.tensor([1, 2, 3]))
        torch.cuda.synchronize  # noqa: B018 (looked up, not called: not counted)
    assert syncs.counts == {"_local_scalar_dense": 2, "tolist": 1, "index (boolean)": 1,
                            "nonzero": 1, "repeat_interleave (no output_size)": 1}
    assert "counted" not in torch.Tensor.tolist.__qualname__  # restored on exit


@pytest.mark.parametrize("extra", [
    (),  # two passes, official drop path, i.i.d. masks
    ("model.pack_crops=true", "model.efficient_drop_path=true",
     "masks.sampler=stratified"),  # one stream, DINOv2's drop path, fixed mask count
])
def test_steps_have_static_shapes_and_no_host_sync_outside_logging(tmp_path, twins, extra):
    """What CUDA graphs need of a run, checked on a CPU run of 2 epochs (3 steps each,
    logging every second step): every step hands the blocks (student and teacher) the
    same sequence of shapes, dtypes, packings and modes, and the heads the same number
    of masked rows; and nothing in a step reads a device value on the host, while each
    logging step does (the detector's positive control)."""
    trainer = Trainer(tiny_config(tmp_path, "train.log_every=2", "train.epochs=2",
                                  "model.drop_path_rate=0.2", *extra, impl="fast"))
    steps, syncs = [], {"step": [], "log": []}

    def recording(runner):
        def run(block, x, seqs, mode):
            steps[-1].append((tuple(x.shape), x.dtype, seqs and tuple(seqs.groups), mode,
                              block.training, torch.is_grad_enabled()))
            return runner(block, x, seqs, mode)
        return run

    for backbone in (trainer.student_module.backbone, trainer.teacher.backbone):
        backbone.block_runner = recording(backbone.block_runner)
    train_step, log_step = trainer.train_step, trainer.log_step

    def step(batch, it, epoch):
        steps.append([("masked rows", batch["mask_index"].numel())])
        with HostSyncs() as seen:
            out = train_step(batch, it, epoch)
        syncs["step"].append(seen.counts)
        return out

    def log(*args):
        with HostSyncs() as seen:
            out = log_step(*args)
        syncs["log"].append(seen.counts)
        return out

    trainer.train_step, trainer.log_step = step, log
    try:
        assert trainer.run()["iteration"] == 6
    finally:
        trainer.close()
    # 4 blocks: the teacher's, and the student's in one stream or in two passes
    assert len(steps) == 6 and len(steps[0]) == 1 + 4 + 4 * (1 if extra else 2)
    assert all(s == steps[0] for s in steps), "a step saw other shapes than the first"
    assert syncs["step"] == [{}] * 6
    # logging steps: iterations 2, 4 and the ends of the epochs (3, 6)
    assert len(syncs["log"]) == 4 and all(counts for counts in syncs["log"])


def _cuda_steps(tmp_path, name, *extra, steps=6):
    """Losses of `steps` fast-path steps on CUDA over the first epoch's 3 batches, and the
    student's weights after them."""
    trainer = Trainer(tiny_config(tmp_path / name, "train.device=cuda", "optim.clip_grad=0",
                                  "optim.freeze_last_layer=0", *extra, impl="fast"))
    try:
        trainer.loader.set_epoch(0)
        batches = list(trainer.loader)
        losses = [float(trainer.train_step(batches[it % len(batches)], it, 0)["loss"])
                  for it in range(steps)]
    finally:
        trainer.close()
    return losses, {n: p.detach().clone() for n, p in trainer.student_module.named_parameters()}


def _eager_and_graphed(tmp_path, options):
    """(losses, student weights) of eager steps and of graphed steps; no graph skipped."""
    eager = _cuda_steps(tmp_path, "eager", *options, "train.compile=false")
    counters.clear()
    graphed = _cuda_steps(tmp_path, "graphed", *options, "train.compile=true",
                          "train.cuda_graphs=true")
    print("eager", eager[0], "\ngraphed", graphed[0], "\n", dict(counters["inductor"]))
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    return eager, graphed


@pytest.mark.gpu
@pytest.mark.parametrize("pack", [False, True])
def test_graphed_steps_equal_eager_steps(tmp_path, pack):
    """On CUDA, train.cuda_graphs (the compiled blocks replayed as CUDA graphs once
    recorded: warm-up, recording and replays over 6 steps) gives the losses and the
    student weights of eager steps, and no graph is skipped. fp32 and no stochastic depth
    (compiled random draws differ from eager ones by design)."""
    options = ("train.precision=fp32", "model.drop_path_rate=0", f"model.pack_crops={pack}")
    (eager_losses, eager), (losses, graphed) = _eager_and_graphed(tmp_path, options)
    assert sum(counters["graph_break"].values()) == 0
    assert losses == pytest.approx(eager_losses, rel=1e-4)
    for name, p in eager.items():
        assert (graphed[name] - p).norm() <= 1e-4 * p.norm() + 1e-6, name


@pytest.mark.gpu
def test_graphed_steps_with_every_fast_path_option_run(tmp_path):
    """On CUDA, bf16, stochastic depth (official and DINOv2's subsets: rand and randperm
    inside the graphs), one token stream, i.i.d. masks: graphed steps run, give finite
    losses close to eager ones (other random draws), and skip no graph."""
    options = ("train.precision=bf16", "model.drop_path_rate=0.2", "model.pack_crops=true",
               "model.efficient_drop_path=true")
    (eager_losses, _), (losses, _) = _eager_and_graphed(tmp_path, options)
    assert all(math.isfinite(v) for v in losses)
    assert losses == pytest.approx(eager_losses, rel=0.05)

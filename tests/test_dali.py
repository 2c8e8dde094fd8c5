"""DALI data path, run CPU-only (`device_id=None`), side by side with the CPU reference.

Small images (48 px sources, 32 px global / 16 px local crops) and small batches keep the
whole module to seconds on two cores. What is checked:
- the batch format of `cpu.Collate` (shapes, dtypes, ranges, crop-major order, labels);
- the draws: the same numbers as `cpu.MultiCropAugmentation` for the same image and seed,
  and their frequencies / crop areas within sampling error of docs/design.md §1.1;
- that DALI applies them: every crop against a numpy rendering of its draws, and, on
  controlled images, flips, grayscale, jitter and solarisation read back from the pixels;
- sharding, epoch coverage and resume; corrupt files; masks; webdataset shards.
"""
import io
import random
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from ibot_fast import UserError  # noqa: E402
from ibot_fast.config import build_config  # noqa: E402
from ibot_fast.data import build_train_loader  # noqa: E402
from ibot_fast.data import dali as D  # noqa: E402
from ibot_fast.data.cpu import (MEAN, STD, EpochBatchSampler, MultiCropAugmentation,  # noqa: E402
                                MultiCropDataset, adjust_hue, sample_rng)
from ibot_fast.data.datasets import ImageFolder, expand_shards  # noqa: E402
from ibot_fast.masking import (BlockMaskSampler, StratifiedMaskSampler, masked_index,  # noqa: E402
                               sampler_from_config)

KINDS = ("flip", "jitter", "gray", "blur", "solarize")
# docs/design.md §1.1, per crop: global 1, global 2, local
EXPECTED = {"flip": (0.5, 0.5, 0.5), "jitter": (0.8, 0.8, 0.8), "gray": (0.2, 0.2, 0.2),
            "blur": (1.0, 0.1, 0.5), "solarize": (0.0, 0.2, 0.0)}


def smooth_image(rng, size=48):
    coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((size, size), Image.BICUBIC)


def write_folder(root, n_per_class, classes=2, seed=0, size=48):
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c:03d}").mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            smooth_image(rng, size).save(root / f"class{c:03d}" / f"img{i:03d}.png")
    return root


def make_cfg(path, *overrides, source="folder"):
    return build_config("demo", [f"data.source={source}", f"data.path={path}",
                                 "data.num_workers=0", "data.n_local=2", "model.patch_size=8",
                                 "train.batch_size=8", "data.global_scale=0.14,1.0",
                                 "data.local_scale=0.05,0.4", *overrides])


def crops_of(batch, k, B):
    """Crop k of every image of the batch, [B, 3, s, s]."""
    return batch["globals"][k * B:(k + 1) * B] if k < 2 else \
        batch["locals"][(k - 2) * B:(k - 1) * B]


def to_pixels(x):
    """Normalised CHW -> float HWC on the 0..255 scale."""
    x = x.float().numpy().transpose(1, 2, 0)
    return (x * np.array(STD) + np.array(MEAN)) * 255.0


def within(freq, p, n, sigmas=4.0):
    return abs(freq - p) <= sigmas * max(np.sqrt(p * (1 - p) / n), 1e-9)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("dali") / "data", 16, classes=4)


# -- the draws ------------------------------------------------------------------------------

def test_draws_are_the_cpu_paths_draws():
    """Same image size and generator: the same per-crop records, and the generator ends in
    the same state (so the i.i.d. masks drawn after them are the same too)."""
    aug = MultiCropAugmentation(32, 16, 3, (0.14, 1.0), (0.05, 0.4))
    specs = D.crop_specs(aug)
    sizes = [(48, 48), (60, 33), (20, 90), (31, 31)]
    for i in range(120):
        w, h = sizes[i % len(sizes)]
        img = Image.new("RGB", (w, h), (i, 2 * i % 256, 50))
        cpu_rng, dali_rng = sample_rng(7, 3, i), sample_rng(7, 3, i)
        _, _, cpu_records = aug(img, cpu_rng)
        mine = D.crop_records(D.plan_sample(w, h, specs, dali_rng))
        for c, m in zip(cpu_records, mine):
            assert {k: m[k] for k in c} == c
        assert cpu_rng.getstate() == dali_rng.getstate()


def test_draws_follow_the_jitter_and_solarize_probabilities():
    """`data.color_jitter_p` and `data.solarize_p` reach the planner: its records are the
    CPU path's with the same probabilities, the generator in the same state after them."""
    for jitter_p, solarize_p in ((0.0, 0.0), (0.3, 0.9)):
        aug = MultiCropAugmentation(32, 16, 2, (0.14, 1.0), (0.05, 0.4),
                                    color_jitter_p=jitter_p, solarize_p=solarize_p)
        specs = D.crop_specs(aug)
        jittered = 0
        for i in range(60):
            img = Image.new("RGB", (40, 30), (i, 2 * i % 256, 50))
            cpu_rng, dali_rng = sample_rng(5, 0, i), sample_rng(5, 0, i)
            _, _, cpu_records = aug(img, cpu_rng)
            mine = D.crop_records(D.plan_sample(40, 30, specs, dali_rng, aug.blur_sigma,
                                                aug.color_jitter_p))
            for c, m in zip(cpu_records, mine):
                assert {k: m[k] for k in c} == c
            assert cpu_rng.getstate() == dali_rng.getstate()
            jittered += sum(r["jitter"] for r in cpu_records)
        assert (jittered == 0) == (jitter_p == 0.0)


def test_draw_frequencies_and_areas_match_design():
    """n = 4000 images of the planner alone: every per-crop frequency within 4 standard
    errors of §1.1, crop areas inside their scale ranges with the CPU test's means."""
    aug = MultiCropAugmentation(32, 16, 2, (0.14, 1.0), (0.05, 0.4))
    specs = D.crop_specs(aug)
    rng = random.Random(11)
    params = np.stack([D.plan_sample(48, 48, specs, rng) for _ in range(4000)])
    for kind in KINDS:
        col = params[:, :, D.COL[kind]]
        for crop, kind_index in ((0, 0), (1, 1), (2, 2), (3, 2)):
            p = EXPECTED[kind][kind_index]
            assert within(col[:, crop].mean(), p, len(col)), (kind, crop, col[:, crop].mean())
    area = params[:, :, D.COL["area"]]
    assert 0.13 <= area[:, :2].min() and area[:, :2].max() <= 1.0
    assert 0.45 < area[:, :2].mean() < 0.6
    assert 0.04 <= area[:, 2:].min() and area[:, 2:].max() <= 0.42
    assert 0.17 < area[:, 2:].mean() < 0.24
    sigma = params[:, 0, D.COL["sigma"]]  # global crop 1 is always blurred
    assert 0.1 <= sigma.min() and sigma.max() <= 2.0 and abs(sigma.mean() - 1.05) < 0.03


def test_loader_draws_side_by_side_with_cpu(tmp_path):
    """A DALI epoch's per-crop draws (records=True) are the CPU pipeline's for the same
    images, and both sides' frequencies are within sampling error of §1.1."""
    root = write_folder(tmp_path / "d", 64, classes=4, seed=1)  # 256 images
    cfg = make_cfg(root, "train.batch_size=32")
    loader = D.build_dali_loader(cfg, records=True)
    folder = ImageFolder(root)
    aug = MultiCropAugmentation(32, 16, 2, (0.14, 1.0), (0.05, 0.4))
    dali_recs, cpu_recs = [], []
    for epoch in range(4):
        loader.set_epoch(epoch)
        for batch in loader:
            for index, recs in zip(batch["index"].tolist(), batch["records"]):
                img, _ = folder.load(index)
                cpu_recs.append(aug(img, sample_rng(cfg.train.seed, epoch, index))[2])
                dali_recs.append(recs)
    n = len(dali_recs)
    assert n == 1024
    for side in (dali_recs, cpu_recs):
        for kind in KINDS:
            for crop, kind_index in ((0, 0), (1, 1), (2, 2), (3, 2)):
                freq = np.mean([r[crop][kind] for r in side])
                assert within(freq, EXPECTED[kind][kind_index], n), (kind, crop, freq)
    for d, c in zip(dali_recs, cpu_recs):
        for dc, cc in zip(d, c):
            assert {k: dc[k] for k in cc} == cc


# -- DALI applies the draws -----------------------------------------------------------------

def gaussian_blur(x, sigma):
    """Separable Gaussian, window 2*ceil(3 sigma)+1, mirrored borders (reflect-101)."""
    r = int(np.ceil(3 * sigma))
    t = np.arange(-r, r + 1)
    k = np.exp(-t ** 2 / (2 * sigma ** 2))
    k /= k.sum()
    pad = np.pad(x, ((r, r), (0, 0), (0, 0)), mode="reflect")
    x = sum(k[i] * pad[i:i + x.shape[0]] for i in range(2 * r + 1))
    pad = np.pad(x, ((0, 0), (r, r), (0, 0)), mode="reflect")
    return sum(k[i] * pad[:, i:i + x.shape[1]] for i in range(2 * r + 1))


def render(img, rec, size, blur=True):
    """The crop its record describes, in numpy (the operations of the module docstring)."""
    box = (rec["left"], rec["top"], rec["left"] + rec["width"], rec["top"] + rec["height"])
    x = np.asarray(img.resize((size, size), Image.BICUBIC, box=box), dtype=np.float64)
    if rec["flip"]:
        x = x[:, ::-1]
    A, K = D.colour_matrices([rec["brightness"]], [rec["contrast"]], [rec["saturation"]],
                             [rec["hue"]], [rec["gray"]])
    x = np.clip(x @ A[0].T + K[0] @ x.reshape(-1, 3).mean(0), 0, 255)
    if rec["blur"] and blur:
        x = gaussian_blur(x, rec["sigma"])
    if rec["solarize"]:
        x = np.where(x >= 128, 255 - x, x)
    return x


def test_every_crop_is_its_draws_rendered(folder):
    """Each output crop (crop-major rows k*B + b) equals a numpy rendering of its record:
    mean error < 1 grey level. Blurred crops (sigma > 0.8) are much closer to the blurred
    rendering than to the unblurred one."""
    cfg = make_cfg(folder)
    loader = D.build_dali_loader(cfg, records=True, dtype=torch.float32)
    source = ImageFolder(folder)
    loader.set_epoch(2)
    B, checked, blurred = 8, 0, 0
    for step, batch in zip(range(3), loader):
        for b, index in enumerate(batch["index"].tolist()):
            img, label = source.load(index)
            assert batch["labels"][b] == label
            for k, rec in enumerate(batch["records"][b]):
                out = to_pixels(crops_of(batch, k, B)[b])
                size = out.shape[0]
                err = np.abs(out - render(img, rec, size)).mean()
                assert err < 1.0, (step, b, k, rec, err)
                if rec["blur"] and rec["sigma"] > 0.8:
                    assert np.abs(out - render(img, rec, size, blur=False)).mean() > 3 * err
                    blurred += 1
                checked += 1
    assert checked == 3 * 8 * 4 and blurred > 10


def test_exif_orientation_is_ignored_as_on_the_cpu_path(tmp_path):
    """Non-square JPEGs tagged "rotate 90": DALI must not rotate them (the boxes are drawn
    on PIL's unrotated size), so every crop still matches its rendering."""
    root = tmp_path / "exif" / "a"
    root.mkdir(parents=True)
    rng = np.random.default_rng(6)
    for i in range(8):
        img = smooth_image(rng).resize((60, 36))
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: rotate 90 clockwise to display
        img.save(root / f"{i}.jpg", "JPEG", quality=95, exif=exif)
    cfg = make_cfg(root.parent)
    loader = D.build_dali_loader(cfg, records=True, dtype=torch.float32)
    loader.set_epoch(0)
    (batch,) = list(loader)
    source = ImageFolder(root.parent)
    for b, index in enumerate(batch["index"].tolist()):
        img, _ = source.load(index)
        assert img.size == (60, 36)
        for k, rec in enumerate(batch["records"][b]):
            out = to_pixels(crops_of(batch, k, 8)[b])
            assert np.abs(out - render(img, rec, out.shape[0])).mean() < 1.5


def test_ops_read_back_from_controlled_images(tmp_path):
    """Controlled sources: a grey ramp (flip = sign of the left-right slope), a saturated
    constant colour (grayscale = no channel spread; jitter = colour changed, on crops
    neither grey nor solarised), a constant
    grey 240 (solarised = below 128). Every crop agrees with its draw, and the frequencies
    read from the pixels are within sampling error of §1.1."""
    root = tmp_path / "controlled"
    ramp = np.repeat(np.linspace(8, 64, 48)[None, :, None], 48, 0).repeat(3, 2)
    sources = {"a_ramp": ramp, "b_colour": np.full((48, 48, 3), (200, 60, 30)),
               "c_bright": np.full((48, 48, 3), 240)}
    for name, arr in sources.items():
        (root / name).mkdir(parents=True)
        for i in range(64):
            Image.fromarray(arr.astype(np.uint8)).save(root / name / f"{i:03d}.png")
    cfg = make_cfg(root, "data.n_local=4", "train.batch_size=32")
    loader = D.build_dali_loader(cfg, records=True, dtype=torch.float32)
    seen = {kind: [] for kind in KINDS}  # (crop, drawn, read back)
    for epoch in range(4):
        loader.set_epoch(epoch)
        for batch in loader:
            B = len(batch["labels"])
            for b, label in enumerate(batch["labels"].tolist()):
                for k, rec in enumerate(batch["records"][b]):
                    x = to_pixels(crops_of(batch, k, B)[b])
                    if label == 0:
                        slope = x[:, x.shape[1] // 2:].mean() - x[:, :x.shape[1] // 2].mean()
                        seen["flip"].append((k, rec["flip"], slope < 0))
                    elif label == 1:
                        gray = (x.max(2) - x.min(2)).mean() < 1.0
                        seen["gray"].append((k, rec["gray"], gray))
                        if not rec["gray"] and not rec["solarize"]:
                            changed = np.abs(x.mean((0, 1)) - (200, 60, 30)).max() > 0.5
                            seen["jitter"].append((k, rec["jitter"], changed))
                    else:
                        seen["solarize"].append((k, rec["solarize"], x.mean() < 128))
    index = {0: 0, 1: 1}
    for kind, rows in seen.items():
        if not rows:
            continue
        rows = np.array(rows, dtype=np.int64)
        assert (rows[:, 1] == rows[:, 2]).all(), (kind, int((rows[:, 1] != rows[:, 2]).sum()))
        for k in range(6):
            read = rows[rows[:, 0] == k, 2]
            p = EXPECTED[kind][index.get(k, 2)]
            assert within(read.mean(), p, len(read)), (kind, k, read.mean(), len(read))


def test_colour_map_against_pil():
    """Brightness, contrast, saturation and grayscale alone are PIL's to rounding; chained,
    they differ only by PIL's clamping and rounding between steps (module docstring). The
    YIQ hue rotation approximates PIL's HSV hue shift: correlated changes of a similar size."""
    from PIL import ImageEnhance

    rng = np.random.default_rng(3)
    img = smooth_image(rng)
    x = np.asarray(img, dtype=np.float64)
    for b, c, s, gray, tol in [(1.3, 1.0, 1.0, False, 0.6), (1.0, 0.7, 1.0, False, 0.6),
                               (1.0, 1.0, 0.8, False, 0.6), (1.0, 1.0, 1.0, True, 0.6),
                               (0.8, 1.2, 1.1, False, 1.5), (0.8, 1.2, 1.1, True, 2.5),
                               (1.0, 1.0, 1.0, False, 1e-3)]:
        ref = ImageEnhance.Contrast(ImageEnhance.Brightness(img).enhance(b)).enhance(c)
        ref = ImageEnhance.Color(ref).enhance(s)
        if gray:
            ref = ref.convert("L").convert("RGB")
        A, K = D.colour_matrices([b], [c], [s], [0.0], [gray])
        y = np.clip(x @ A[0].T + K[0] @ x.reshape(-1, 3).mean(0), 0, 255)
        assert np.abs(y - np.asarray(ref, dtype=np.float64)).mean() <= tol, (b, c, s, gray)
    for h in (-0.1, -0.04, 0.06):
        ref = np.asarray(adjust_hue(img, h), dtype=np.float64)
        A, K = D.colour_matrices([1.0], [1.0], [1.0], [h], [False])
        change = (np.clip(x @ A[0].T, 0, 255) - x).ravel()
        change_ref = (ref - x).ravel()
        assert np.corrcoef(change, change_ref)[0, 1] > 0.5, h
        assert 0.7 < np.abs(change).mean() / np.abs(change_ref).mean() < 1.6, h


# -- batch format ---------------------------------------------------------------------------

def test_batch_format_through_build_train_loader(folder):
    cfg = make_cfg(folder, "data.pipeline=dali", "data.num_workers=2", "data.prefetch=3")
    loader = build_train_loader(cfg, index_rows=256)
    assert isinstance(loader, D.DaliTrainLoader)
    assert loader.batches_per_epoch == len(loader) == 64 // 8
    loader.set_epoch(0, start_batch=5)
    assert len(loader) == 3
    batches = list(loader)
    assert len(batches) == 3
    folder_targets = set(ImageFolder(folder).targets.tolist())
    for batch in batches:
        assert batch["globals"].shape == (16, 3, 32, 32) and batch["globals"].dtype == torch.float32
        assert batch["locals"].shape == (16, 3, 16, 16) and batch["locals"].dtype == torch.float32
        assert batch["masks"].shape == (16, 16) and batch["masks"].dtype == torch.bool
        assert batch["labels"].shape == (8,) and set(batch["labels"].tolist()) <= folder_targets
        assert batch["n_bad"] == 0 and batch["bad"] == []
        assert batch["mask_index"].shape == (256,) and batch["mask_count"] == batch["masks"].sum()
        lo = min((0 - m) / s for m, s in zip(MEAN, STD))
        hi = max((1 - m) / s for m, s in zip(MEAN, STD))
        for x in (batch["globals"], batch["locals"]):
            assert lo - 1e-3 <= x.min() and x.max() <= hi + 1e-3 and x.std() > 0.1
        assert "records" not in batch and "index" not in batch


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_outputs(folder, dtype):
    cfg = make_cfg(folder)
    ref = D.build_dali_loader(cfg, dtype=torch.float32)
    low = D.build_dali_loader(cfg, dtype=dtype)
    for loader in (ref, low):
        loader.set_epoch(1)
    a, b = next(iter(ref)), next(iter(low))
    assert b["globals"].dtype == dtype and b["locals"].dtype == dtype
    tol = 0.02 if dtype == torch.bfloat16 else 0.002
    assert torch.allclose(b["globals"].float(), a["globals"], atol=tol)
    assert torch.allclose(b["locals"].float(), a["locals"], atol=tol)



class _StandInPipeline:
    """The calls DaliTrainLoader makes of a DALI pipeline: `schedule_run` runs the
    external source `prefetch` batches ahead (then one per call), `share_outputs` hands
    one batch's crops over; `log` records how."""

    def __init__(self, source, depth, crop_shapes, log):
        self.source, self.depth, self.shapes, self.log = source, depth, crop_shapes, log
        self.queue, self.first = [], True

    def schedule_run(self):
        for _ in range(self.depth if self.first else 1):
            self.first = False
            try:
                self.queue.append(self.source())
            except StopIteration:
                break
        self.log.append(("ahead", len(self.queue)))

    def share_outputs(self, cuda_stream=None):
        self.log.append(("share", cuda_stream))
        if not self.queue:
            raise StopIteration
        self.queue.pop(0)
        return [_StandInOutput(shape) for shape in self.shapes]

    def release_outputs(self):
        self.log.append(("release",))

    def reset(self):
        pass


class _StandInOutput:
    def __init__(self, shape):
        self.shape = shape

    def as_tensor(self):
        return self


def test_hand_over_never_waits(folder, monkeypatch):
    """The GPU hand-over, with a stand-in pipeline and stand-in CUDA calls (no GPU here):
    DALI's outputs are bound to torch's current stream, each crop is copied
    asynchronously on that stream into a fresh batch tensor (a batch still held is
    never written again), one event is recorded after the copies and then only polled:
    the host waits on it only when the GPU is more than 2 x prefetch + 2 batches behind,
    and never synchronises the device or a stream. DALI stays `prefetch` batches ahead.
    What this cannot show (a GPU run must): that DALI's kernels, on their own stream,
    leave the step its speed (`bench_train --with-data`, vs_synthetic)."""
    import nvidia.dali.plugin.pytorch as dali_torch

    cfg = make_cfg(folder, "train.batch_size=4", "data.prefetch=2")
    loader = D.build_dali_loader(cfg)
    B, gsize, lsize = 4, 32, 16
    log = []

    class Stream:
        def synchronize(self):
            raise AssertionError("a stream was synchronised")

    class Event:
        def record(self, stream):
            log.append(("record", stream))

        def query(self):
            log.append(("query",))
            return False  # the GPU is busy: the loader must not wait for it

        def synchronize(self):
            log.append(("wait",))

    def feed_ndarray(tensor, target, cuda_stream=None):
        assert list(target.shape) == [B, 3, *tensor.shape], (target.shape, tensor.shape)
        value = float(len(log))
        log.append(("copy", cuda_stream, target.data_ptr(), value))
        return target.fill_(value)

    def forbidden(*args, **kwargs):
        raise AssertionError("the device was synchronised")

    stream = Stream()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", forbidden)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
    monkeypatch.setattr(dali_torch, "feed_ndarray", feed_ndarray)
    loader.gpu = True
    shapes = [(gsize, gsize)] * 2 + [(lsize, lsize)] * loader.n_local
    loader.pipe = _StandInPipeline(loader._next_inputs, loader.prefetch, shapes, log)
    loader.set_epoch(0)
    held, batches = [], 0
    for batch in loader:
        batches += 1
        held.append(batch)  # the step still reads these: no later copy may land in them
        ahead = [entry[1] for entry in log if entry[0] == "ahead"][-1]
        assert ahead >= min(loader.prefetch, len(loader) - batches), log
    assert batches == len(loader) == 16
    shares = [e for e in log if e[0] == "share"]
    copies = [e for e in log if e[0] == "copy"]
    assert all(e[1] is stream for e in shares) and len(shares) == batches + 1
    assert all(e[1] is stream for e in copies) and len(copies) == batches * len(shapes)
    assert len({e[2] for e in copies}) == len(copies)  # every crop into fresh memory
    records = [e for e in log if e[0] == "record"]
    assert len(records) == batches and all(e[1] is stream for e in records)
    # one event per batch is held; the host waits only on events 2 x prefetch + 2 old
    cap = 2 * loader.prefetch + 2
    assert sum(e[0] == "wait" for e in log) == batches - cap
    for i, batch in enumerate(held):  # what each batch was given is still there
        _, _, pointer, value = copies[i * len(shapes)]
        assert batch["globals"].data_ptr() == pointer
        assert bool((batch["globals"][:B] == value).all())


@pytest.mark.gpu
def test_gpu_pipeline_matches_the_cpu_graph(folder):
    """nvJPEG/GPU operators give the CPU graph's crops (PNG sources: lossless decode on
    both), bf16 by default, on the GPU; masks and labels are identical."""
    cfg = make_cfg(folder)
    cuda = torch.device("cuda")
    cpu_loader = D.build_dali_loader(cfg, dtype=torch.float32)
    gpu_loader = D.build_dali_loader(cfg, device=cuda, dtype=torch.float32)
    default = D.build_dali_loader(cfg, device=cuda)
    for loader in (cpu_loader, gpu_loader, default):
        loader.set_epoch(1)
    for a, b, c in zip(cpu_loader, gpu_loader, default):
        assert b["globals"].device.type == "cuda" and c["globals"].dtype == torch.bfloat16
        for key in ("globals", "locals"):
            diff = (b[key].cpu() - a[key]).abs()
            assert diff.mean() < 0.01 and diff.max() < 0.3, (key, diff.mean(), diff.max())
            assert (c[key].float() - b[key]).abs().max() < 0.05
        assert torch.equal(a["masks"], b["masks"]) and torch.equal(a["labels"], b["labels"])
    torch.cuda.synchronize()


def test_output_dtype_follows_precision(folder):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert D.output_dtype(make_cfg(folder), cpu) == torch.float32
    assert D.output_dtype(make_cfg(folder), gpu) == torch.bfloat16
    assert D.output_dtype(make_cfg(folder, "train.precision=fp16"), gpu) == torch.float16
    assert D.output_dtype(make_cfg(folder, "train.precision=bf16"), cpu) == torch.bfloat16


# -- sharding, epochs, resume ---------------------------------------------------------------

def test_ranks_cover_the_epoch_once_and_resume(tmp_path):
    """24 images, one class each, 3 ranks x batch 4: each epoch every image exactly once,
    rank r's batch b = positions r, r+3, ... of global batch b (the CPU sampler); a resume
    at batch 1 gives the same labels and the same pixels."""
    root = write_folder(tmp_path / "d", 1, classes=24, seed=2)
    world = 3
    cfgs = make_cfg(root, "train.batch_size=4", "data.n_local=0")
    loaders = [D.build_dali_loader(cfgs, world, r) for r in range(world)]
    for epoch in (0, 1):
        per_rank = []
        for loader in loaders:
            loader.set_epoch(epoch)
            per_rank.append(list(loader))
        labels = [[b["labels"].tolist() for b in batches] for batches in per_rank]
        flat = [x for rank in labels for batch in rank for x in batch]
        assert sorted(flat) == list(range(24))
        for r in range(world):
            sampler = EpochBatchSampler(24, 4, world, r, cfgs.train.seed)
            sampler.set_epoch(epoch)
            assert labels[r] == [[i for i, _ in keys] for keys in sampler]
    assert per_rank[1][0]["locals"].shape == (0, 3, 16, 16)
    resumed = loaders[1]
    resumed.set_epoch(1, start_batch=1)
    again = list(resumed)
    assert len(again) == 1 and torch.equal(again[0]["labels"], per_rank[1][1]["labels"])
    assert torch.equal(again[0]["globals"], per_rank[1][1]["globals"])


def test_abandoned_epoch_then_full_epoch(folder):
    cfg = make_cfg(folder)
    loader = D.build_dali_loader(cfg)
    loader.set_epoch(0)
    first = None
    for first in loader:
        break
    loader.set_epoch(0)
    batches = list(loader)
    assert len(batches) == 8 and torch.equal(batches[0]["globals"], first["globals"])


# -- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_corrupt_files_are_skipped_and_counted(tmp_path, device):
    """Three bad files among 13 good, each followed by a good one: garbage (fails the header
    check), a truncated JPEG (no end-of-image marker), and a PNG whose pixel stream is
    damaged (passes the checks, fails DALI's decoder: the loader rebuilds the pipeline and
    re-reads). Each epoch counts each once, as the CPU path does for the same keys."""
    root = write_folder(tmp_path / "d", 13, classes=1, seed=3)
    cls = root / "class000"
    names = ("img003_garbage.png", "img007_truncated.jpg", "img010_damaged.png")
    (cls / names[0]).write_bytes(b"this is not an image")
    buf = io.BytesIO()
    smooth_image(np.random.default_rng(9)).save(buf, "JPEG")
    (cls / names[1]).write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    buf = io.BytesIO()
    smooth_image(np.random.default_rng(10)).save(buf, "PNG")
    damaged = bytearray(buf.getvalue())
    at = damaged.find(b"IDAT")
    damaged[at + 20:at + 60] = bytes(40)
    (cls / names[2]).write_bytes(bytes(damaged))
    cfg = make_cfg(root, "train.batch_size=4", "data.prefetch=2")
    loader = D.build_dali_loader(cfg, device=torch.device(device), records=True)
    cpu = MultiCropDataset(ImageFolder(root), MultiCropAugmentation(32, 16, 2))
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == 4 and all(b["globals"].shape == (8, 3, 32, 32) for b in batches)
        assert sum(b["n_bad"] for b in batches) == 3
        bad = " ".join(x for b in batches for x in b["bad"])
        assert all(name in bad for name in names)
        sampler = EpochBatchSampler(16, 4, seed=cfg.train.seed)
        sampler.set_epoch(epoch)
        for batch, keys in zip(batches, sampler):
            cpu_samples = [cpu[key] for key in keys]
            assert batch["n_bad"] == sum(s["n_bad"] for s in cpu_samples)
            assert batch["index"].tolist() == [s["index"] for s in cpu_samples]


def test_check_image_rejects_and_accepts():
    rng = np.random.default_rng(4)
    buf = io.BytesIO()
    smooth_image(rng).save(buf, "JPEG")
    jpeg = buf.getvalue()
    assert D.check_image(jpeg, "x") == (48, 48)
    assert D.check_image(jpeg + b"trailing", "x") == (48, 48)
    for bad in (b"", b"GIF89a not really", jpeg[:-300]):
        with pytest.raises(D.BadImage):
            D.check_image(bad, "x")


def test_empty_or_missing_data_is_a_one_line_user_error(tmp_path):
    (tmp_path / "empty" / "class_a").mkdir(parents=True)
    for cfg, match in ((make_cfg(tmp_path / "empty"), "no images"),
                       (make_cfg(tmp_path / "missing"), "does not exist"),
                       (make_cfg(tmp_path / "none-{00..03}.tar", source="webdataset"),
                        "no webdataset shards")):
        with pytest.raises(UserError, match=match) as info:
            D.build_dali_loader(cfg)
        assert "\n" not in str(info.value)


def test_missing_dali_is_a_user_error(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "nvidia.dali", None)
    with pytest.raises(UserError, match="pip install nvidia-dali"):
        D._dali()


# -- masks ----------------------------------------------------------------------------------

def test_iid_masks_are_the_cpu_paths_and_respect_pred_start_epoch(folder):
    cfg = make_cfg(folder, "masks.pred_start_epoch=1")
    loader = D.build_dali_loader(cfg, index_rows=128, records=True)
    source = ImageFolder(folder)
    grid = (4, 4)
    sampler = BlockMaskSampler(grid, cfg.masks.pred_ratio, cfg.masks.pred_ratio_var,
                               cfg.masks.pred_aspect)
    cpu = MultiCropDataset(source, MultiCropAugmentation(32, 16, 2, (0.14, 1.0), (0.05, 0.4)),
                           sampler, cfg.train.seed, pred_start_epoch=1)
    loader.set_epoch(0)
    assert not any(b["masks"].any() for b in loader)
    loader.set_epoch(1)
    masked = 0
    for batch in loader:
        B = len(batch["labels"])
        assert batch["masks"].shape == (2 * B, 16)
        for b, index in enumerate(batch["index"].tolist()):
            ref = cpu[(index, 1)]["masks"]
            assert torch.equal(batch["masks"][b], ref[0])
            assert torch.equal(batch["masks"][B + b], ref[1])
        count = batch["mask_count"]
        assert count == int(batch["masks"].sum())
        assert torch.equal(batch["mask_index"][:count], batch["masks"].reshape(-1).nonzero()[:, 0])
        assert batch["mask_index"].numel() == max(128, -(-count // 64) * 64)
        masked += count
    assert masked > 0


def test_stratified_masks_have_a_fixed_total(folder):
    cfg = make_cfg(folder, "masks.sampler=stratified", "data.n_local=0")
    loader = D.build_dali_loader(cfg, index_rows=64)
    sampler = sampler_from_config(cfg.masks, (4, 4))
    assert isinstance(sampler, StratifiedMaskSampler)
    expected = sampler.total(16)
    loader.set_epoch(3)
    totals = [int(b["masks"].sum()) for b in loader]
    assert len(totals) == 8 and set(totals) == {expected} and expected > 0
    batch = next(iter(loader))
    index, count = masked_index(batch["masks"], 64)
    assert torch.equal(batch["mask_index"], index) and batch["mask_count"] == count


# -- webdataset -----------------------------------------------------------------------------

def write_shards(folder, n_shards, per_shard, seed=5):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    label = 0
    for s in range(n_shards):
        with tarfile.open(folder / f"train-{s:02d}.tar", "w") as tf:
            for i in range(per_shard):
                buf = io.BytesIO()
                smooth_image(rng).save(buf, "JPEG", quality=90)
                for ext, data in (("jpg", buf.getvalue()), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"part{s}/sample{i:04d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
                label += 1
    return label


def test_webdataset_shards(tmp_path):
    n = write_shards(tmp_path / "shards", 3, 8)
    assert expand_shards(str(tmp_path / "shards")) == \
        expand_shards(str(tmp_path / "shards" / "train-{00..02}.tar")) == \
        expand_shards(str(tmp_path / "shards" / "*.tar"))
    cfg = make_cfg(tmp_path / "shards" / "train-{00..02}.tar", "train.batch_size=6",
                   source="webdataset")
    loaders = [D.build_dali_loader(cfg, 2, r, records=True) for r in range(2)]
    for epoch in (0, 1):
        seen = []
        for loader in loaders:
            loader.set_epoch(epoch)
            for batch in loader:
                assert batch["globals"].shape == (12, 3, 32, 32)
                seen += batch["labels"].tolist()
        assert sorted(seen) == list(range(n))


def test_webdataset_bad_member_is_skipped(tmp_path):
    write_shards(tmp_path / "shards", 1, 7)
    with tarfile.open(tmp_path / "shards" / "train-00.tar", "a") as tf:
        data = b"\xff\xd8 broken"
        info = tarfile.TarInfo("part0/broken.jpg")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    cfg = make_cfg(tmp_path / "shards", "train.batch_size=8", source="webdataset")
    loader = D.build_dali_loader(cfg)
    loader.set_epoch(0)
    (batch,) = list(loader)
    assert batch["n_bad"] == 1 and "broken.jpg" in batch["bad"][0]


def test_blur_sigma_range_reaches_both_pipelines(monkeypatch):
    """`data.blur_sigma` sets the blur range of the CPU crops and of the DALI plan alike."""
    from ibot_fast.config import build_config
    from ibot_fast.data import cpu
    aug = cpu.build_augmentation(build_config("demo", ["data.blur_sigma=0.2,0.4"]))
    assert aug.blur_sigma == (0.2, 0.4)
    radii = []

    def recording_blur(radius):
        radii.append(radius)
        return cpu.ImageFilter.BoxBlur(0)

    monkeypatch.setattr(cpu.ImageFilter, "GaussianBlur", recording_blur)
    img = Image.new("RGB", (40, 40), (90, 30, 200))
    for i in range(30):
        aug(img, sample_rng(0, 0, i))
    assert radii and min(radii) >= 0.2 and max(radii) <= 0.4
    params = np.stack([D.plan_sample(40, 40, D.crop_specs(aug), sample_rng(0, 0, i),
                                     aug.blur_sigma) for i in range(30)])
    sigma = params[:, 0, D.COL["sigma"]]  # global crop 1: always blurred
    assert sigma.min() >= 0.2 and sigma.max() <= 0.4 and sigma.std() > 0

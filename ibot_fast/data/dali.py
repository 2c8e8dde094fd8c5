"""The DALI data path: decoding and multi-crop augmentation on the GPU (docs/design.md §1.1).

    loader = build_dali_loader(cfg, world_size, rank, index_rows, device)
    loader.set_epoch(epoch, start_batch)
    for batch in loader: ...

Selected by `data.pipeline=dali` (or `auto` with a GPU). The loader has the interface of
`ibot_fast.data.TrainLoader` and yields batches in exactly the format of `cpu.Collate`:
globals [2B, 3, S, S] and locals [L*B, 3, s, s] crop-major, on the device, bf16 by default
(fp16/fp32 follow train.precision or the `dtype` argument); masks [2B, N] bool, labels [B],
n_bad, bad, and mask_index / mask_count when `index_rows` is given. With `device_id=None`
(a CPU device) the same graph runs on the CPU: that is how the tests run it.

How a batch is made
-------------------
1. *Which images.* `cpu.EpochBatchSampler`, the CPU path's own object: a seeded
   permutation per epoch, global batches of batch_size x world_size, process r takes
   positions r, r + world, ... of each, the incomplete last batch dropped, resumable at a
   batch boundary by `set_epoch(epoch, start_batch)`. Epoch length, sharding and resume
   are therefore those of the CPU path and of the trainer's checkpoints, batch for batch.
2. *Bytes and draws* (torch DataLoader worker processes, `data.num_workers` of them,
   `data.prefetch` batches each). A worker reads the encoded file, checks it (below),
   and draws every random parameter of the image's 2 + n crops in Python from
   `sample_rng(seed, epoch, index)`, in the CPU path's order, then the image's masks
   from the same generator. The per-crop parameters and masks are therefore *the same
   numbers* the CPU path draws for that image (the tests assert it), augmentation does
   not depend on worker counts, world size or resumption, and
   `build_dali_loader(..., records=True)` reports them with each batch. Processes, not
   threads: this is ~0.2 ms of Python per image, which in threads would take the GIL
   from the training loop at thousands of images/s. The collate turns the batch's
   draws into DALI's argument arrays (`dali_inputs`) there too, so the training process
   only hands arrays over.
3. *Decoding and crops* (DALI, on its own CUDA stream). `fn.external_source` receives
   each batch's encoded bytes and per-crop argument arrays (its callback runs in the
   training process, in `schedule_run`); `fn.decoders.image` decodes (`mixed`: nvJPEG on
   the GPU; CPU with `device_id=None`); each crop is a short straight-line graph whose
   per-sample arguments carry the draws (an op that was not drawn gets identity
   arguments), so there are no conditionals and no DALI random operators. DALI runs
   `prefetch_queue_depth = data.prefetch` (2) batches ahead of the one being handed over.
4. *Hand-over*, without a host synchronisation: `share_outputs(stream)` binds the
   outputs to torch's current stream (that stream waits, on the GPU, for DALI's work on
   them; the host waits only until DALI has run the batch's CPU stage and launched its
   GPU work, which prefetching has normally done long before), and each crop
   is copied (`feed_ndarray`, asynchronous on that stream) into its crop-major slice of
   a fresh batch tensor from torch's allocator, so nothing DALI overwrites later is ever
   read by the step. DALI's buffers stay referenced until a CUDA event recorded after the
   copies has passed (polled, never waited on, unless the GPU is more than
   2 x prefetch + 2 batches behind). `tests/test_dali.py::test_hand_over_never_waits`
   checks this order of calls with a stand-in pipeline; the trainer copies the rest of
   the batch (masks, masked-token index, from pinned memory) with `non_blocking=True`.

Why not `fn.readers.file` / `fn.readers.webdataset`: DALI's readers shard and shuffle by
their own rules (a shuffle buffer with an internal generator), so neither the CPU path's
batches nor a resume at a batch boundary can be reproduced from the trainer's checkpoint
(epoch, batch_in_epoch), and per-image augmentation seeds would be lost. Webdataset tar
shards are read instead through an index of their members (`TarShards`: one scan of the
tar headers at start-up, then `os.pread` per image), which gives them exactly the
semantics above. The cost is random rather than sequential reads inside a shard: right
for local disks and the page cache, slower on object stores.

The crop, in the CPU path's order
---------------------------------
  RandomResizedCrop   `fn.resize` with a per-sample ROI (the box drawn by
                      `cpu.random_resized_crop` itself, passed relative to the image so it
                      cannot leave it), bicubic, antialiased, uint8 out; EXIF orientation
                      ignored, as by PIL on the CPU path
  flip p 0.5          the same ROI with its x-coordinates swapped (DALI flips a reversed ROI)
  colour jitter p 0.8 one per-pixel affine map (below), then a clamp to [0, 255]
                      (`data.color_jitter_p`)
  grayscale p 0.2     folded into the same map: saturation 0
  blur p 1/0.1/0.5    `fn.gaussian_blur`, sigma ~ U(data.blur_sigma), (0.1, 2.0) by
                      default, window 2*ceil(3 sigma)+1;
                      a crop without blur gets window 1, the identity
  solarize p 0.2      global crop 2 only: x + s * (x >= 128) * (255 - 2x), s the 0/1 draw
                      (`data.solarize_p`)
  normalise           `fn.crop_mirror_normalize` (ImageNet mean/std), CHW, fp16 or fp32

Colour jitter and grayscale. DALI has no grayscale or solarize operator and its colour
twist uses a fixed contrast centre, so the jitter is built from `fn.coord_transform` (a
per-pixel 3x3 matrix) and `fn.reductions.mean`. Order chosen: brightness, contrast,
saturation, hue, then grayscale (torchvision applies the four jitter operations in a
random order; the order is still drawn, to keep the two paths' generators in step, but
not used). With luma w = (0.299, 0.587, 0.114) (PIL's "L"), each step is linear:
brightness x -> b x; contrast x -> c x + (1 - c) mean(w.x) (PIL's grey-mean centre);
saturation x -> s x + (1 - s) (w.x) 1 (PIL's blend with grey); hue a rotation by
-2 pi h of the chroma plane of YIQ (DALI's own hue; PIL shifts the HSV hue, which this
approximates: same direction, luma kept; on saturated colours the per-pixel changes
correlate ~0.7 with PIL's and are up to ~30% larger); grayscale x -> (w.x) 1.
Saturation, hue and grayscale fix the grey axis and keep luma, so the whole chain is
    y = b c G R_h S_s x + b (1 - c) (w . mean(x)) 1,
a `coord_transform` of the crop plus one of its mean. In exact arithmetic the four
jitter operations then commute: orders differ only through the uint8 rounding and
clamping PIL does after each step, which here happens once, at the end (one operation
alone is PIL's to < 0.5 grey levels; a chain differs by ~1-2 levels on average, more
where PIL clamps in between). Identity draws (no jitter: b = c = s = 1, h = 0) give y = x.

Unreadable files. A worker checks each file before it reaches the decoder: the header
must parse (PIL, no decoding) as a format DALI decodes, a JPEG must have an end-of-image
marker after its last scan, a PNG its IEND chunk; a file that fails is counted (`n_bad`,
`bad`) and replaced by the next index, as on the CPU path (so `n_bad` counts failed
reads, as there: a key whose next index is also bad counts both). A file that passes these checks
and still fails DALI's decoder (a damaged PNG stream, say) makes the pipeline raise: the
loader then rebuilds it, re-reads the batches that were in flight with every image
test-decoded by DALI alone, and goes on; a batch that fails twice is a real error and is
raised. JPEGs that libjpeg-turbo decodes with a warning are kept (PIL rejects some).

Nothing runs at import time; without DALI, building a loader raises a one-line UserError.
"""
import atexit
import io
import logging
import math
import os
import weakref
from collections import deque
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from .. import UserError
from ..masking import BlockMaskSampler, masked_index, sampler_from_config
from .cpu import MEAN, STD, EpochBatchSampler, build_augmentation, random_resized_crop, sample_rng
from .datasets import BadImage, TarShards, build_dataset

log = logging.getLogger(__name__)

# One row of parameters per crop; `plan_crop` draws them, `dali_inputs` turns them into
# DALI's per-sample arguments, `crop_records` into the CPU path's per-crop records.
PARAMS = ("image_height", "image_width", "top", "left", "height", "width", "area", "flip",
          "jitter", "brightness", "contrast", "saturation", "hue", "gray", "blur", "sigma",
          "solarize")
COL = {name: i for i, name in enumerate(PARAMS)}
JITTER = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue (cpu.color_jitter)
LUMA = (0.299, 0.587, 0.114)  # PIL's "L" conversion
DECODABLE = {"JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000"}
MAX_CONSECUTIVE_BAD = 50


def _dali():
    """The DALI modules, or a one-line error saying how to install them."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn  # noqa: F401
        import nvidia.dali.math  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
        import nvidia.dali.types  # noqa: F401
    except ImportError as e:
        raise UserError(f"data.pipeline=dali needs NVIDIA DALI ({e}): pip install "
                        "nvidia-dali-cuda130 (CUDA 13) or nvidia-dali-cuda120 (CUDA 12)") from None
    return dali


# -- the draws (Python, in the DataLoader workers) ----------------------------------------

class _SizeOnly:
    """Stands in for a PIL image in `cpu.random_resized_crop`, so that the box is drawn by
    the CPU path's own code: it has a size, and `resize` returns the box it is given."""

    def __init__(self, width, height):
        self.size = (width, height)

    def resize(self, size, resample=None, box=None):
        return box


def plan_crop(width, height, size, scale, blur_p, solarize_p, rng, blur_sigma=(0.1, 2.0),
              color_jitter_p=0.8):
    """One crop's draws, in the order of `cpu.MultiCropAugmentation.crop`: a row of PARAMS."""
    (left, top, right, bottom), area = random_resized_crop(_SizeOnly(width, height), size,
                                                           scale, rng)
    flip = rng.random() < 0.5
    jitter = rng.random() < color_jitter_p
    b = c = s = 1.0
    h = 0.0
    if jitter:
        db, dc, ds, dh = JITTER
        b, c, s, h = (rng.uniform(1 - db, 1 + db), rng.uniform(1 - dc, 1 + dc),
                      rng.uniform(1 - ds, 1 + ds), rng.uniform(-dh, dh))
        rng.shuffle([0, 1, 2, 3])  # the CPU path's random order: drawn, not used (docstring)
    gray = rng.random() < 0.2
    blur = rng.random() < blur_p
    sigma = rng.uniform(*blur_sigma) if blur else 0.0
    solarize = rng.random() < solarize_p
    return (height, width, top, left, bottom - top, right - left, area, flip, jitter, b, c, s,
            h, gray, blur, sigma, solarize)


def crop_specs(aug):
    """(size, scale, blur p, solarize p) per crop, from a `cpu.MultiCropAugmentation`."""
    g, loc = (aug.global_size, aug.global_scale), (aug.local_size, aug.local_scale)
    return [(*g, *aug.global1_p), (*g, *aug.global2_p)] + [(*loc, *aug.local_p)] * aug.n_local


def plan_sample(width, height, specs, rng, blur_sigma=(0.1, 2.0),
                color_jitter_p=0.8) -> np.ndarray:
    """All crops of one image: float64 [n_crops, len(PARAMS)]."""
    return np.array([plan_crop(width, height, *spec, rng, blur_sigma, color_jitter_p)
                     for spec in specs], dtype=np.float64)


def crop_records(params: np.ndarray):
    """Per-crop records in the format of `cpu.MultiCropAugmentation` (area, flip, jitter,
    gray, blur, solarize), plus the drawn values, from one image's parameter rows."""
    out = []
    for row in params:
        rec = {name: float(row[COL[name]]) for name in PARAMS}
        for name in ("flip", "jitter", "gray", "blur", "solarize"):
            rec[name] = bool(rec[name])
        out.append(rec)
    return out


@lru_cache(maxsize=None)
def _yiq():
    rgb_to_yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322],
                           [0.211, -0.523, 0.312]])
    return rgb_to_yiq, np.linalg.inv(rgb_to_yiq)


def colour_matrices(brightness, contrast, saturation, hue, gray):
    """Arrays [n] -> (A, K) float32 [n, 3, 3]: the jitter + grayscale map y = A x + K mean(x)
    (module docstring). Identity draws give A = I (to rounding), K = 0."""
    b, c, s = (np.asarray(v, dtype=np.float64) for v in (brightness, contrast, saturation))
    theta = -2.0 * math.pi * np.asarray(hue, dtype=np.float64)
    n = b.shape[0]
    to_yiq, from_yiq = _yiq()
    chroma = np.zeros((n, 3, 3))
    chroma[:, 0, 0] = 1.0
    chroma[:, 1, 1] = chroma[:, 2, 2] = s * np.cos(theta)
    chroma[:, 1, 2] = -s * np.sin(theta)
    chroma[:, 2, 1] = s * np.sin(theta)
    grey = np.outer(np.ones(3), LUMA)  # x -> (w.x) 1
    colour = np.where(np.asarray(gray, dtype=bool)[:, None, None], grey,
                      from_yiq @ chroma @ to_yiq)
    A = (b * c)[:, None, None] * colour
    K = (b * (1.0 - c))[:, None, None] * grey
    return A.astype(np.float32), K.astype(np.float32)


def dali_inputs(params: np.ndarray, specs):
    """Parameter rows [B, n_crops, P] -> the per-crop DALI argument arrays, in the order of
    `_crop_inputs`: roi_start, roi_end [B, 2] (y, x relative to the image, so a box can
    never leave it; x swapped when flipped), A, K [B, 3, 3], blur window int32 [B], sigma
    [B], and a solarize flag [B] where p > 0."""
    out = []
    for k, (_, _, _, solarize_p) in enumerate(specs):
        p = params[:, k].astype(np.float64)
        top, left, h, w, H, W = (p[:, COL[n]] for n in ("top", "left", "height", "width",
                                                          "image_height", "image_width"))
        flip = p[:, COL["flip"]] > 0
        x0 = np.where(flip, left + w, left) / W
        x1 = np.where(flip, left, left + w) / W
        roi_start = np.stack([top / H, x0], 1).astype(np.float32)
        roi_end = np.stack([(top + h) / H, x1], 1).astype(np.float32)
        A, K = colour_matrices(p[:, COL["brightness"]], p[:, COL["contrast"]],
                               p[:, COL["saturation"]], p[:, COL["hue"]], p[:, COL["gray"]] > 0)
        blur = p[:, COL["blur"]] > 0
        sigma = p[:, COL["sigma"]]
        window = np.where(blur, 2 * np.ceil(3 * sigma) + 1, 1).astype(np.int32)
        out += [roi_start, roi_end, A, K, window, np.where(blur, sigma, 1.0).astype(np.float32)]
        if solarize_p > 0:
            out.append(p[:, COL["solarize"]].astype(np.float32))
    return out


# -- encoded sources ------------------------------------------------------------------------

def check_image(data: bytes, name: str):
    """Cheap checks before the decoder: (width, height), or BadImage. No pixels decoded."""
    if not data:
        raise BadImage(f"{name}: empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, size = img.format, img.size
    except Exception as e:
        raise BadImage(f"{name}: {type(e).__name__}: {e}") from None
    if fmt not in DECODABLE:
        raise BadImage(f"{name}: {fmt} images are not decoded by DALI")
    if fmt in ("JPEG", "MPO") and data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
        raise BadImage(f"{name}: truncated JPEG (no end-of-image marker after the last scan)")
    if fmt == "PNG" and data.rfind(b"IEND") < 0:
        raise BadImage(f"{name}: truncated PNG (no IEND chunk)")
    if size[0] < 1 or size[1] < 1:
        raise BadImage(f"{name}: empty image {size}")
    return size


class FileBytes:
    """The files of an `ImageFolder`, as encoded bytes."""

    def __init__(self, folder):
        self.samples, self.targets = folder.samples, folder.targets

    def __len__(self):
        return len(self.samples)

    def read(self, i: int):
        path, label = self.samples[i]
        try:
            with open(path, "rb") as f:
                return f.read(), label, path
        except OSError as e:
            raise BadImage(f"{path}: {type(e).__name__}: {e}") from None


class EncodedImages:
    """An in-memory source (digits, synthetic) encoded as PNG, so DALI can decode it."""

    def __init__(self, dataset):
        self.dataset, self.targets = dataset, dataset.targets

    def __len__(self):
        return len(self.dataset)

    def read(self, i: int):
        img, label = self.dataset.load(i)
        buf = io.BytesIO()
        img.save(buf, "PNG", compress_level=1)
        return buf.getvalue(), label, f"image {i}"


def build_source(cfg):
    """The encoded-image source named by data.source (folder | webdataset | digits | synthetic)."""
    if cfg.data.source == "webdataset":
        return TarShards(cfg.data.path)
    dataset = build_dataset(cfg, "train")
    if hasattr(dataset, "samples"):  # an ImageFolder: its files
        return FileBytes(dataset)
    return EncodedImages(dataset)


# -- samples and batches (DataLoader workers) -----------------------------------------------

class PlannedDataset(torch.utils.data.Dataset):
    """key (index, epoch) -> encoded bytes, the crops' parameter rows, masks, label.

    An unreadable image is replaced by the next index, and counted, as in
    `cpu.MultiCropDataset`; the draws come from `sample_rng(seed, epoch, index)` of the
    image actually used, and the i.i.d. masks from the same generator after them.
    """

    def __init__(self, source, specs, mask_sampler=None, seed=0, pred_start_epoch=0,
                 blur_sigma=(0.1, 2.0), color_jitter_p=0.8):
        self.source, self.specs, self.blur_sigma = source, specs, tuple(blur_sigma)
        self.color_jitter_p = color_jitter_p
        self.mask_sampler = mask_sampler  # per-sample (iid) sampler, or None
        self.seed, self.pred_start_epoch = seed, pred_start_epoch

    def __len__(self):
        return len(self.source)

    def __getitem__(self, key):
        return self.load(key)

    def load(self, key, probe=None):
        """`probe(data) -> bool`, when given, test-decodes every image (recovery path)."""
        first, epoch = key
        index, n_bad, bad = first, 0, []
        while True:
            try:
                data, label, name = self.source.read(index)
                width, height = check_image(data, name)
                if probe is not None and not probe(data):
                    raise BadImage(f"{name}: DALI's decoder fails on it")
                break
            except BadImage as e:
                n_bad += 1
                bad.append(str(e))
                log.warning("skipping unreadable image %s", e)
                if n_bad >= MAX_CONSECUTIVE_BAD:
                    raise UserError(f"{n_bad} unreadable images in a row (last: {e}); "
                                    "is the data folder corrupt?") from None
                index = (index + 1) % len(self.source)
        rng = sample_rng(self.seed, epoch, index)
        sample = {"data": np.frombuffer(data, dtype=np.uint8),
                  "params": plan_sample(width, height, self.specs, rng, self.blur_sigma,
                                        self.color_jitter_p),
                  "label": label, "epoch": epoch, "index": index, "key": first,
                  "n_bad": n_bad, "bad": bad}
        if self.mask_sampler is not None:
            if epoch < self.pred_start_epoch:
                sample["masks"] = torch.zeros(2, self.mask_sampler.num_patches, dtype=torch.bool)
            else:
                sample["masks"] = self.mask_sampler(2, rng)
        return sample


class PlannedCollate:
    """Samples -> one batch: bytes concatenated (one shared-memory tensor), parameter rows
    [B, n_crops, P] and the DALI arguments made from them (`dali_inputs`: done here, in
    the worker processes, not in the training process), masks crop-major as in
    `cpu.Collate` (the stratified sampler drawn here, per batch, from the batch's
    indices), labels, bad-file counts."""

    def __init__(self, specs, batch_sampler=None, num_patches=0, seed=0, pred_start_epoch=0,
                 index_rows=None):
        self.specs = specs
        self.batch_sampler = batch_sampler  # stratified sampler (per batch), or None
        self.num_patches, self.seed = num_patches, seed
        self.pred_start_epoch, self.index_rows = pred_start_epoch, index_rows

    def __call__(self, samples):
        B = len(samples)
        epoch = samples[0]["epoch"]
        lengths = [len(s["data"]) for s in samples]
        params = np.stack([s["params"] for s in samples])
        if "masks" in samples[0]:
            masks = torch.stack([s["masks"] for s in samples], 1).reshape(2 * B, -1)
        elif self.batch_sampler is not None and epoch >= self.pred_start_epoch:
            masks = self.batch_sampler(2 * B, sample_rng(self.seed, epoch,
                                                         *(s["index"] for s in samples)))
        else:
            masks = torch.zeros(2 * B, self.num_patches, dtype=torch.bool)
        batch = {
            "data": torch.from_numpy(np.concatenate([s["data"] for s in samples])),
            "offsets": torch.from_numpy(np.cumsum([0] + lengths)),
            "params": torch.from_numpy(params),
            "dali": dali_inputs(params, self.specs),
            "keys": [(s["key"], epoch) for s in samples],
            "index": torch.tensor([s["index"] for s in samples]),
            "masks": masks,
            "labels": torch.tensor([s["label"] for s in samples]),
            "n_bad": sum(s["n_bad"] for s in samples),
            "bad": [b for s in samples for b in s["bad"]],
        }
        if self.index_rows is not None:
            batch["mask_index"], batch["mask_count"] = masked_index(masks, self.index_rows)
        return batch


# -- the DALI graph -------------------------------------------------------------------------

def _crop_inputs(specs):
    """(dtype name, ndim) of the per-crop argument arrays of `dali_inputs`, in order."""
    out = []
    for _, _, _, solarize_p in specs:
        out += [("FLOAT", 1), ("FLOAT", 1), ("FLOAT", 2), ("FLOAT", 2), ("INT32", 0),
                ("FLOAT", 0)]
        if solarize_p > 0:
            out.append(("FLOAT", 0))
    return out


def build_pipeline(source, specs, batch_size, num_threads, device_id, prefetch,
                   half=True, seed=0):
    """The DALI pipeline: `source()` returns (list of encoded arrays, *dali_inputs(...)); one
    output per crop, [B, 3, size, size] fp16 (`half`) or fp32. GPU when `device_id` is set."""
    dali = _dali()
    fn, types = dali.fn, dali.types
    gpu = device_id is not None
    inputs = _crop_inputs(specs)
    pipe = dali.Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                         prefetch_queue_depth=prefetch, exec_dynamic=True, seed=seed)
    with pipe:
        fed = fn.external_source(source=source, num_outputs=1 + len(inputs), batch=True,
                                 dtype=[types.UINT8] + [getattr(types, d) for d, _ in inputs],
                                 ndim=[1] + [n for _, n in inputs])
        # EXIF orientation ignored, as PIL's `open` on the CPU path (and the boxes) does
        images = fn.decoders.image(fed[0], device="mixed" if gpu else "cpu",
                                   output_type=types.RGB, adjust_orientation=False)
        outputs, at = [], 1
        for size, _, _, solarize_p in specs:
            n = 7 if solarize_p > 0 else 6
            outputs.append(_augment(dali, images, fed[at:at + n], size, gpu, half))
            at += n
        pipe.set_outputs(*outputs)
    return pipe


def _augment(dali, images, args, size, gpu, half):
    """One crop of every image of the batch (the table in the module docstring)."""
    fn, types = dali.fn, dali.types
    roi_start, roi_end, A, K, window, sigma = args[:6]
    crop = fn.resize(images, roi_start=roi_start, roi_end=roi_end, roi_relative=True,
                     size=[size, size], interp_type=types.INTERP_CUBIC,
                     antialias=True)  # uint8; flipped by a reversed ROI
    mean = fn.reductions.mean(crop, axes=[0, 1], keep_dims=True, dtype=types.FLOAT)
    x = fn.coord_transform(crop, M=A, dtype=types.FLOAT) + fn.coord_transform(mean, M=K)
    x = dali.math.clamp(x, 0.0, 255.0)
    x = fn.gaussian_blur(x, window_size=window, sigma=sigma)  # window 1: the identity
    if len(args) > 6:
        flag = args[6].gpu() if gpu else args[6]
        x = x + flag * (x >= 128.0) * (255.0 - 2.0 * x)
    return fn.crop_mirror_normalize(x, mean=[255.0 * m for m in MEAN],
                                    std=[255.0 * s for s in STD], output_layout="CHW",
                                    dtype=types.FLOAT16 if half else types.FLOAT)


class DecodeProbe:
    """Test-decodes one encoded image with DALI's decoder on the loader's device (recovery)."""

    def __init__(self, device_id):
        self.device_id, self.pipe, self.data = device_id, None, None

    def __call__(self, data: bytes) -> bool:
        dali = _dali()
        if self.pipe is None:
            self.pipe = dali.Pipeline(batch_size=1, num_threads=1, device_id=self.device_id,
                                      prefetch_queue_depth=1, exec_dynamic=True)
            with self.pipe:
                enc = dali.fn.external_source(source=lambda: [self.data], batch=True,
                                              dtype=dali.types.UINT8, ndim=1)
                self.pipe.set_outputs(dali.fn.decoders.image(
                    enc, device="cpu" if self.device_id is None else "mixed",
                    output_type=dali.types.RGB, adjust_orientation=False))
            self.pipe.build()
        self.data = np.frombuffer(data, dtype=np.uint8)
        try:
            self.pipe.run()
            return True
        except RuntimeError:
            self.pipe = None  # an error leaves a DALI pipeline unusable
            return False


# -- the loader -----------------------------------------------------------------------------

class DaliTrainLoader:
    """Batches for one process, epoch by epoch, resumable at a batch boundary
    (the interface of `ibot_fast.data.TrainLoader`)."""

    def __init__(self, dataset, batch_sampler, collate, specs, local_size, device, dtype,
                 num_workers, prefetch, seed=0, with_records=False):
        self.dataset, self.batch_sampler, self.specs = dataset, batch_sampler, specs
        self.sizes = (specs[0][0], local_size)  # global, local crop sides
        self.device, self.dtype = device, dtype
        self.batch_size = batch_sampler.batch_size
        self.n_local = len(specs) - 2
        self.num_threads = max(1, num_workers)
        self.prefetch = max(1, prefetch)
        self.seed, self.with_records = seed, with_records
        self.gpu = device.type == "cuda"
        self.device_id = (device.index if device.index is not None
                          else torch.cuda.current_device()) if self.gpu else None
        self.half = dtype in (torch.float16, torch.bfloat16)
        self.staging = torch.float16 if self.half else torch.float32
        from . import _ignore_signals, _shutdown_workers

        self.loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=batch_sampler, collate_fn=collate, num_workers=num_workers,
            persistent_workers=num_workers > 0,
            prefetch_factor=prefetch if num_workers > 0 else None,
            worker_init_fn=_ignore_signals, generator=torch.Generator().manual_seed(seed))
        # the workers ignore SIGTERM: stop them through the DataLoader (see TrainLoader)
        self._finalizer = weakref.finalize(self, _shutdown_workers, self.loader)
        atexit.register(self._finalizer)
        self.pipe = None
        self._batches = None  # this epoch's prepared batches (DataLoader iterator)
        self._refeed = deque()  # batches to feed again after a pipeline rebuild
        self._pending = deque()  # batches fed to DALI, not yet returned
        self._held = deque()  # (CUDA event, DALI outputs) until the copies have run

    @property
    def batches_per_epoch(self) -> int:
        return self.batch_sampler.batches_per_epoch

    def set_epoch(self, epoch: int, start_batch: int = 0):
        self.batch_sampler.set_epoch(epoch, start_batch)

    def __len__(self):
        return len(self.batch_sampler)

    def close(self):
        """Stop the reader workers."""
        self._finalizer()

    def _next_inputs(self):
        """external_source's callback (runs in `schedule_run`): the next batch's inputs."""
        batch = self._refeed.popleft() if self._refeed else next(self._batches)
        self._pending.append(batch)
        buf, offsets = batch["data"].numpy(), batch["offsets"].tolist()
        encoded = [buf[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
        return (encoded, *batch["dali"])

    def _build(self):
        # the pipeline holds its callback weakly: no reference cycle, so dropping the loader
        # frees it and shuts its persistent workers down (they ignore SIGTERM)
        self.pipe = build_pipeline(_WeakCall(self._next_inputs), self.specs, self.batch_size,
                                   self.num_threads, self.device_id, self.prefetch,
                                   self.half, self.seed)
        self.pipe.build()

    def __iter__(self):
        self._batches = iter(self.loader)  # starts the workers before DALI's threads exist
        self._pending.clear()
        self._refeed.clear()
        if self.pipe is None:
            self._build()
        finished, failures = False, 0
        try:
            self.pipe.schedule_run()
            while True:
                stream = torch.cuda.current_stream(self.device) if self.gpu else None
                try:
                    outputs = self.pipe.share_outputs(stream)
                except StopIteration:
                    break
                except RuntimeError as e:  # a file DALI cannot decode: rebuild, re-read
                    failures += 1
                    self._recover(e, failures)
                    continue
                failures = 0
                batch = self._assemble(outputs, self._pending.popleft(), stream)
                self.pipe.release_outputs()
                self.pipe.schedule_run()
                yield batch
            finished = True
            self.pipe.reset()
        finally:
            if not finished:  # abandoned mid-epoch: batches are in flight; start afresh
                self.pipe = None
            self._batches = None

    def _recover(self, error, failures):
        """Rebuild the pipeline and feed the in-flight batches again, every image of them
        test-decoded; a batch that fails twice is a real error."""
        if failures > 1:
            raise RuntimeError(f"DALI failed twice on the same batch: {error}") from error
        log.warning("DALI failed on a batch (%s); re-reading the %d batch(es) in flight with "
                    "every image test-decoded", _error_line(error), len(self._pending))
        probe = DecodeProbe(self.device_id)
        in_flight = list(self._pending)
        self._pending.clear()
        self.pipe = None
        for batch in in_flight:
            samples = [self.dataset.load(key, probe) for key in batch["keys"]]
            self._refeed.append(self.loader.collate_fn(samples))
        self._build()
        self.pipe.schedule_run()

    def _assemble(self, outputs, meta, stream):
        """DALI outputs + the batch's metadata -> the `cpu.Collate` dict."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        B, dev = self.batch_size, self.device
        gsize, lsize = self.sizes
        globals_ = torch.empty(2 * B, 3, gsize, gsize, dtype=self.staging, device=dev)
        locals_ = torch.empty(self.n_local * B, 3, lsize, lsize, dtype=self.staging, device=dev)
        targets = [globals_[:B], globals_[B:]] + [locals_[k * B:(k + 1) * B]
                                                  for k in range(self.n_local)]
        for out, target in zip(outputs, targets):
            feed_ndarray(out.as_tensor(), target, cuda_stream=stream)
        if self.gpu:  # DALI's buffers stay alive until the copies on `stream` have run
            event = torch.cuda.Event()
            event.record(stream)
            self._held.append((event, outputs))
            while self._held and (len(self._held) > 2 * self.prefetch + 2
                                  or self._held[0][0].query()):
                self._held.popleft()[0].synchronize()
        if self.staging != self.dtype:
            globals_, locals_ = globals_.to(self.dtype), locals_.to(self.dtype)
        masks = meta["masks"]
        batch = {"globals": globals_, "locals": locals_,
                 "masks": masks.pin_memory() if self.gpu else masks,
                 "labels": meta["labels"], "n_bad": meta["n_bad"], "bad": meta["bad"]}
        if "mask_index" in meta:
            batch["mask_index"] = meta["mask_index"].pin_memory() if self.gpu \
                else meta["mask_index"]
            batch["mask_count"] = meta["mask_count"]
        if self.with_records:
            batch["index"] = meta["index"]
            batch["records"] = [crop_records(p) for p in meta["params"].numpy()]
        return batch


def _error_line(error) -> str:
    """The informative line of a DALI error (the one after "encountered:")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for before, line in zip(lines, lines[1:]):
        if before.endswith("encountered:"):
            return line
    return lines[0] if lines else type(error).__name__


class _WeakCall:
    """A bound method held through a weak reference."""

    def __init__(self, method):
        self.method = weakref.WeakMethod(method)

    def __call__(self):
        return self.method()()


def output_dtype(cfg, device) -> torch.dtype:
    """bf16/fp16 as train.precision says; auto: bf16 on a GPU, fp32 on the CPU."""
    p = cfg.train.precision
    if p == "auto":
        p = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[p]


def build_dali_loader(cfg, world_size=1, rank=0, index_rows=None, device=None, dtype=None,
                      records=False) -> DaliTrainLoader:
    """The DALI loader for one process (module docstring). `dtype` overrides the output
    precision; `records=True` adds each batch's draws ("records", "index") for tests."""
    _dali()
    device = torch.device(device or "cpu")
    source = build_source(cfg)
    aug = build_augmentation(cfg)
    specs = crop_specs(aug)
    grid = (cfg.data.global_size // cfg.model.patch_size,) * 2
    per_sample = per_batch = None
    if cfg.masks.enabled:
        sampler = sampler_from_config(cfg.masks, grid)
        if isinstance(sampler, BlockMaskSampler):
            per_sample = sampler
        else:
            per_batch = sampler
    dataset = PlannedDataset(source, specs, per_sample, cfg.train.seed,
                             cfg.masks.pred_start_epoch, aug.blur_sigma, aug.color_jitter_p)
    batch_sampler = EpochBatchSampler(len(dataset), cfg.train.batch_size, world_size, rank,
                                      cfg.train.seed)
    collate = PlannedCollate(specs, per_batch, grid[0] * grid[1], cfg.train.seed,
                             cfg.masks.pred_start_epoch, index_rows)
    return DaliTrainLoader(dataset, batch_sampler, collate, specs, aug.local_size, device,
                           dtype or output_dtype(cfg, device), cfg.data.num_workers,
                           cfg.data.prefetch, cfg.train.seed, records)

"""Image sources: the embedded digits, ImageFolder trees, webdataset tar shards, and
synthetic images.

Each dataset returns `(PIL RGB image, label)` from `load(i)`; reading errors raise
`BadImage`, which the multi-crop wrapper counts and skips. Labels are used only by
evaluation.
"""
import glob
import io
import logging
import os
import re
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from .. import UserError

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


class BadImage(Exception):
    """An image file that could not be read or decoded."""


class DigitsDataset:
    """scikit-learn's 1,797 real 8x8 handwritten digits, rendered as RGB images.

    Each 8x8 digit (values 0..16) is scaled to 0..255 and resized bicubically to
    `size` x `size` (32 by default), white strokes on black. The split is fixed: a
    seeded permutation (seed 0) puts 1,437 images in "train" and 360 in "test".
    """

    N_TRAIN = 1437

    def __init__(self, split: str = "train", size: int = 32):
        from sklearn.datasets import load_digits

        if split not in ("train", "test", "all"):
            raise ValueError(f"digits split must be train, test or all, not {split!r}")
        digits = load_digits()
        order = np.random.RandomState(0).permutation(len(digits.target))
        if split == "train":
            order = order[:self.N_TRAIN]
        elif split == "test":
            order = order[self.N_TRAIN:]
        self.images = (digits.images[order] * (255.0 / 16.0)).round().astype(np.uint8)
        self.targets = digits.target[order].astype(np.int64)
        self.size = size
        self.classes = [str(i) for i in range(10)]

    def __len__(self):
        return len(self.targets)

    def load(self, i: int):
        img = Image.fromarray(self.images[i], mode="L").resize((self.size, self.size),
                                                               Image.BICUBIC)
        return img.convert("RGB"), int(self.targets[i])


class ImageFolder:
    """A folder of class sub-folders of images (or images directly: one class).

    Files are listed once, sorted; unreadable files are found lazily when loaded.
    """

    def __init__(self, root):
        root = Path(root).expanduser()
        if not root.exists():
            raise UserError(f"data folder {root} does not exist: pass --data PATH to an "
                            "ImageFolder tree (one sub-folder of images per class)")
        if not root.is_dir():
            raise UserError(f"data path {root} is not a folder: pass --data PATH to an "
                            "ImageFolder tree (one sub-folder of images per class)")
        self.root = root
        classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
        samples = []
        for label, name in enumerate(classes):
            for path in sorted(_walk_images(root / name)):
                samples.append((str(path), label))
        if not samples:  # images directly in the root: one class
            classes = [root.name]
            samples = [(str(p), 0) for p in sorted(_walk_images(root, recursive=False))]
        if not samples:
            raise UserError(f"no images ({', '.join(IMG_EXTENSIONS)}) found under {root}")
        self.classes = classes
        self.samples = samples
        self.targets = np.array([label for _, label in samples], dtype=np.int64)

    def __len__(self):
        return len(self.samples)

    def load(self, i: int):
        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                return img.convert("RGB"), label
        except Exception as e:  # truncated, corrupt, unreadable, not an image
            raise BadImage(f"{path}: {type(e).__name__}: {e}") from None


def _walk_images(folder: Path, recursive: bool = True):
    if not recursive:
        return [p for p in folder.iterdir() if p.suffix.lower() in IMG_EXTENSIONS and p.is_file()]
    return [Path(dirpath) / f for dirpath, _, files in os.walk(folder, followlinks=True)
            for f in files if f.lower().endswith(IMG_EXTENSIONS)]


def expand_shards(spec: str):
    """Shard paths from a spec: brace ranges ("train-{0000..0146}.tar"), globs, folders (all
    their .tar files), several specs separated by commas or spaces. Sorted, de-duplicated."""
    paths = []
    for part in re.split(r"[,\s]+", spec.strip()):
        if not part:
            continue
        for item in _expand_braces(os.path.expanduser(part)):
            if os.path.isdir(item):
                paths += sorted(glob.glob(os.path.join(item, "*.tar")))
            else:
                paths += sorted(glob.glob(item)) if glob.has_magic(item) else [item]
    return list(dict.fromkeys(paths))


def _expand_braces(text: str):
    m = re.search(r"\{(\d+)\.\.(\d+)\}", text)
    if not m:
        return [text]
    lo, hi = m.group(1), m.group(2)
    width = len(lo) if lo.startswith("0") else 0
    return [x for i in range(int(lo), int(hi) + 1)
            for x in _expand_braces(text[:m.start()] + str(i).zfill(width) + text[m.end():])]


class TarShards:
    """Webdataset tar shards as a random-access list of images.

    A sample is the group of members that share a key (the path up to the first dot of the
    file name); its image is the first member with an image extension, its label the
    integer in a `.cls` member (0 without one). The index (shard, offset, size) comes
    from one pass over the tar headers; reads are `os.pread` on a descriptor opened once
    per process. Unreadable shards are skipped with a warning.
    """

    IMAGE_EXT = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "pgm")

    def __init__(self, spec: str):
        self.classes = None  # labels come from the .cls members
        self.paths = expand_shards(spec)
        missing = [p for p in self.paths if not os.path.isfile(p)]
        if len(missing) == len(self.paths):
            raise UserError(f"no webdataset shards (.tar) match {spec!r}: set data.path to a "
                            "folder of shards, a glob or a brace pattern like "
                            "train-{0000..0146}.tar")
        if missing:
            raise UserError(f"{len(missing)} of the {len(self.paths)} webdataset shards of "
                            f"{spec!r} do not exist (first: {missing[0]})")
        rows, targets, self.names = [], [], []
        for shard, path in enumerate(self.paths):
            for offset, size, label, name in self._scan(path):
                rows.append((shard, offset, size))
                targets.append(label)
                self.names.append(name)
        if not rows:
            raise UserError(f"no images ({', '.join(self.IMAGE_EXT)}) found in the "
                            f"{len(self.paths)} webdataset shard(s) of {spec!r}")
        self.index = np.array(rows, dtype=np.int64)
        self.targets = np.array(targets, dtype=np.int64)
        self._fds, self._pid = {}, None

    def _scan(self, path):
        out = []
        try:
            with tarfile.open(path, "r:") as tf:
                groups = {}
                for member in tf:
                    if not member.isfile():
                        continue
                    folder, base = os.path.split(member.name)
                    stem, _, ext = base.partition(".")
                    key = os.path.join(folder, stem)
                    group = groups.setdefault(key, {})
                    ext = ext.lower()
                    if ext in self.IMAGE_EXT and "image" not in group:
                        group["image"] = (member.offset_data, member.size, member.name)
                    elif ext == "cls":
                        group["cls"] = tf.extractfile(member).read()
                for key, group in groups.items():
                    if "image" in group:
                        offset, size, name = group["image"]
                        label = _parse_label(group.get("cls"))
                        out.append((offset, size, label, f"{path}:{name}"))
        except (OSError, tarfile.TarError) as e:
            log.warning("skipping unreadable shard %s (%s: %s); %d images read before the "
                        "error", path, type(e).__name__, e, len(out))
        return out

    def __len__(self):
        return len(self.index)

    def read(self, i: int):
        shard, offset, size = (int(v) for v in self.index[i])
        path, name = self.paths[shard], self.names[i]
        try:
            data = os.pread(self._fd(path), size, offset)
        except OSError as e:
            raise BadImage(f"{name}: {type(e).__name__}: {e}") from None
        if len(data) != size:
            raise BadImage(f"{name}: truncated shard ({len(data)} of {size} bytes)")
        return data, int(self.targets[i]), name

    def _fd(self, path):
        if self._pid != os.getpid():  # a forked worker opens its own descriptors
            self._fds, self._pid = {}, os.getpid()
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def __getstate__(self):
        return {**self.__dict__, "_fds": {}, "_pid": None}

    def load(self, i: int):
        """(PIL RGB image, label), for the CPU pipeline and evaluation."""
        data, label, name = self.read(i)
        try:
            with Image.open(io.BytesIO(data)) as img:
                return img.convert("RGB"), label
        except Exception as e:
            raise BadImage(f"{name}: {type(e).__name__}: {e}") from None


def _parse_label(raw):
    try:
        return int(raw.decode().strip()) if raw is not None else 0
    except ValueError:
        return 0


class SyntheticDataset:
    """Deterministic random images (smooth colour fields) for benchmarks: no disk reads."""

    def __init__(self, n: int = 4096, size: int = 256, num_classes: int = 10):
        self.n, self.size, self.num_classes = n, size, num_classes
        self.classes = [str(i) for i in range(num_classes)]
        self.targets = np.arange(n, dtype=np.int64) % num_classes

    def __len__(self):
        return self.n

    def load(self, i: int):
        rng = np.random.RandomState(i)
        coarse = rng.randint(0, 256, size=(8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(coarse, mode="RGB").resize((self.size, self.size), Image.BICUBIC)
        return img, int(self.targets[i])


SOURCES = ("digits", "folder", "webdataset", "synthetic")  # data.source


def build_dataset(cfg, split: str = "train"):
    """The pre-training (split='train') or evaluation source named by the config.

    For `folder` with split 'train'/'test', a `train/` and `val/` layout under data.path
    is used when present (ImageNet-style), else the whole folder.
    """
    d = cfg.data
    if d.source == "digits":
        return DigitsDataset(split, size=d.global_size)
    if d.source == "synthetic":
        return SyntheticDataset(d.synthetic_size, size=max(d.global_size * 8 // 7, 32))
    if d.source == "webdataset":  # evaluation splits: eval.* keys are not shard-aware yet
        return TarShards(d.path)
    root = Path(d.path).expanduser()
    sub = {"train": "train", "test": "val"}.get(split)
    if sub and (root / sub).is_dir():
        root = root / sub
    return ImageFolder(root)

"""Image sources: the embedded digits, ImageFolder trees, and synthetic images.

Each dataset returns `(PIL RGB image, label)` from `load(i)`; reading errors raise
`BadImage`, which the multi-crop wrapper counts and skips. Labels are used only by
evaluation.
"""
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .. import UserError

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
    root = Path(d.path).expanduser()
    sub = {"train": "train", "test": "val"}.get(split)
    if sub and (root / sub).is_dir():
        root = root / sub
    return ImageFolder(root)

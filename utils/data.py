"""Datasets by name or ImageFolder path, as one small interface: classes, targets, an RGB image per index.

Splits are called ``train`` and ``val``; for the torchvision datasets ``val`` is the official test split.
"""
import gzip
import hashlib
import os
import re

import numpy as np
from PIL import Image

from .errors import UserError
from .fileio import atomic_write_bytes

BUILTIN = ("fashion_mnist", "cifar10", "cifar100")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
# Where Debian's `dataset-fashion-mnist` package puts the four idx files.
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                       "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def to_rgb(img, background=(255, 255, 255)):
    """Any PIL image as 8-bit RGB.

    Transparent pixels are composited over ``background`` (plain ``convert('RGB')`` would expose whatever colour hides
    under alpha 0, often black); 16-bit and float greyscale are rescaled to 0..255 rather than clipped.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(a.max()), 1.0)
        a = np.clip(a / hi * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path):
    """Open an image file fully (so truncation surfaces here, not later) and return it as RGB."""
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


def safe_name(name):
    """A class name as a folder name ('T-shirt/top' -> 'T-shirt_top')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("_") or "class"


class ImageSource:
    """Images of one split of one dataset.

    Attributes
    ----------
    name : str         dataset name or ImageFolder root
    split : str        'train' or 'val'
    classes : list     class names, index = label
    targets : ndarray  int64 label per image
    """

    def __init__(self, name, split, classes, targets, arrays=None, paths=None, root=None):
        self.name, self.split, self.classes = name, split, list(classes)
        self.targets = np.asarray(targets, dtype=np.int64)
        self._arrays, self._paths, self._root = arrays, paths, root

    def __len__(self):
        return len(self.targets)

    def image(self, i):
        """Image ``i`` as a PIL RGB image."""
        if self._arrays is not None:
            return to_rgb(Image.fromarray(np.asarray(self._arrays[i])))
        return load_image(self._paths[i])

    def encoded(self, i):
        """Image ``i``'s file as stored (bytes), or None for an in-memory dataset (--decode gpu reads these)."""
        if self._paths is None:
            return None
        with open(self._paths[i], "rb") as f:
            return f.read()

    def ident(self, i):
        """Where image ``i`` came from: a path relative to the ImageFolder root, or '<dataset>:<split>:<index>'."""
        if self._paths is not None:
            return os.path.relpath(self._paths[i], self._root)
        return f"{self.name}:{self.split}:{i}"

    def key(self):
        """What identifies this split's content, for cache keys."""
        k = {"dataset": self.name, "split": self.split, "n": len(self), "classes": self.classes}
        if self._paths is not None:
            h = hashlib.sha256("\n".join(os.path.relpath(p, self._root) for p in self._paths).encode())
            k["files"] = h.hexdigest()[:16]
        return k


def _ensure_fashion_mnist_raw(root):
    """Put the four idx files into <root>/FashionMNIST/raw from the Debian package when they are not there yet."""
    raw = os.path.join(root, "FashionMNIST", "raw")
    if all(os.path.exists(os.path.join(raw, f)) for f in FASHION_MNIST_FILES):
        return True
    if not all(os.path.exists(os.path.join(DEBIAN_FASHION_MNIST, f + ".gz")) for f in FASHION_MNIST_FILES):
        return False
    os.makedirs(raw, exist_ok=True)
    for f in FASHION_MNIST_FILES:
        if not os.path.exists(os.path.join(raw, f)):
            with gzip.open(os.path.join(DEBIAN_FASHION_MNIST, f + ".gz"), "rb") as src:
                atomic_write_bytes(os.path.join(raw, f), src.read())
    return True


def _torchvision_dataset(name, root, train):
    import torchvision.datasets as tvd
    cls = {"fashion_mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[name]
    have_local = name == "fashion_mnist" and _ensure_fashion_mnist_raw(root)
    try:
        return cls(root, train=train, download=not have_local)
    except Exception as e:  # network errors come in many types; all mean the same thing to the user
        how = {"fashion_mnist": "`sudo apt-get install dataset-fashion-mnist` (offline) or a network connection",
               "cifar10": "a network connection, or cifar-10-python.tar.gz placed in the data root",
               "cifar100": "a network connection, or cifar-100-python.tar.gz placed in the data root"}[name]
        raise UserError(f"{name} is not under {root} and could not be downloaded ({type(e).__name__}); "
                        f"get it with {how}") from None


def _image_folder(root, split):
    if not os.path.isdir(root):
        raise UserError(f"dataset folder {root} does not exist")
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise UserError(f"ImageFolder root {root} has no '{split}/' folder (expected {root}/train/<class>/*.jpg "
                        f"and {root}/val/<class>/*.jpg)")
    classes = sorted(d.name for d in os.scandir(split_dir) if d.is_dir())
    paths, targets = [], []
    for c, cname in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(os.path.join(split_dir, cname)):
            dirnames.sort()
            for fn in sorted(filenames):
                if fn.lower().endswith(IMAGE_EXTS):
                    paths.append(os.path.join(dirpath, fn))
                    targets.append(c)
    if not paths:
        raise UserError(f"no images found in {split_dir} (looked for {', '.join(IMAGE_EXTS)} inside class folders)")
    return ImageSource(os.path.abspath(root), split, classes, targets, paths=paths, root=split_dir)


def get_source(dataset, split, data_root="data"):
    """An :class:`ImageSource` for ``dataset`` (a builtin name or an ImageFolder root) and ``split``."""
    if split not in ("train", "val"):
        raise UserError(f"split must be 'train' or 'val', not {split!r}")
    if dataset in BUILTIN:
        ds = _torchvision_dataset(dataset, data_root, train=(split == "train"))
        arrays = ds.data.numpy() if hasattr(ds.data, "numpy") else ds.data
        return ImageSource(dataset, split, ds.classes, ds.targets, arrays=arrays)
    if os.sep not in dataset and not os.path.exists(dataset):
        raise UserError(f"unknown dataset {dataset!r}: use one of {', '.join(BUILTIN)} or an ImageFolder path")
    return _image_folder(dataset, split)


def class_folder_source(path):
    """An :class:`ImageSource` of one folder of class folders (``path/<class>/*.jpg``), named by its parent and its
    own name (``datasets/imagenet/val`` reads as split ``val`` of ``datasets/imagenet``)."""
    path = os.path.normpath(path)
    if not os.path.isdir(path):
        raise UserError(f"{path} is not a folder (expected {path}/<class>/<images>)")
    return _image_folder(os.path.dirname(path) or ".", os.path.basename(path))


def subset_indices(n_total, n, seed=0):
    """``n`` indices drawn without replacement by ``seed``, sorted; all of them when ``n`` is None or too large."""
    if n is None or n <= 0 or n >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).choice(n_total, size=n, replace=False))


def subset_key(source, indices):
    """Cache-key part of ``indices`` rows of ``source``: the split's identity plus a hash of the rows."""
    return dict(source.key(), indices=hashlib.sha256(np.asarray(indices, np.int64).tobytes()).hexdigest()[:16])


def per_class_indices(targets, per_class, seed=0):
    """{label: sorted indices}, ``per_class`` images of each class drawn by ``seed`` (a fixed draw per class)."""
    out = {}
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        rng = np.random.default_rng([seed, int(c)])
        out[int(c)] = np.sort(rng.choice(idx, size=min(per_class, len(idx)), replace=False))
    return out


class ElementImages:
    """An element library's image files (index.json rows) as a map-style dataset of (tensor, label)."""

    def __init__(self, root, rows, transform):
        self.root, self.rows, self.transform = root, rows, transform

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        r = self.rows[i]
        return self.transform(load_image(os.path.join(self.root, r["file"]))), r["label"]

    def ident(self, i):
        """How messages name element ``i``."""
        return f"element {i} ({self.rows[i]['file']})"


class TransformedImages:
    """A map-style dataset (for torch's DataLoader) of ``source`` images at ``indices`` through ``transform``."""

    def __init__(self, source, indices, transform):
        self.source, self.indices, self.transform = source, np.asarray(indices), transform

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        j = int(self.indices[i])
        return self.transform(self.source.image(j)), int(self.source.targets[j])


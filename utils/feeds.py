"""Feeds: where extraction batches come from, and the torchrun helpers both sides use.

* ``ImageFeed`` (the default, "pil"): DataLoader workers decode each image with PIL and apply every distinct
  preprocessing among the backbones once (torchvision Resize -> CenterCrop -> ToTensor -> Normalize: exactly the
  weights' evaluation transform).
* ``CacheFeed`` ("cache", the fast path): a one-time uint8 copy of the split, decoded, resized and centre-cropped once
  by PIL at the largest size any backbone of the pass needs (:func:`plan_cache`; a keyed, memory-mapped store entry).
  Threads only copy contiguous rows out of it; the device crops, resizes and normalises each preprocessing group in
  batches. A group whose resize and interpolation are the cache's reads exactly the pixels the PIL path would give it
  (bit-identical features on CPU); the others are resampled twice (see docs/scale.md, "Where a GPU waits: decoding").
* ``utils.decode.GpuFeed`` ("gpu"): workers only read file bytes; JPEGs are decoded in batches on the device and
  preprocessed there (PIL for what the device does not decode, counted: ``report()``, stored in the entries' info).

An image PIL refuses comes back from a loader worker as label -1 (a worker's exception would abort the split
with a worker traceback); the extraction skips and counts it, or names it (``strict``). utils/extraction.py runs the
models over a feed and writes the store entries.
"""
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from math import ceil

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from PIL import Image
from tqdm import tqdm

from . import store, validate
from .data import UNREADABLE
from .decode import Normalise, check_interpolations


def distributed():
    """(rank, world size) under torchrun (the process group is set up on first call), else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def barrier(world):
    """Wait for every torchrun rank (nothing to wait for in one process)."""
    if world > 1:
        import torch.distributed as dist
        dist.barrier()


class GroupedImages:
    """Map-style dataset: image ``indices[i]`` of ``source`` decoded once and returned through each of ``transforms``
    (a tuple of tensors, one per preprocessing group) with its label."""

    def __init__(self, source, indices, transforms):
        self.source, self.indices, self.transforms = source, np.asarray(indices), list(transforms)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        j = int(self.indices[i])
        try:
            img = self.source.image(j)
        except UNREADABLE:     # label -1 marks it; the main process names the file (a worker's error cannot)
            return tuple(t(Image.new("RGB", (8, 8))) for t in self.transforms), -1
        return tuple(t(img) for t in self.transforms), int(self.source.targets[j])

    def why_unreadable(self, i):
        """What PIL says about row ``i``'s file (re-opened in the calling process)."""
        try:
            self.source.image(int(self.indices[i]))
        except UNREADABLE as e:
            return f"{type(e).__name__}: {validate.one_line(e)}"
        return "it could not be read in a loader worker"

    def source_file(self, i):
        """Row ``i``'s file as an entry's info lists it (relative to the ImageFolder root)."""
        return self.source.ident(int(self.indices[i]))


def describe_row(dataset, row):
    """Where row ``row`` of an extraction came from, for messages."""
    if hasattr(dataset, "ident"):
        return dataset.ident(row)
    source, indices = getattr(dataset, "source", None), getattr(dataset, "indices", None)
    if source is not None and indices is not None:
        j = int(indices[row])
        return f"image {j} of {source.name} {source.split} ({source.ident(j)})"
    return f"row {row}"


# ---------------------------------------------------------------------------------------------------------------------
# Feeds: where batches come from
# ---------------------------------------------------------------------------------------------------------------------
class ImageFeed:
    """Batches from a map-style dataset of (input or tuple of inputs per group, label), made by DataLoader workers."""
    key = None

    def __init__(self, dataset, workers=2):
        self.dataset, self.workers = dataset, workers

    def __len__(self):
        return len(self.dataset)

    def describe(self, row):
        return describe_row(self.dataset, row)

    def why_unreadable(self, row):
        return self.dataset.why_unreadable(row)

    def source_file(self, row):
        return self.dataset.source_file(row) if hasattr(self.dataset, "source_file") else self.describe(row)

    def batches(self, batches, device):
        """Yield (inputs per group on ``device``, labels int64 ndarray: -1 for a row the dataset could not read) for
        each list of rows in ``batches``."""
        groups = len(getattr(self.dataset, "transforms", [None]))    # batches in flight hold every group's input
        loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=self.workers,
                            pin_memory=device.type == "cuda", persistent_workers=False,
                            prefetch_factor=max(1, 4 // max(1, groups)) if self.workers else None)
        for rows, (x, y) in zip(batches, loader):     # label -1: unreadable (GroupedImages), for the caller
            xs = x if isinstance(x, (list, tuple)) else [x]
            # channels-last lets conv kernels (oneDNN on CPU, cuDNN on GPU) skip layout conversions
            yield ([t.to(device, non_blocking=True).to(memory_format=torch.channels_last) for t in xs],
                   y.numpy().astype(np.int64))


@dataclass(frozen=True)
class CachePlan:
    """The decoded copy: every image resized (short side) to ``resize`` with ``interpolation``, centre-cropped to
    ``crop`` x ``crop``, stored as uint8 RGB."""
    resize: int
    crop: int
    interpolation: str




def plan_cache(preprocesses):
    """The smallest decoded copy every preprocessing in ``preprocesses`` (one per backbone: the most common one sets
    the interpolation) can be cut from without upsampling: the largest resize, and a crop that covers the widest
    field of view (crop / resize) of any of them. A preprocessing with the cache's resize and interpolation is then a
    plain centre crop of it (the crop is widened so those offsets round exactly as torchvision's CenterCrop does)."""
    check_interpolations(preprocesses, "--decode cache")
    resize = max(p.resize for p in preprocesses)
    at_max = [p.interpolation for p in preprocesses if p.resize == resize]
    interp = max(dict.fromkeys(at_max), key=at_max.count)            # most common; ties: first seen
    crop = ceil(resize * max(p.crop / p.resize for p in preprocesses) - 1e-9)
    exact = [p.crop for p in preprocesses if p.resize == resize and p.interpolation == interp]
    if exact:
        crop += (exact[0] - crop) % 4      # (crop - exact crop) / 2 even: nested centre crops round like one crop
    return CachePlan(resize, crop, interp)


class DecodeImages(GroupedImages):
    """Map-style dataset for building the decoded copy: (uint8 HWC tensor, label) per image, resized and centre-cropped
    by PIL exactly as torchvision's Resize + CenterCrop do (an unreadable image: a black one labelled -1, so the copy
    keeps its row and the extraction skips it)."""

    def __init__(self, source, indices, plan):
        from torchvision import transforms as T
        super().__init__(source, indices, [T.Compose([
            T.Resize(plan.resize, T.InterpolationMode(plan.interpolation), antialias=True), T.CenterCrop(plan.crop)])])

    def __getitem__(self, i):
        (img,), label = super().__getitem__(i)
        return torch.from_numpy(np.array(img, np.uint8)), label


def cache_key(data_key, plan):
    return {"schema": 1, "kind": "decoded uint8 RGB", "data": data_key, "plan": asdict(plan)}


def build_decoded_cache(path, source, indices, data_key, plan, workers=2):
    """Write the decoded copy of ``source`` rows ``indices`` to the store entry ``path`` unless it is current:
    ``images`` (N, crop, crop, 3) uint8, ``labels`` (N,) int64. Chunked, resumable and torchrun-sharded like features.
    Returns (images, labels), memory-mapped."""
    key = cache_key(data_key, plan)
    if store.is_current(path, key):
        print(f"{path} is up to date")
    else:
        rank, world = distributed()
        n = len(indices)
        rows = max(1, (128 << 20) // (plan.crop * plan.crop * 3))     # about 128 MiB per chunk
        n_chunks = -(-n // rows)
        partial = store.partial_dir(path, dict(key, chunk_rows=rows))
        todo = [c for c in range(rank, n_chunks, world) if not store.chunk_done(partial, c)]
        batches = [list(range(i, min(i + 32, (c + 1) * rows, n))) for c in todo
                   for i in range(c * rows, min((c + 1) * rows, n), 32)]
        if todo:
            loader = DataLoader(DecodeImages(source, indices, plan), batch_sampler=batches, num_workers=workers,
                                prefetch_factor=4 if workers else None)
            bar = tqdm(total=sum(len(b) for b in batches), unit="img", dynamic_ncols=True, position=rank,
                       desc=f"decoding to {plan.resize}/{plan.crop} {plan.interpolation}"
                            + (f" [rank {rank}/{world}]" if world > 1 else ""))
            stream = iter(loader)
            with bar:          # closed before any error is printed, so the error has a line of its own
                for c in todo:
                    want, imgs, labels = min(rows, n - c * rows), [], []
                    while sum(len(y) for y in labels) < want:
                        x, y = next(stream)
                        imgs.append(x.numpy())
                        labels.append(y.numpy().astype(np.int64))
                        bar.update(len(y))
                    store.write_chunk(partial, c, {"images": np.concatenate(imgs), "labels": np.concatenate(labels)})
        barrier(world)
        if rank == 0:
            store.merge_chunks(partial, path, n_chunks, key, {"dataset": source.name, "split": source.split,
                                                              "plan": asdict(plan)})
            print(f"{n} images decoded to {plan.crop} x {plan.crop} uint8 -> {path}")
        barrier(world)
    arrays, _ = store.read(path)
    return arrays["images"], arrays["labels"]


class CacheTransform:
    """On the device: one preprocessing group's model input from a batch of the decoded copy (N, C, C, 3) uint8.

    Exact group (the cache's resize and interpolation): a centre crop, then ToTensor's and Normalize's arithmetic.
    Other groups: the centre square covering the group's field of view, resized on the device (antialiased, the
    group's interpolation), clamped and rounded to the uint8 grid as PIL's output is, then the same arithmetic.
    """

    def __init__(self, plan, preprocess, device):
        p, c = preprocess, plan.crop
        self.exact = p.resize == plan.resize and p.interpolation == plan.interpolation and (c - p.crop) % 4 == 0
        side = p.crop if self.exact else min(c, max(1, round(p.crop * plan.resize / p.resize)))
        self.offset = int(round((c - side) / 2.0))
        self.side, self.size, self.mode = side, p.crop, p.interpolation
        self.normalise = Normalise(p.mean, p.std, device)

    def __call__(self, u8):
        o, s = self.offset, self.side
        x = u8.permute(0, 3, 1, 2)[:, :, o:o + s, o:o + s].float()
        if not self.exact:
            if self.mode == "nearest":
                x = nn.functional.interpolate(x, size=(self.size, self.size), mode="nearest")
            else:
                x = nn.functional.interpolate(x, size=(self.size, self.size), mode=self.mode, antialias=True,
                                              align_corners=False)
            x = x.clamp_(0, 255).round_()
        return self.normalise(x).contiguous(memory_format=torch.channels_last)


class _GroupInputs:
    """A batch's model inputs per preprocessing group, computed on first use."""

    def __init__(self, u8, transforms):
        self.u8, self.transforms, self.done = u8, transforms, {}

    def __getitem__(self, g):
        if g not in self.done:
            self.done[g] = self.transforms[g](self.u8)
        return self.done[g]


class CacheFeed:
    """Batches sliced from the decoded copy (memory-mapped) by ``threads`` background threads, one copy each into
    (pinned, on CUDA) memory; the device makes every group's input (:class:`CacheTransform`)."""

    def __init__(self, images, labels, plan, groups, names=None, threads=2):
        self.images, self.labels, self.plan, self.groups = images, labels, plan, list(groups)
        self.threads, self.names = max(1, threads), names      # names: the split's GroupedImages, for messages
        self.key = {"decode": "uint8 cache", **asdict(plan)}

    def __len__(self):
        return len(self.images)

    def describe(self, row):
        return describe_row(self.names, row) if self.names is not None else f"row {row}"

    def why_unreadable(self, row):
        return self.names.why_unreadable(row) if self.names is not None else "it could not be read"

    def source_file(self, row):
        return self.names.source_file(row) if self.names is not None else f"row {row}"

    def _load(self, rows, pin):
        a = rows[0]
        sel = slice(a, a + len(rows)) if list(rows) == list(range(a, a + len(rows))) else np.asarray(rows)
        src = self.images[sel]
        t = torch.empty(src.shape, dtype=torch.uint8, pin_memory=pin)
        np.copyto(t.numpy(), src)               # the one copy out of the memory map
        return t, np.asarray(self.labels[sel], np.int64)

    def batches(self, batches, device):
        transforms = [CacheTransform(self.plan, p, device) for p in self.groups]
        pin, depth = device.type == "cuda", self.threads + 2
        with ThreadPoolExecutor(self.threads) as pool:
            queue = deque(pool.submit(self._load, rows, pin) for rows in batches[:depth])
            nxt = len(queue)
            while queue:
                t, y = queue.popleft().result()
                if nxt < len(batches):
                    queue.append(pool.submit(self._load, batches[nxt], pin))
                    nxt += 1
                yield _GroupInputs(t.to(device, non_blocking=True), transforms), y

"""Extraction: images -> batches -> one forward per backbone (any number of layers each) -> keyed store entries.

One pass over a split feeds any number of *passes* (one forward of one model per batch), each giving one or more
*outputs* (one store entry each: a backbone at one layer). Every image is decoded once per pass over the data:

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

Rows are written in chunks (``--chunk_size``), each atomically, so a killed run resumes at its first unfinished chunk;
under torchrun rank r extracts chunks r, r + world, ... and rank 0 merges them. Every batch of features is checked
before it is written: a non-finite value stops the run with one error naming the image, and no entry is finished.
"""
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from math import ceil
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import store
from .backbones import Backbone
from .decode import Normalise, check_interpolations
from .device import resolve_device
from .errors import UserError


@dataclass(frozen=True)
class ExtractConfig:
    """How an extraction runs (the extractors' flags of these names): images per forward, DataLoader workers, device,
    bf16 autocast on CUDA, the stored dtype and the rows per atomically written chunk."""
    batch_size: int
    workers: int
    device: str
    amp: bool
    dtype: str
    chunk_size: int


def distributed():
    """(rank, world size) under torchrun (the process group is set up on first call), else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def _barrier(world):
    if world > 1:
        import torch.distributed as dist
        dist.barrier()


# ---------------------------------------------------------------------------------------------------------------------
# What one pass computes
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Output:
    """One store entry: ``model_key`` identifies the model at one layer (architecture, weights content, layer,
    pooling, preprocessing), ``info`` is stored beside it, ``name`` is how messages call it."""
    out: str
    model_key: dict
    info: dict
    name: str = ""


@dataclass
class Pass:
    """One forward per batch: ``make()`` returns a module mapping a batch to a list of (N, D) tensors, one per output.
    ``preprocess`` (a :class:`utils.backbones.Preprocess`, or None when the dataset already yields model inputs) picks
    the input group it reads; passes with equal preprocessing share one transformed batch."""
    make: Callable[[], nn.Module]
    outputs: list
    preprocess: object = None
    group: int = field(default=0, init=False)


def assign_groups(passes):
    """Give each pass the index of its preprocessing among the distinct ones; return those, in first-seen order."""
    groups = []
    for p in passes:
        if p.preprocess not in groups:
            groups.append(p.preprocess)
        p.group = groups.index(p.preprocess)
    return groups


def backbone_passes(targets):
    """Passes for ``targets`` = [(spec, out, info, name)]: one per distinct (source, arch, weights), reading every layer
    asked of it in that one forward. Returns (passes, distinct preprocessings)."""
    by_model = {}
    for spec, out, info, name in targets:
        ident = (spec.source, spec.arch, spec.weights)
        if ident not in by_model:
            by_model[ident] = (Backbone(spec), [])
        by_model[ident][1].append((spec, out, info, name))
    passes = []
    for bb, rows in by_model.values():
        specs = [r[0] for r in rows]
        passes.append(Pass(make=lambda bb=bb, specs=specs: bb.taps(specs),
                           outputs=[Output(out, bb.key(spec), info, name) for spec, out, info, name in rows],
                           preprocess=bb.preprocess))
    return passes, assign_groups(passes)


class GroupedImages:
    """Map-style dataset: image ``indices[i]`` of ``source`` decoded once and returned through each of ``transforms``
    (a tuple of tensors, one per preprocessing group) with its label."""

    def __init__(self, source, indices, transforms):
        self.source, self.indices, self.transforms = source, np.asarray(indices), list(transforms)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        j = int(self.indices[i])
        img = self.source.image(j)
        return tuple(t(img) for t in self.transforms), int(self.source.targets[j])


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

    def batches(self, batches, device):
        """Yield (inputs per group on ``device``, labels int64 ndarray) for each list of rows in ``batches``."""
        groups = len(getattr(self.dataset, "transforms", [None]))    # batches in flight hold every group's input
        loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=self.workers,
                            pin_memory=device.type == "cuda", persistent_workers=False,
                            prefetch_factor=max(1, 4 // max(1, groups)) if self.workers else None)
        for x, y in loader:
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


class DecodeImages:
    """Map-style dataset for building the decoded copy: (uint8 HWC tensor, label) per image, resized and centre-cropped
    by PIL exactly as torchvision's Resize + CenterCrop do."""

    def __init__(self, source, indices, plan):
        from torchvision import transforms as T
        self.source, self.indices = source, np.asarray(indices)
        self.transform = T.Compose([T.Resize(plan.resize, T.InterpolationMode(plan.interpolation), antialias=True),
                                    T.CenterCrop(plan.crop)])

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        j = int(self.indices[i])
        return torch.from_numpy(np.array(self.transform(self.source.image(j)), np.uint8)), int(self.source.targets[j])


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
            for c in todo:
                want, imgs, labels = min(rows, n - c * rows), [], []
                while sum(len(y) for y in labels) < want:
                    x, y = next(stream)
                    imgs.append(x.numpy())
                    labels.append(y.numpy().astype(np.int64))
                    bar.update(len(y))
                store.write_chunk(partial, c, {"images": np.concatenate(imgs), "labels": np.concatenate(labels)})
            bar.close()
        _barrier(world)
        if rank == 0:
            store.merge_chunks(partial, path, n_chunks, key, {"dataset": source.name, "split": source.split,
                                                              "plan": asdict(plan)})
            print(f"{n} images decoded to {plan.crop} x {plan.crop} uint8 -> {path}")
        _barrier(world)
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

    def __init__(self, images, labels, plan, groups, describe=None, threads=2):
        self.images, self.labels, self.plan, self.groups = images, labels, plan, list(groups)
        self.threads, self._describe = max(1, threads), describe
        self.key = {"decode": "uint8 cache", **asdict(plan)}

    def __len__(self):
        return len(self.images)

    def describe(self, row):
        return self._describe(row) if self._describe else f"row {row}"

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


# ---------------------------------------------------------------------------------------------------------------------
# The forward stream and the store writer
# ---------------------------------------------------------------------------------------------------------------------
def _stream(feed, work, modules, device, amp):
    """Yield (work item, {pass id: [float32 ndarray per output]}, labels) for each (rows, chunk, pass ids) of ``work``.

    On CUDA the features of batch b are copied to pinned memory asynchronously and collected after batch b + 1 has been
    queued, so the device is never left waiting for the host."""
    cuda = device.type == "cuda"
    pending = None

    def collect(item):
        w, host, event, y = item
        event.synchronize()
        return w, {pi: [h.numpy() for h in hs] for pi, hs in host.items()}, y

    with torch.inference_mode():
        for w, (xs, y) in zip(work, feed.batches([w[0] for w in work], device)):
            outs = {}
            for pi in w[2]:
                module, group = modules[pi]
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda and amp):
                    fs = module(xs[group])
                outs[pi] = [f.float() for f in fs]
            if not cuda:
                yield w, {pi: [f.numpy() for f in fs] for pi, fs in outs.items()}, y
                continue
            host = {pi: [torch.empty(f.shape, dtype=f.dtype, pin_memory=True).copy_(f, non_blocking=True) for f in fs]
                    for pi, fs in outs.items()}
            event = torch.cuda.Event()
            event.record()
            if pending is not None:
                yield collect(pending)
            pending = (w, host, event, y)
        if pending is not None:
            yield collect(pending)


def _check_finite(f32, stored, rows, feed, output, dtype):
    """Refuse a batch holding a non-finite value: one error naming the first bad row's image."""
    bad = ~np.isfinite(stored).all(axis=1)
    if not bad.any():
        return
    r = int(np.argmax(bad))
    if np.isfinite(f32[r]).all():
        what, hint = f"overflow to Inf in {dtype}", "; store float32 (--dtype float32)"
    elif np.isnan(f32[r]).any():
        what, hint = "NaN", ""
    else:
        what, hint = "Inf", "; a backbone in half precision can overflow (on CUDA try --no-amp)"
    raise UserError(f"non-finite feature ({what}) from {output.name or 'the model'} for {feed.describe(rows[r])} "
                    f"(row {rows[r]}); stopped before finishing {output.out}{hint}")


class _ChunkWriter:
    """Writes chunks in one background thread so the device keeps working; at most one chunk waits."""

    def __init__(self):
        self.pool, self.last = ThreadPoolExecutor(1), None

    def submit(self, fn, *args):
        if self.last is not None:
            self.last.result()
        self.last = self.pool.submit(fn, *args)

    def close(self):
        try:
            if self.last is not None:
                self.last.result()
        finally:
            self.pool.shutdown(wait=True)


def entry_key(model_key, data_key, dtype, decode=None):
    key = {"schema": 1, "backbone": model_key, "data": data_key, "dtype": dtype}
    if decode:
        key["decode"] = decode
    return key


@dataclass
class _Todo:
    pass_id: int
    index: int               # of the output within its pass
    output: Output
    key: dict
    partial: str = ""
    missing: set = field(default_factory=set)       # chunks this rank writes


def extract_passes(passes, feed, data_key, cfg, desc, extra_arrays=None):
    """Fill the store entry of every output of ``passes`` in one pass over ``feed``, skipping entries whose key is
    current and, on a resumed run, chunks already written. ``cfg`` (an :class:`ExtractConfig`) supplies batch_size,
    chunk_size, dtype, device, amp. Returns the entry paths."""
    todo = []
    for pi, p in enumerate(passes):
        for oi, o in enumerate(p.outputs):
            key = entry_key(o.model_key, data_key, cfg.dtype, feed.key)
            if store.is_current(o.out, key):
                print(f"{o.out} is up to date")
            else:
                todo.append(_Todo(pi, oi, o, key))
    paths = [o.out for p in passes for o in p.outputs]
    if not todo:
        return paths
    n = len(feed)
    if n == 0:
        raise UserError(f"{desc}: nothing to extract (empty dataset)")
    rank, world = distributed()
    size = cfg.chunk_size
    n_chunks = -(-n // size)
    for t in todo:
        # the chunk size is part of the partial folder's name: a run resumed with another size starts afresh
        t.partial = store.partial_dir(t.output.out, dict(t.key, chunk_rows=size))
        done = [store.chunk_done(t.partial, c) for c in range(n_chunks)]
        t.missing = {c for c in range(rank, n_chunks, world) if not done[c]}
        if any(done) and rank == 0:
            print(f"resuming {t.output.out}: {sum(done)} of {n_chunks} chunks already extracted")
    bs = cfg.batch_size
    decode_info = {}
    work = []                                # (rows, chunk, pass ids); batches never straddle a chunk
    for c in sorted(set().union(*(t.missing for t in todo))):
        pids = sorted({t.pass_id for t in todo if c in t.missing})
        work += [(list(range(i, min(i + bs, (c + 1) * size, n))), c, pids)
                 for i in range(c * size, min((c + 1) * size, n), bs)]
    if work:
        device = resolve_device(cfg.device)
        needed = sorted({pi for _, _, pids in work for pi in pids})
        modules = {pi: (passes[pi].make().to(device).to(memory_format=torch.channels_last), passes[pi].group)
                   for pi in needed}
        bar = tqdm(total=sum(len(w[0]) for w in work), desc=desc + (f" [rank {rank}/{world}]" if world > 1 else ""),
                   unit="img", dynamic_ncols=True, position=rank)
        writer = _ChunkWriter()
        try:
            current = None
            for (rows, c, _), out, y in _stream(feed, work, modules, device, cfg.amp):
                if c != current:
                    active = [t for t in todo if c in t.missing]
                    feats, labels, got, current = [[] for _ in active], [], 0, c
                for t, acc in zip(active, feats):
                    f32 = out[t.pass_id][t.index]
                    stored = f32.astype(cfg.dtype)
                    _check_finite(f32, stored, rows, feed, t.output, cfg.dtype)
                    acc.append(stored)
                labels.append(y)
                got += len(rows)
                bar.update(len(rows))
                if got == min(size, n - c * size):
                    writer.submit(_write_chunks, store, c, [(t.partial, np.concatenate(acc))
                                                            for t, acc in zip(active, feats)], np.concatenate(labels))
        finally:
            writer.close()
            bar.close()
        if hasattr(feed, "report"):          # --decode gpu: how many images were decoded with PIL, and why
            decode_info = feed.report()
    _barrier(world)
    if rank == 0:
        for t in todo:
            store.merge_chunks(t.partial, t.output.out, n_chunks, t.key, {**t.output.info, **decode_info},
                               extra_arrays)
            arrays, _ = store.read(t.output.out, verify=False)   # its digest was just computed
            print(f"{arrays['features'].shape[0]} x {arrays['features'].shape[1]} {cfg.dtype} features "
                  f"-> {t.output.out}")
    _barrier(world)
    return paths


def _write_chunks(store, c, batch, labels):
    for partial, features in batch:
        store.write_chunk(partial, c, {"features": features, "labels": labels})


# ---------------------------------------------------------------------------------------------------------------------
# One model, one entry (element embeddings, CLIP image features, in-memory extraction)
# ---------------------------------------------------------------------------------------------------------------------
class _AsList(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return [self.module(x)]


def extract_to_store(make_extractor, model_key, dataset, data_key, out, info, cfg, desc, extra_arrays=None):
    """Extract ``dataset`` (map-style, (input tensor, label)) features with ``make_extractor()`` (a module returning
    (N, D)) into the store entry ``out`` unless an entry with the same key is there.

    The key is ``model_key`` (a backbone's: architecture, weights content, layer, pooling, preprocessing; or CLIP's),
    the stored dtype and ``data_key``. Chunked, resumable, torchrun-sharded and checked as :func:`extract_passes`.
    """
    p = Pass(make=lambda: _AsList(make_extractor()), outputs=[Output(out, model_key, info, desc)])
    extract_passes([p], ImageFeed(dataset, cfg.workers), data_key, cfg, desc, extra_arrays)
    return out


def iter_features(extractor, dataset, batches, workers=2, device="cpu", amp=True, bar=None):
    """Yield (features float32 ndarray, labels ndarray) for each list of indices in ``batches``, in order."""
    device = torch.device(device)
    modules = {0: (_AsList(extractor).to(device).to(memory_format=torch.channels_last), 0)}
    work = [(rows, 0, [0]) for rows in batches]
    for (rows, _, _), out, y in _stream(ImageFeed(dataset, workers), work, modules, device, amp):
        if bar is not None:
            bar.update(len(rows))
        yield out[0][0], y


def extract(extractor, dataset, batch_size=64, workers=2, device="cpu", amp=True, desc="features"):
    """Run ``extractor`` over a map-style ``dataset`` of (image tensor, label); return float32 features and labels."""
    if len(dataset) == 0:
        raise UserError(f"{desc}: nothing to extract (empty dataset)")
    batches = [list(range(i, min(i + batch_size, len(dataset)))) for i in range(0, len(dataset), batch_size)]
    feed = ImageFeed(dataset, workers)
    with tqdm(total=len(dataset), desc=desc, unit="img", dynamic_ncols=True) as bar:
        out = []
        for f, y in iter_features(extractor, dataset, batches, workers, device, amp, bar):
            _check_finite(f, f, np.asarray(batches[len(out)]), feed, Output("(in memory)", {}, {}, desc), "float32")
            out.append((f, y))
    return np.concatenate([f for f, _ in out]), np.concatenate([y for _, y in out])


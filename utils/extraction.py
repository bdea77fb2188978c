"""Extraction: images -> batches -> one forward per backbone (any number of layers each) -> keyed store entries.

One pass over a split feeds any number of *passes* (one forward of one model per batch), each giving one or more
*outputs* (one store entry each: a backbone at one layer). Every image is decoded once per pass over the data,
by one of three feeds (utils/feeds.py: ``ImageFeed``, PIL in loader workers, the default; ``CacheFeed``, a decoded uint8
copy; utils/decode.py: ``GpuFeed``, JPEGs decoded on the device).

Rows are written in chunks (``--chunk_size``), each atomically, so a killed run resumes at its first unfinished chunk;
under torchrun rank r extracts chunks r, r + world, ... and rank 0 merges them. Every batch of features is checked
before it is written: a non-finite value stops the run with one error naming the image, and no entry is finished.
An image PIL refuses is skipped and counted (its rows are left out of every array, so features, labels and indices
stay aligned; the entry's info lists it), or with ``strict`` stops the run with one error naming it.
"""
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from . import store
from .backbones import Backbone
from .device import resolve_device
from .errors import UserError
from .feeds import ImageFeed, barrier, distributed
from .validate import RebuildConfig


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


def extract_passes(passes, feed, data_key, cfg, desc, extra_arrays=None, content=None, verify=False, force=False,
                   strict=False):
    """Fill the store entry of every output of ``passes`` in one pass over ``feed``, skipping entries whose key is
    current and, on a resumed run, chunks already written. ``cfg`` (an :class:`ExtractConfig`) supplies batch_size,
    chunk_size, dtype, device, amp. ``content`` (optional) returns the inputs' content digest: recorded in each
    entry written, and with ``verify`` compared with the one a current entry recorded. ``force`` re-extracts every
    entry from scratch (what a message about a damaged entry advises). A row the feed marks unreadable (label -1)
    is left out of every array (``extra_arrays`` are per feed row, and lose the same rows) and listed in the entry's
    info (``skipped``); with ``strict`` it stops the run with one error naming the file. Returns the entry paths."""
    todo, digest = [], {}

    def content_once():
        if "d" not in digest:
            digest["d"] = content()
        return digest["d"]
    for pi, p in enumerate(passes):
        for oi, o in enumerate(p.outputs):
            key = entry_key(o.model_key, data_key, cfg.dtype, feed.key)
            if not force and store.is_current(o.out, key) and \
                    not (verify and content and not store.content_unchanged(o.out, content_once)):
                print(f"{o.out} is up to date")
            else:
                todo.append(_Todo(pi, oi, o, key))
    paths = [o.out for p in passes for o in p.outputs]
    if not todo:
        return paths
    if content is not None:
        for t in todo:
            t.output.info = dict(t.output.info, content_digest=content_once())
    n = len(feed)
    if n == 0:
        raise UserError(f"{desc}: nothing to extract (empty dataset)")
    rank, world = distributed()
    size = cfg.chunk_size
    n_chunks = -(-n // size)
    for t in todo:
        # the chunk size is part of the partial folder's name: a run resumed with another size starts afresh
        t.partial = store.partial_dir(t.output.out, dict(t.key, chunk_rows=size))
        if force and rank == 0:
            shutil.rmtree(t.partial, ignore_errors=True)
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
                    feats, labels, skipped, got, current = [[] for _ in active], [], [], 0, c
                keep = y >= 0
                if not keep.all():
                    bad = [r for r, k in zip(rows, keep) if not k]
                    if strict:
                        raise UserError(f"{feed.describe(bad[0])} is unreadable ({feed.why_unreadable(bad[0])}); "
                                        f"replace or remove the file, then rerun the same command (finished chunks "
                                        f"are kept), or rerun it without --strict to skip unreadable images")
                    skipped += bad
                kept = [r for r, k in zip(rows, keep) if k]
                for t, acc in zip(active, feats):
                    f32 = out[t.pass_id][t.index][keep]
                    stored = f32.astype(cfg.dtype)
                    _check_finite(f32, stored, kept, feed, t.output, cfg.dtype)
                    acc.append(stored)
                labels.append(y[keep])
                got += len(rows)
                bar.update(len(rows))
                if got == min(size, n - c * size):
                    writer.submit(_write_chunks, store, c, [(t.partial, np.concatenate(acc))
                                                            for t, acc in zip(active, feats)], np.concatenate(labels),
                                  np.asarray(skipped, np.int64))
        finally:
            bar.close()       # first: a chunk write's error, raised by close(), then starts on its own line
            writer.close()
        if hasattr(feed, "report"):          # --decode gpu: how many images were decoded with PIL, and why
            decode_info = feed.report()
    barrier(world)
    if rank == 0:
        for t in todo:
            skipped = sorted(int(r) for c in range(n_chunks) for r in store.chunk_array(t.partial, c, "skipped"))
            info = {**t.output.info, **decode_info, **skip_info(feed, skipped, n)}
            keep = np.ones(n, bool)
            keep[skipped] = False
            extra = {k: np.asarray(a)[keep] for k, a in (extra_arrays or {}).items()}
            store.merge_chunks(t.partial, t.output.out, n_chunks, t.key, info, extra, side=("skipped",))
            arrays, _ = store.read(t.output.out, verify=False)   # its digest was just computed
            print(f"{arrays['features'].shape[0]} x {arrays['features'].shape[1]} {cfg.dtype} features "
                  f"-> {t.output.out}" + skip_note(info))
    barrier(world)
    return paths


def _write_chunks(store, c, batch, labels, skipped):
    for partial, features in batch:
        store.write_chunk(partial, c, {"features": features, "labels": labels, "skipped": skipped})


SKIP_LISTED = 1000       # files named in an entry's info; the count is always whole


def skip_info(feed, skipped, n):
    """The entry info of an extraction of ``n`` feed rows that skipped rows ``skipped`` (unreadable images): how many
    rows the entry holds, and the skipped files (relative paths) with the error class each raised."""
    if not skipped:
        return {"rows": n - len(skipped), "skipped": {"count": 0, "files": []}}
    files = []
    for r in skipped[:SKIP_LISTED]:
        why = feed.why_unreadable(r)
        files.append({"file": feed.source_file(r), "row": r, "error": why.split(":")[0]})
    return {"rows": n - len(skipped), "skipped": {"count": len(skipped), "files": files}}


def skip_note(info):
    """The summary line's note on skipped images ('' when none was)."""
    sk = info.get("skipped") or {}
    if not sk.get("count"):
        return ""
    named = ", ".join(f"{f['file']} ({f['error']})" for f in sk["files"][:3])
    more = f" and {sk['count'] - 3} more" if sk["count"] > 3 else ""
    return (f" ({sk['count']} unreadable image{'s' if sk['count'] > 1 else ''} skipped: {named}{more}; listed in its "
            f"meta.json info; --strict stops on them instead)")


# ---------------------------------------------------------------------------------------------------------------------
# One model, one entry (element embeddings, CLIP image features, in-memory extraction)
# ---------------------------------------------------------------------------------------------------------------------
class _AsList(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return [self.module(x)]


def extract_to_store(make_extractor, model_key, dataset, data_key, out, info, cfg, desc, extra_arrays=None,
                     content=None, rebuild=RebuildConfig(), strict=False):
    """Extract ``dataset`` (map-style, (input tensor, label)) features with ``make_extractor()`` (a module returning
    (N, D)) into the store entry ``out`` unless an entry with the same key is there.

    The key is ``model_key`` (a backbone's: architecture, weights content, layer, pooling, preprocessing; or CLIP's),
    the stored dtype and ``data_key``. Chunked, resumable, torchrun-sharded and checked as :func:`extract_passes`;
    ``content``, ``rebuild`` (--force, --verify) and ``strict`` mean what they do there.
    """
    p = Pass(make=lambda: _AsList(make_extractor()), outputs=[Output(out, model_key, info, desc)])
    extract_passes([p], ImageFeed(dataset, cfg.workers), data_key, cfg, desc, extra_arrays, content=content,
                   verify=rebuild.verifying, force=rebuild.force, strict=strict)
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


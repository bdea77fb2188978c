"""The original code's flags, file names and commands, accepted by this project's stage scripts when they opt in.

Readers of the paper type the original README's commands first: from inside the stage folders, with its flag names.
A stage script opts in with ``cli.run(main, parser, dialect=compat.dialect(__file__))``: before argparse sees the
command line, :meth:`Dialect.translate` rewrites it into this project's flags (``ALIASES`` is the one table of what
each original flag becomes; docs/original.md's table of them is :func:`markdown_table`) and returns
what to do with the parsed flags before ``main``: checks of values the original made users repeat (``--in_channels``,
``--num_classes``: read from the data here, so a given one is only compared with it), and the commands of ours that one
original command stood for (its textual_emb_extractor also extracted the backbone's train/val features: here two
dataset_feature_extractor runs, first).

Files: the original wrote pickles and torch tensors (``embs/<model>/visual_element_emb.pkl``,
``<dataset>_train_<model>_<layer>.pt``). Here the same paths, less the extension, are store entries (folders), so the
next command of the original sequence finds what the previous one wrote, and no pickle is ever loaded.

This project's own runners (scripts/run_pipeline.sh, compare_backbones.sh, finetune_compare.sh, train_heads.sh,
demo.sh) speak only its own flags: they export ``IIS_COMPAT=off``, under which :func:`dialect` gives None and nothing
is translated, so a value of ours can never be read the original's way.
"""
import itertools
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Callable, Optional

import yaml

from .data import BUILTIN, IMAGE_EXTS
from .errors import UserError
from .specs import config_path
from .store import read_meta

ELEMENTS = ("segment_extractor", "patch_extractor")
DATA_SCRIPTS = ELEMENTS + ("dataset_feature_extractor", "textual_emb_extractor")
# ${name} left unexpanded by single quotes in the original README, and the flag of the same command that names it
SHELL_VARS = {"target_dataset": ("--dataset",), "model_name": ("--backbone", "--model_name", "--model"),
              "model": ("--model", "--backbone", "--model_name"),
              "target_layer_name": ("--feature_layer", "--target_layer_name")}


@dataclass(frozen=True)
class Alias:
    """One original flag: its spellings, the scripts that take it, what it becomes (for the table) and how.

    ``apply(value, ctx)`` returns our argv tokens; None means the script's composer uses the value (see ``COMPOSE``).
    """
    flags: tuple
    scripts: tuple
    ours: str
    apply: Optional[Callable] = None
    takes_value: bool = True


class Context:
    """What :func:`translate` knows about one command line: the script, the original flags given, our own tokens, and
    what it collects: checks on the parsed flags, and commands of ours to run first."""

    def __init__(self, script, given, rest):
        self.script, self.given, self.rest, self.checks, self.before = script, given, rest, [], []
        self.name = os.path.splitext(os.path.basename(script))[0]

    def ours(self, flag):
        """The last value given to our own ``flag`` (None when absent)."""
        val = None
        for i, t in enumerate(self.rest):
            if t == flag and i + 1 < len(self.rest):
                val = self.rest[i + 1]
            elif t.startswith(flag + "="):
                val = t.split("=", 1)[1]
        return val

    def root(self):
        """The checkout holding the script (stage scripts sit one folder down, in a package)."""
        d = os.path.dirname(os.path.abspath(self.script))
        return os.path.dirname(d) if os.path.isfile(os.path.join(d, "__init__.py")) else d


# ---------------------------------------------------------------------------------------------------------------------
# value rules
# ---------------------------------------------------------------------------------------------------------------------
def rename(ours):
    return lambda v, ctx: [ours, v]


def is_class_folder_dir(path):
    """True for a folder of class folders holding images (the original's --data_root), false for a dataset cache."""
    if not os.path.isdir(path) or os.path.isdir(os.path.join(path, "train")):
        return False
    for d in os.scandir(path):
        if d.is_dir() and any(f.name.lower().endswith(IMAGE_EXTS) for f in os.scandir(d.path) if f.is_file()):
            return True
    return False


def _data_root(v, ctx):
    if not os.path.exists(v):   # never a download into it, nor another dataset in its place
        raise UserError(f"--data_root {v}: no such folder; give a folder of class folders of images (the original's "
                        f"layout, e.g. datasets/imagenet/val), or --dataset NAME for a named dataset")
    return ["--images", v] if is_class_folder_dir(v) else ["--data_root", v]


def _save_root(v, ctx):
    method = "segments" if ctx.name == "segment_extractor" else "patches"
    parent, last = os.path.split(os.path.normpath(v))
    if last != method:
        raise UserError(f"--save_root {v}: elements are written to <folder>/{method}/ here; give --save_root "
                        f"<folder>/{method} (or --out_dir <folder>)")
    return ["--out_dir", parent or "."]


def dataset_path(v, ctx):
    """The original's dataset names: ``imagenet`` = ``datasets/imagenet/{train,val}`` (here or in the checkout)."""
    if v in BUILTIN or os.path.exists(v) or os.sep in v:
        return v
    for base in (".", ctx.root()):
        cand = os.path.join(base, "datasets", v)
        if os.path.isdir(cand):
            return cand
    raise UserError(f"--dataset {v}: not one of {', '.join(BUILTIN)} and no folder datasets/{v}/ (with train/ and "
                    f"val/ class folders, the original's layout) here or in {ctx.root()}; put it there or give a path")


def _dataset(v, ctx):
    return ["--dataset", dataset_path(v, ctx)]


def _model(v, ctx):
    """A model name: its model_configs/ YAML when there is one (its weights and layout), else a backbone name."""
    cfg = ctx.given.get("--config_yaml")
    if cfg is not None:
        name = config_tokens(cfg, ctx)[1]
        if v != name:
            raise UserError(f"--model {v} contradicts --config_yaml {cfg} (a {name} config)")
        return []
    return _model_by_name(v)


def config_tokens(v, ctx):
    """--config_yaml / --model_config value -> our tokens. The original's ``resnet50_IMAGENET1K_V1.yaml`` names
    model_configs/resnet50.yaml with weights IMAGENET1K_V1; a file in the original's format (model:, weights:) is read
    for those two keys."""
    stem = os.path.splitext(os.path.basename(v))[0]
    if os.path.isfile(v):
        with open(v) as f:
            cfg = yaml.safe_load(f) or {}
        if "model" in cfg and "arch" not in cfg:       # the original's format
            tokens = _model_by_name(str(cfg["model"]))
            return tokens + (["--weights", str(cfg["weights"])] if cfg.get("weights") else []), str(cfg["model"])
        return ["--model_config", v], stem
    if config_path(stem):
        return ["--model_config", stem], stem
    m = re.match(r"^(.+?)_((?:IMAGENET|DEFAULT)\w*)$", stem)
    if m and config_path(m.group(1)):
        return ["--model_config", m.group(1), "--weights", m.group(2)], m.group(1)
    return ["--model_config", v], stem                  # load_spec names what is available


def _model_by_name(name):
    return ["--model_config", name] if config_path(name) else ["--backbone", name]


def _config(v, ctx):
    tokens = config_tokens(v, ctx)[0]
    if "--weights" in tokens and ctx.ours("--weights"):     # weights given on the command line win, as in the original
        i = tokens.index("--weights")
        tokens = tokens[:i] + tokens[i + 2:]
    return tokens


def store_entry(path):
    """The store entry an original ``.pkl``/``.pt`` path names: the path without its extension."""
    if os.path.isfile(os.path.join(path, "meta.json")):
        return path
    base, ext = os.path.splitext(path.rstrip("/"))
    if ext in (".pkl", ".pt", ".pth", ".npy") and os.path.isfile(os.path.join(base, "meta.json")):
        return base
    if os.path.isfile(path):
        raise UserError(f"{path} is a file written by the original code; this project reads its own store entries "
                        f"only (never pickles): make it again with this project's extractor (same command)")
    return base if ext in (".pkl", ".pt", ".pth", ".npy") else path


def _entry(ours):
    return lambda v, ctx: [ours, store_entry(v)]


def _int(flag, v):
    try:
        return int(v)
    except ValueError:
        raise UserError(f"{flag} needs an integer, got {v!r}") from None


def _checked(flag, read):
    """A value the original made users repeat, read from the train features here: ``read(meta)`` gives (accepted
    values, description). A given value is compared with them once the flags are parsed."""
    def apply(v, ctx):
        v = v if flag == "--model_name" else str(_int(flag, v))

        def check(args):
            meta = read_meta(args.train_features)
            if meta is None:
                return                                  # the trainer itself says the entry is missing
            accepted, what = read(meta)
            if accepted and v not in accepted:
                raise UserError(f"{flag} {v} contradicts {args.train_features}: it holds {what} (no need to give "
                                f"it: it is read from the features)")
        ctx.checks.append(check)
        return []
    return apply


def _feature_dim(meta):
    d = meta["arrays"]["features"][0][1]
    return {str(d)}, f"{d}-d features"


def _n_classes(meta):
    n = len(meta["info"].get("classes") or [])
    return ({str(n)} if n else set()), f"{n} classes"


def _backbone(meta):
    spec = meta["info"].get("backbone") or {}
    return {spec.get("name"), spec.get("arch")} - {None}, f"{spec.get('name')} features"


def _refuse(msg):
    def apply(v, ctx):
        raise UserError(msg)
    return apply


def _always(v, ctx):
    return []


# ---------------------------------------------------------------------------------------------------------------------
# composers: flags that together name one file of the original's flow
# ---------------------------------------------------------------------------------------------------------------------
def _names(ctx, default_layer):
    """(dataset, backbone, layer) as the original's file names spell them (the dataset: our default when absent, so
    the extractor and the trainer agree)."""
    d = os.path.basename(os.path.normpath(ctx.given.get("--dataset") or ctx.ours("--dataset") or "fashion_mnist"))
    m = ctx.given.get("--backbone") or ctx.ours("--model_config")
    if not m:
        raise UserError("--activation_dir needs --backbone (its files are named <dataset>_<split>_<backbone>_<layer>)")
    return d, os.path.splitext(os.path.basename(m))[0], ctx.given.get("--feature_layer") or ctx.ours(
        "--layer") or default_layer


def _concept_set_name(ctx, dataset):
    return os.path.splitext(os.path.basename(ctx.given.get("--concept_set") or f"{dataset}_filtered.txt"))[0]


# our flags of the backbone (one value each), which dataset_feature_extractor takes and textual_emb_extractor does not
BACKBONE_FLAGS = ("--model_config", "--backbone", "--weights", "--layer", "--pooling")
# our flags both extractors take, passed to the backbone's runs as given
SHARED_FLAGS = ("--dataset", "--data_root", "--seed", "--batch_size", "--workers", "--device", "--dtype",
                "--chunk_size", "--amp", "--no-amp")
SWITCHES = ("--amp", "--no-amp")
FEATURES = "concept_extractor.dataset_feature_extractor"


def take(tokens, flags):
    """(the tokens of ``flags`` in ``tokens`` -- ``--flag value``, ``--flag=value`` or a switch -- and the others)."""
    picked, left, i = [], [], 0
    while i < len(tokens):
        t = tokens[i]
        name = t.partition("=")[0]
        if name in flags and ("=" in t or name in SWITCHES or i + 1 == len(tokens)):
            picked.append(t)
        elif name in flags:
            picked += tokens[i:i + 2]
            i += 1
        else:
            left.append(t)
        i += 1
    return picked, left


def _compose_text_extractor(ctx):
    """The original's textual_emb_extractor wrote the backbone's train/val features and then CLIP's into
    --activation_dir: here two dataset_feature_extractor runs (same subsets), then this script's CLIP features."""
    backbone, rest = take(ctx.rest, BACKBONE_FLAGS)
    if "--activation_dir" not in ctx.given:
        if backbone:
            raise UserError(f"{backbone[0].partition('=')[0]}: the backbone's features are extracted (as the "
                            f"original's textual_emb_extractor did) only with --activation_dir, where they go; give "
                            f"it, or extract them with concept_extractor.dataset_feature_extractor")
        return rest
    d, m, layer = _names(ctx, "layer4")
    act = ctx.given["--activation_dir"]
    if not (ctx.given.get("--feature_layer") or ctx.ours("--layer")):
        backbone += ["--layer", layer]
    shared = take(rest, SHARED_FLAGS)[0]
    for split, size in (("train", "--max_train"), ("val", "--max_val")):
        n = ctx.ours(size)
        ctx.before.append(["-m", FEATURES, *backbone, *shared, "--split", split, "--out",
                           os.path.join(act, f"{d}_{split}_{m}_{layer}")] + (["--max_images", n] if n else []))
    return rest + ["--out", os.path.join(act, f"{d}_clip_{_concept_set_name(ctx, d)}")]


def _compose_text_trainer(ctx):
    if not any(f in ctx.given for f in ("--activation_dir", "--dataset", "--backbone", "--feature_layer",
                                        "--concept_set")):
        return ctx.rest
    d, m, layer = _names(ctx, "layer4")
    act = ctx.given.get("--activation_dir", "saved_activations")
    return ctx.rest + ["--train_features", os.path.join(act, f"{d}_train_{m}_{layer}"),
                       "--val_features", os.path.join(act, f"{d}_val_{m}_{layer}"),
                       "--clip", os.path.join(act, f"{d}_clip_{_concept_set_name(ctx, d)}")]


def _compose_element_embeddings(ctx):
    """The original wrote ./embs/<model>/visual_element_emb.pkl from inside concept_extractor/."""
    if not set(ctx.given) - {"--model_config"} or ctx.ours("--out"):
        return ctx.rest
    model = ctx.given.get("--model")
    if model is None:
        cfg = ctx.given.get("--config_yaml")
        model = config_tokens(cfg, ctx)[1] if cfg else (ctx.ours("--model_config") or "efficientnet_lite0")
    here = os.path.dirname(os.path.abspath(ctx.script))
    return ctx.rest + ["--out", os.path.join(here, "embs", model, "visual_element_emb")]


# script -> composer: given the context (ctx.rest = our argv so far), the whole argv
COMPOSE = {"textual_emb_extractor": _compose_text_extractor, "IP_Text_training": _compose_text_trainer,
           "visual_element_emb_extractor": _compose_element_embeddings}

EMB, TEXT, PROTO, TXT_TRAIN = ("visual_element_emb_extractor",), ("textual_emb_extractor",), \
    ("IP_Prototype_training",), ("IP_Text_training",)
ALIASES = [
    Alias(("--data_root",), ELEMENTS, "`--images DIR` when DIR holds class folders of images (else `--data_root` "
          "keeps its meaning here: where the named datasets live)", _data_root),
    Alias(("--save_root",), ELEMENTS, "`--out_dir DIR` for `--save_root DIR/segments` (or `DIR/patches`)", _save_root),
    Alias(("--image_per_class",), ELEMENTS, "`--images_per_class`", rename("--images_per_class")),
    Alias(("--dataset",), DATA_SCRIPTS, "`--dataset datasets/imagenet` for `--dataset imagenet` (the original's "
          "layout, `datasets/<name>/{train,val}`)", _dataset),
    Alias(("--config_yaml",), EMB, "`--model_config` (`…/resnet50_IMAGENET1K_V1.yaml` = `resnet50` + `--weights "
          "IMAGENET1K_V1`; a file in the original's format is read for `model:` and `weights:`)", _config),
    Alias(("--model_config",), EMB + TEXT + ("dataset_feature_extractor",), "the original's config names resolve "
          "too: `resnet50_IMAGENET1K_V1` = `resnet50` + `--weights IMAGENET1K_V1`", _config),
    Alias(("--model",), EMB, "`--model_config M` (or `--backbone M` where model_configs/ has no M)", _model),
    Alias(("--target_layer_name",), EMB, "`--layer`", rename("--layer")),
    Alias(("--data-path",), EMB, "`--elements`", rename("--elements")),
    Alias(("--batch-size", "-b"), EMB, "`--batch_size`", rename("--batch_size")),
    Alias(("-j",), EMB, "`--workers`", rename("--workers")),
    Alias(("--resume",), EMB, "`--weights FILE` (a checkpoint's `model` state dict, read as tensors only)",
          rename("--weights")),
    Alias(("--val-resize-size", "--val-crop-size", "--interpolation", "--backend"), EMB,
          "refused: the preprocessing is the weights' own evaluation transform",
          _refuse("--val-resize-size/--val-crop-size/--interpolation/--backend: here the preprocessing is the "
                  "evaluation transform that comes with the weights (see the backbone's key in the store entry)")),
    Alias(("--concept_set",), TEXT, "`--concepts`", rename("--concepts")),
    Alias(("--clip_name",), TEXT, "`--clip_model` (`ViT-B/16` → `ViT-B-16`)",
          lambda v, ctx: ["--clip_model", v.replace("/", "-")]),
    Alias(("--backbone",), TEXT, "`--model_config M` (or `--backbone M` where model_configs/ has no M)",
          lambda v, ctx: _model_by_name(v)),
    Alias(("--feature_layer",), TEXT, "`--layer`", rename("--layer")),
    Alias(("--activation_dir",), TEXT, "first `dataset_feature_extractor --split train` and `--split val` into "
          "`DIR/<dataset>_{train,val}_<M>_<L>` (the backbone's features, as the original wrote them), then `--out "
          "DIR/<dataset>_clip_<concept set name>`"),
    Alias(("--train_pt",), PROTO, "`--train_features` (`X.pt` names the store entry `X`)", _entry("--train_features")),
    Alias(("--val_pt",), PROTO, "`--val_features` (likewise)", _entry("--val_features")),
    Alias(("--concept_path",), PROTO, "`--concepts` (`X.pkl` names the store entry `X`)", _entry("--concepts")),
    Alias(("--num_concepts",), PROTO, "`--n_concepts`", rename("--n_concepts")),
    Alias(("--n_epoch",), PROTO, "`--epochs`", rename("--epochs")),
    Alias(("--save_dir",), PROTO + TXT_TRAIN, "`--out`", rename("--out")),
    Alias(("--in_channels",), PROTO, "read from the features; a different value is an error",
          _checked("--in_channels", _feature_dim)),
    Alias(("--num_classes",), PROTO, "read from the features; a different value is an error",
          _checked("--num_classes", _n_classes)),
    Alias(("--model_name",), PROTO, "read from the features; a different value is an error",
          _checked("--model_name", _backbone)),
    Alias(("--activation_dir", "--dataset", "--backbone", "--feature_layer"), TXT_TRAIN,
          "`--train_features DIR/<dataset>_train_<backbone>_<layer> --val_features DIR/<dataset>_val_…`"),
    Alias(("--concept_set",), TXT_TRAIN, "`--clip DIR/<dataset>_clip_<concept set name>`"),
    Alias(("--sparsity_ratio",), TXT_TRAIN, "nothing: every ratio of the grid is always trained", _always,
          takes_value=False),
    Alias(("--sparsity_ratio_value",), TXT_TRAIN, "refused: one ratio makes no IIS (`--ratios` sets the grid)",
          _refuse("--sparsity_ratio_value trains one sparsity ratio in the original; here every ratio of --ratios "
                  "is trained (an IIS needs at least two)")),
    Alias(("--lam", "--n_iters", "--saga_batch_size"), TXT_TRAIN, "refused: no glm-saga solver here (the top-k mask "
          "makes each ratio sparse; `--lrs`, `--epochs`, `--batch_size` train the heads)",
          _refuse("--lam/--n_iters/--saga_batch_size set the original's glm-saga solver; here each ratio keeps its "
                  "top-k concepts per sample and the heads train with Adam (--lrs, --epochs, --batch_size)")),
    Alias(("--proj_steps",), TXT_TRAIN, "refused: the projection trains by epochs (`--proj_epochs`, "
          "`--proj_patience`)", _refuse("--proj_steps: the projection trains by epochs here, early-stopped on val "
                                        "(--proj_epochs, --proj_patience)")),
    Alias(("--print",), TXT_TRAIN, "nothing: results.json lists every dropped concept and why", _always,
          takes_value=False),
    Alias(("--model_root",), ("iis_computing",), "the results folder, as an argument", lambda v, ctx: [v]),
    Alias(("--seed",), PROTO + TXT_TRAIN, "`--seeds N` (one seed: this project's own older spelling)",
          rename("--seeds")),
]


def table_for(name):
    """{spelling: Alias} of script ``name``; a multi-flag row gives one entry per flag."""
    return {f: a for a in ALIASES if name in a.scripts for f in a.flags}


def _expand(value, given):
    def sub(m):
        for flag in SHELL_VARS.get(m.group(1), ()):
            if flag in given:
                return given[flag]
        raise UserError(f"{value}: the shell variable ${{{m.group(1)}}} was not expanded (single quotes keep it "
                        f"literal); use double quotes")
    return re.sub(r"\$\{(\w+)\}", sub, value)


def _our_config(v):
    """A --model_config value this project reads as it is: a model_configs/ name or a YAML path, optionally :LAYER."""
    return config_path(v.split(":", 1)[0]) is not None


def translate(script, argv):
    """(our argv, context) for ``argv`` given to ``script`` (its file path): the context holds the checks to run on
    the parsed flags and the commands to run first. Our own flags pass unchanged."""
    name = os.path.splitext(os.path.basename(script))[0]
    table = table_for(name)
    given, rest, i = {}, [], 0
    while i < len(argv):
        flag, eq, val = argv[i].partition("=")
        alias = table.get(flag) if flag.startswith("-") else None
        if alias is None:
            rest.append(argv[i])
            i += 1
            continue
        key = alias.flags[0] if alias.apply else flag   # spellings of one flag share a key; a composer reads each
        if flag == "--model_config" and not eq:
            vals = list(itertools.takewhile(lambda t: not t.startswith("-"), argv[i + 1:]))
            if all(_our_config(v) for v in vals):   # our own flag (several CONFIG[:LAYER] in one pass)
                rest += [flag] + vals
                i += 1 + len(vals)
                continue
            if len(vals) > 1:
                raise UserError(f"--model_config: give one of the original's config names at a time, not {vals}")
        if not alias.takes_value or eq:
            given[key] = val if eq else None
        elif i + 1 < len(argv):
            given[key] = argv[i + 1]
            i += 1
        else:
            raise UserError(f"{flag} needs a value")
        i += 1
    given = {f: None if v is None else _expand(v, given) for f, v in given.items()}
    ctx = Context(script, given, rest)
    out = list(rest)
    for flag, v in given.items():
        if table[flag].apply is not None:
            out += table[flag].apply(v, ctx)
    if name in COMPOSE:
        ctx.rest = out
        out = COMPOSE[name](ctx)
    return out, ctx


def help_text(name):
    """One paragraph for a script's --help: the original flags it accepts."""
    rows = [a for a in ALIASES if name in a.scripts]
    if not rows:
        return None
    flags = ", ".join(f for a in rows for f in a.flags)
    return textwrap.fill(f"The original code's flags are accepted too (utils/compat.py; docs/original.md): "
                         f"{flags}.", 100)


# ---------------------------------------------------------------------------------------------------------------------
# A stage script's opt-in (utils/cli.run)
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Translation:
    """One command line in our flags, with what runs on the parsed flags before ``main`` (:meth:`prepare`) and, once
    that has written something, a note for any later error (``note``)."""
    argv: list
    checks: list = field(default_factory=list)
    before: list = field(default_factory=list)      # argv of our commands (after ``python``), run in order
    note: str = ""

    def prepare(self, args):
        for check in self.checks:
            check(args)
        for cmd in self.before:                     # our dialect: the commands never come back here
            sys.stdout.flush()
            sys.stderr.flush()
            rc = subprocess.run([sys.executable, *cmd], env=dict(os.environ, IIS_COMPAT="off")).returncode
            if rc:
                sys.exit(rc)                        # the command printed its own error line
        outs = [cmd[cmd.index("--out") + 1] for cmd in self.before]
        if outs:
            self.note = f" (the backbone features are done: {', '.join(outs)})"


class Dialect:
    """The original's flags of one stage script (its file path ``script``)."""

    def __init__(self, script):
        self.script = script
        self.help = help_text(os.path.splitext(os.path.basename(script))[0])

    def translate(self, argv):
        out, ctx = translate(self.script, argv)
        return Translation(out, ctx.checks, ctx.before)


def dialect(script):
    """The :class:`Dialect` of the stage script at ``script`` (pass ``__file__``), or None under ``IIS_COMPAT=off``
    (this project's runners): then its command line is read as ours only."""
    return None if os.environ.get("IIS_COMPAT", "").strip().lower() == "off" else Dialect(script)


def markdown_table():
    """docs/original.md's table: script(s) | original flag | here."""
    lines = ["| script | original flag | here |", "|---|---|---|"]
    for a in ALIASES:
        scripts = "element extractors" if a.scripts == ELEMENTS else "extractors" if a.scripts == DATA_SCRIPTS \
            else ", ".join(a.scripts)
        lines.append(f"| {scripts} | {' '.join(f'`{f}`' for f in a.flags)} | {a.ours} |")
    return "\n".join(lines)

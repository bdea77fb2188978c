"""One training run of the IIS grid, shared by the visual and text trainers: the standard probe on the features,
the sparse heads on their input, and the results.json / heads.pt they write (schema in docs/files.md). What a run trains is a
:class:`SweepConfig` (the trainers' training flags), completed by its protocol's presets (:data:`PROTOCOLS`)."""
import io
import os
from dataclasses import dataclass, replace

import numpy as np
import torch

from . import iis, probe, results, store, validate
from .errors import UserError
from .fileio import atomic_torch_save, atomic_write_bytes, atomic_write_json, key_hash, manifest, remove_strays
from .heads import LinearProbes, Split, fit, rows

RESULTS_SCHEMA = "iis.results/2"
FILES = ("heads.pt", "predictions.npz")     # what results.json's manifest covers

# What each protocol fixes unless a flag says otherwise. "iis" is this project's; "reference" is the original code's
# (its keep rule, its trunc_normal(0.02) / zero-bias init of every linear layer, ExponentialLR(0.99) per epoch, batch
# 1024 and its single lr), for comparing with numbers it made. keep_rule and init have no flag of their own.
# The standard probe: "converged" is utils/probe.py's (standardised features, solved to its optimum), "adam" the
# original's (trained like the concept heads, with the same lrs, epochs and batch).
PROTOCOLS = {
    "iis": dict(batch_size=256, lrs=[1e-3, 1e-2], lr_decay=1.0, keep_rule="round", select_on="holdout",
                init="uniform", standard_probe="converged"),
    "reference": dict(batch_size=1024, lrs=[1e-2], lr_decay=0.99, keep_rule="reference", select_on="val",
                      init="trunc_normal_0.02", standard_probe="adam"),
}


@dataclass(frozen=True)
class SweepConfig:
    """What one sweep trains (the trainers' flags of these names; see their --help). ``batch_size``, ``lrs``,
    ``lr_decay`` and ``select_on`` may be None: :func:`resolve_protocol` fills them from the protocol."""
    protocol: str
    ratios: list
    lrs: list
    epochs: int
    batch_size: int
    lr_decay: float
    weight_decay: float
    seeds: list
    select_on: str
    holdout_fraction: float
    features_on: str
    feature_dtype: str
    precision: str

    @property
    def keep_rule(self):
        return PROTOCOLS[self.protocol]["keep_rule"]

    @property
    def init(self):
        return PROTOCOLS[self.protocol]["init"]


def resolve_protocol(cfg):
    """``cfg`` with the values left unset taken from its protocol's preset and each seed once, after checking that the
    grid makes an IIS."""
    preset = PROTOCOLS[cfg.protocol]
    cfg = replace(cfg, **{name: preset[name] for name in ("batch_size", "lrs", "lr_decay", "select_on")
                          if getattr(cfg, name) is None}, seeds=list(dict.fromkeys(cfg.seeds)))
    for r in cfg.ratios:
        if not 0 <= r < 1:
            raise UserError(f"sparsity ratios must be in [0, 1), got {r}")
    if len(set(cfg.ratios)) < 2:
        raise UserError("give at least two sparsity ratios (IIS is an area under the curve over them)")
    if cfg.epochs < 1 or cfg.batch_size < 1 or min(cfg.lrs) <= 0 or not 0 < cfg.lr_decay <= 1:
        raise UserError("--epochs and --batch_size must be positive, --lrs positive and --lr_decay in (0, 1]")
    if cfg.select_on == "holdout" and not 0 < cfg.holdout_fraction < 1:
        raise UserError(f"--holdout_fraction must be in (0, 1), got {cfg.holdout_fraction}")
    return cfg


def grid_of(cfg):
    """(sorted ratios, sorted lrs, [(seed, ratio, lr) per concept head]) of a resolved config."""
    ratios, lrs = sorted(set(cfg.ratios)), sorted(set(cfg.lrs))
    return ratios, lrs, [(s, r, lr) for s in cfg.seeds for r in ratios for lr in lrs]


def groups_of(grid, seeds):
    """Group (index into ``seeds``) of each head of a (seed, ...) grid."""
    return [seeds.index(h[0]) for h in grid]


def training_key(cfg, **inputs):
    """What determines a run's results: the resolved ``cfg`` and the keys of its inputs."""
    return dict(schema=RESULTS_SCHEMA, protocol=cfg.protocol, keep_rule=cfg.keep_rule, init=cfg.init,
                ratios=sorted(set(cfg.ratios)), lrs=sorted(set(cfg.lrs)), epochs=cfg.epochs,
                feature_dtype=cfg.feature_dtype, batch_size=cfg.batch_size, lr_decay=cfg.lr_decay,
                weight_decay=cfg.weight_decay, precision=cfg.precision, seeds=cfg.seeds, select_on=cfg.select_on,
                holdout_fraction=cfg.holdout_fraction if cfg.select_on == "holdout" else None, **inputs,
                **({"standard_probe": probe.SETTINGS} if converged_probe(cfg) else {}))


def converged_probe(cfg):
    return PROTOCOLS[cfg.protocol]["standard_probe"] == "converged"


def is_done(out, key):
    """True (and says so) when ``out`` holds a finished run of ``key``; a damaged or half-replaced one is not. Temp
    files a killed run left in ``out`` go first."""
    for name in FILES + ("results.json",):
        remove_strays(os.path.join(out, name))
    if results.finished(out, key_hash(key)):
        print(f"{os.path.join(out, 'results.json')} is up to date")
        return True
    return False


def load_split(path, verify=None, dim=None, dim_of="the train features"):
    """(arrays, meta) of a store entry, with the checks every later step relies on (utils/validate.py):
    the entry's structure (and, with ``verify`` or IIS_VERIFY=1, its recorded digests), at least one row, ``dim``
    columns when given, finite features and labels in [0, n_classes), streamed over the memory map. Trainers call it
    before deciding whether their output is up to date, so a damaged input never passes as current."""
    arrays, meta = store.read(path, verify=verify)
    validate.check_split(path, arrays, meta, dim=dim, dim_of=dim_of)
    return arrays, meta


def tensor(a, device):
    # np.array copies: a read-only memory map handed to torch directly would make it warn
    return torch.as_tensor(np.array(a), device=device)


def _free_bytes(device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def features(a, device, placement="auto", dtype="float32", chunk=65536):
    """A store's (N, D) feature array made ready for :func:`utils.heads.fit`: a tensor resident on ``device`` in
    ``dtype`` (copied in chunks, so host memory never holds a second full copy), or the memory map itself."""
    dt = getattr(torch, dtype)
    need = a.shape[0] * a.shape[1] * torch.finfo(dt).bits // 8
    if placement == "stream" or (placement == "auto" and need > 0.6 * _free_bytes(device)):
        print(f"streaming {need / 2**30:.1f} GiB of features from {getattr(a, 'filename', 'memory')}")
        return a
    out = torch.empty(a.shape, dtype=dt, device=device)
    for i in range(0, a.shape[0], chunk):
        out[i:i + chunk] = torch.from_numpy(np.array(a[i:i + chunk])).to(device=device, dtype=dt)
    return out


def dev_size(n, fraction):
    """Rows of a class of n held out: round(fraction * n), but at least one when the class has two or more."""
    return max(int(round(fraction * n)), 1 if n >= 2 else 0)


def make_splits(labels, seeds, select_on="val", fraction=0.1):
    """One :class:`utils.heads.Split` per seed. With ``select_on='holdout'`` each seed holds out its own seeded,
    class-balanced dev split (:func:`dev_size` rows of every class), so every seed has as many rows as the others;
    with 'val' every seed trains on all rows."""
    labels = np.asarray(labels)
    n = len(labels)
    if select_on == "val":
        return [Split(torch.arange(n), None, s) for s in seeds]
    out = []
    for s in seeds:
        rng = np.random.default_rng([int(s), 1])   # not the subset or concept seed stream
        dev = np.concatenate([rng.choice(idx, dev_size(len(idx), fraction), replace=False)
                              for idx in (np.flatnonzero(labels == c) for c in np.unique(labels))])
        if len(dev) == 0 or len(dev) == n:
            raise UserError(f"--holdout_fraction {fraction} leaves {len(dev)} of {n} train rows for the dev split")
        train_rows = np.setdiff1d(np.arange(n), dev)
        out.append(Split(torch.as_tensor(train_rows), torch.as_tensor(np.sort(dev)), s))
    return out


def concept_scores(heads, x, device, chunk=65536):
    """(G, N, K) float32 normalised concept scores of features ``x`` (tensor or memory map), computed once in chunks:
    the fixed part of Prototype/Cluster heads, which then train on these (``heads.on_scores()``)."""
    n = x.shape[0]
    out = torch.empty(len(heads.concepts), n, heads.concepts.shape[1], device=device)
    with torch.no_grad():
        for i in range(0, n, chunk):
            out[:, i:i + chunk] = heads.scores(rows(x, torch.arange(i, min(i + chunk, n)), device))
    return out


def _num(v):
    return None if not np.isfinite(v) else float(v)


def train(cfg, module, grid, probe_data, head_data, n_classes, device, splits, cache=None):
    """Train the standard probes (one per seed x lr) on ``probe_data`` and the concept heads ``module`` (one per
    (seed, ratio, lr) of ``grid``) on ``head_data``; each *_data is (x_train, y_train, x_val, y_val).

    ``cache``: a :class:`utils.fitcache.FitCache` of the probe features, which the converged probes' fits are
    shared through. Returns (results rows, probes, predictions (R, N_val): row r = the val predictions of results
    row r).
    """
    seeds, lrs = cfg.seeds, sorted(set(cfg.lrs))
    if device.type == "cuda":   # TF32 tensor cores for every float32 matmul of the trainer process, evaluation
        # included: linear heads do not need full fp32
        torch.backends.cuda.matmul.allow_tf32 = True
    std_grid = [(s, lr) for s in seeds for lr in lrs]
    common = dict(epochs=cfg.epochs, batch_size=cfg.batch_size, weight_decay=cfg.weight_decay,
                  lr_decay=cfg.lr_decay, splits=splits, precision=cfg.precision)
    std_extra = [{}] * len(std_grid)
    if converged_probe(cfg):    # one probe per seed, no lr (utils/probe.py)
        std, probes, std_extra = probe.fit_standard(*probe_data, n_classes, splits, device, cache)
        std_grid = [(s.seed, None) for s in splits]
    else:
        probes = LinearProbes(probe_data[0].shape[1], n_classes, len(std_grid), [s for s, _ in std_grid],
                              groups_of(std_grid, seeds), init=cfg.init).to(device)
        std = fit(probes, [lr for _, lr in std_grid], *probe_data, desc="standard probe", **common)
    con = fit(module, [lr for _, _, lr in grid], *head_data, desc="concept heads", **common)
    keep = getattr(module, "heads", module).keep_list

    def row(res, h, **extra):
        return dict(extra, top1=_num(res["top1"][h]), top5=_num(res["top5"][h]),
                    select_top1=_num(res["select_top1"][h]), epoch=int(res["epoch"][h]),
                    train_loss=_num(res["train_loss"][h]), val_loss=_num(res["val_loss"][h]),
                    diverged=int(res["diverged"][h]) or None)
    runs = [row(std, h, head="standard", ratio=None, lr=lr, seed=s, index=h, **std_extra[h])
            for h, (s, lr) in enumerate(std_grid)]
    runs += [row(con, h, head="concept", ratio=r, lr=lr, seed=s, index=h, n_active=keep[h])
             for h, (s, r, lr) in enumerate(grid)]
    for i, r in enumerate(runs):
        r["pred_row"] = i
    _check_divergence(runs)
    return runs, probes, np.concatenate([std["pred"], con["pred"]])


def _check_divergence(runs):
    """Fail when a whole kind of head diverged; otherwise say which heads did (they never count towards a score)."""
    bad = [r for r in runs if r["diverged"]]

    def name(r):
        what = "standard probe" if r["head"] == "standard" else f"concept head s={r['ratio']:g}"
        return f"{what} lr={r['lr']:g} seed={r['seed']} (epoch {r['diverged']})"
    for kind in ("standard", "concept"):
        mine = [r for r in runs if r["head"] == kind]
        if all(r["diverged"] for r in mine):
            raise UserError(f"training diverged: every {kind} head's loss became NaN/Inf, first the "
                            f"{name(min(mine, key=lambda r: r['diverged']))}; lower --lrs")
    for r in bad:
        print(f"note: {name(r)} diverged (loss NaN/Inf) and was stopped; it is marked in results.json and not scored")


def save(out, key, meta, grid, runs, preds, val_labels, heads, probes, extra_tensors):
    """heads.pt and predictions.npz, then results.json: the run's commit point, naming both files' digests
    (utils/results.py), so a run stopped between the replacements is never read as finished."""
    ratios, lrs, seeds = sorted(set(g[1] for g in grid)), sorted(set(g[2] for g in grid)), list(meta["seeds"])
    os.makedirs(out, exist_ok=True)
    std = [r for r in runs if r["head"] == "standard"]
    atomic_torch_save(os.path.join(out, "heads.pt"), {
        **extra_tensors, "ratios": torch.tensor(ratios, dtype=torch.float64),
        "lrs": torch.tensor(lrs, dtype=torch.float64),
        "grid": torch.tensor([(r, lr) for _, r, lr in grid], dtype=torch.float64),
        "head_seed": torch.tensor([s for s, _, _ in grid]), "head_group": torch.tensor(groups_of(grid, seeds)),
        "standard_grid": torch.tensor([(r["seed"], np.nan if r["lr"] is None else r["lr"]) for r in std],
                                      dtype=torch.float64),
        **{f"concept.{n}": p.detach().cpu() for n, p in heads.named_parameters()},
        **{f"standard.{n}": p.detach().cpu() for n, p in probes.named_parameters()}})
    buf = io.BytesIO()
    dt = np.int16 if len(meta["classes"]) <= np.iinfo(np.int16).max else np.int32
    np.savez(buf, pred=preds.astype(dt), labels=np.asarray(val_labels, dtype=np.int64))
    atomic_write_bytes(os.path.join(out, "predictions.npz"), buf.getvalue())
    path = os.path.join(out, "results.json")
    atomic_write_json(path, {"schema": RESULTS_SCHEMA, "key": key, "key_hash": key_hash(key), "meta": meta,
                             "sparsity_grid": ratios, "lr_grid": lrs, "seeds": seeds,
                             "predictions": "predictions.npz", "runs": runs, "files": manifest(out, FILES)})

    try:    # the heads the IIS takes (utils/iis.py), not the best val top-1: that would peek at val
        chosen = list(iis.select(iis.runs_of({"runs": runs})).values())
    except UserError as e:     # a ratio whose every head diverged: the results say so, scoring refuses it
        print(f"results -> {path}; {e}")
        return
    print(f"standard top-1 {np.mean([c['standard']['top1'] for c in chosen]):.2f}%; concept heads at "
          f"s={ratios[0]:g}: {np.mean([c['ratios'][ratios[0]]['top1'] for c in chosen]):.2f}% (the heads scored, "
          f"chosen on {meta.get('select_on', 'val')}{', mean over seeds' if len(chosen) > 1 else ''}) -> {path}")


def run_meta(cfg, train_meta, val_meta, **extra):
    """results.json's meta: the backbone, the protocol and what identifies the val samples (for paired tests); with
    ``skipped_images`` {train, val} when the extraction skipped unreadable images (n_train / n_val count the rows
    present)."""
    skipped = {split: _skipped(m) for split, m in (("train", train_meta), ("val", val_meta))}
    if any(skipped.values()):
        extra = dict(extra, skipped_images=skipped)
        print(f"note: the features skip unreadable images (train {skipped['train']}, val {skipped['val']}: listed in "
              f"their meta.json info); n_train and n_val count the rows present")
    return dict(backbone_meta(train_meta), **extra, protocol=cfg.protocol, select_on=cfg.select_on,
                seeds=list(cfg.seeds), val_samples=key_hash(val_meta["key"].get("data", val_meta["key"])))


def _skipped(meta):
    """How many unreadable images the extraction of an entry skipped (its info.skipped.count; 0 when none)."""
    sk = (meta.get("info") or {}).get("skipped") if isinstance(meta.get("info"), dict) else None
    n = sk.get("count") if isinstance(sk, dict) else 0
    return n if isinstance(n, int) and not isinstance(n, bool) else 0


def backbone_meta(train_meta, entry="the train features"):
    spec = validate.meta_field(entry, train_meta, "info.backbone")
    for name in ("name", "arch", "weights", "layer", "pooling"):
        if name not in spec:
            raise UserError(f"{os.path.join(entry, 'meta.json')}: 'info.backbone' has no {name!r}; {validate.damaged(entry)}")
    validate.meta_field(entry, train_meta, "info.classes", list)
    return {"backbone": spec["name"], "arch": spec["arch"], "weights": spec["weights"], "layer": spec["layer"],
            "pooling": spec["pooling"], "dataset": train_meta["info"].get("dataset"),
            "classes": train_meta["info"]["classes"]}

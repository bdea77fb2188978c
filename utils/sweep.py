"""One training run of the IIS grid, shared by the visual and text trainers: the standard probe on the features,
the sparse heads on their input, and the results.json / heads.pt they write (schema in README)."""
import os

import numpy as np
import torch

from . import store, validate
from .cli import UserError
from .heads import LinearProbes, fit, n_keep
from .store import atomic_torch_save, atomic_write_json, key_hash

RESULTS_SCHEMA = "iis.results/1"


def add_io_args(parser, concepts_flag, concepts_help):
    """--train_features, --val_features, the concept input and --out, as every trainer takes them."""
    parser.add_argument("--train_features", required=True,
                        help="store entry of backbone train features (dataset_feature_extractor)")
    parser.add_argument("--val_features", required=True, help="store entry of backbone val features")
    parser.add_argument(concepts_flag, required=True, help=concepts_help)
    parser.add_argument("--out", required=True, help="output folder for results.json and heads.pt")
    parser.add_argument("--verify", action="store_true", default=None,
                        help="also re-hash every input array and compare with the digest recorded when it was written "
                             "(default: the IIS_VERIFY environment variable; structure, finite values and labels are "
                             "always checked)")


def add_training_args(parser, default_lrs=(1e-3, 1e-2)):
    from .heads import SPARSITY_GRID
    g = parser.add_argument_group("training")
    g.add_argument("--ratios", type=float, nargs="+", default=list(SPARSITY_GRID), help="sparsity grid")
    g.add_argument("--lrs", type=float, nargs="+", default=list(default_lrs), help="learning-rate grid (Adam)")
    g.add_argument("--epochs", type=int, default=30, help="epochs; each head keeps its best-val-top-1 epoch")
    g.add_argument("--batch_size", type=int, default=256, help="training batch size")
    g.add_argument("--weight_decay", type=float, default=0.0, help="decoupled weight decay")
    g.add_argument("--seed", type=int, default=0, help="seed of initialisation, batch order and concept choice")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda if available)")
    g.add_argument("--features_on", default="auto", choices=["auto", "device", "stream"],
                   help="device: hold the features on the training device; stream: read batches from the memory-"
                        "mapped store; auto: on the device when they fit in 60%% of its free memory")
    g.add_argument("--feature_dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="precision of resident features (halves their memory; heads compute in float32)")
    return g


def grid_of(args):
    """(sorted ratios, sorted lrs, [(ratio, lr) per head]) after checking the grid makes an IIS."""
    for r in args.ratios:
        if not 0 <= r < 1:
            raise UserError(f"sparsity ratios must be in [0, 1), got {r}")
    if len(set(args.ratios)) < 2:
        raise UserError("give at least two sparsity ratios (IIS is an area under the curve over them)")
    ratios, lrs = sorted(set(args.ratios)), sorted(set(args.lrs))
    return ratios, lrs, [(r, lr) for r in ratios for lr in lrs]


def training_key(args, **inputs):
    return dict(schema=RESULTS_SCHEMA, ratios=sorted(set(args.ratios)), lrs=sorted(set(args.lrs)), epochs=args.epochs,
                feature_dtype=args.feature_dtype,
                batch_size=args.batch_size, weight_decay=args.weight_decay, seed=args.seed, **inputs)


def is_done(out, key):
    path = os.path.join(out, "results.json")
    if os.path.exists(path) and store.read_json(path).get("key_hash") == key_hash(key):
        print(f"{path} is up to date")
        return True
    return False


def load_split(path, verify=None, dim=None):
    """(features, labels, meta) of a store entry, with the checks every later step relies on (utils/validate.py):
    the entry's structure (and, with ``verify`` or IIS_VERIFY=1, its recorded digests), at least one row, ``dim``
    columns when given, finite features and labels in [0, n_classes), streamed over the memory map. Trainers call it
    before deciding whether their output is up to date, so a damaged input never passes as current."""
    arrays, meta = store.read(path, verify=verify)
    validate.check_split(path, arrays, meta, dim=dim)
    return arrays["features"], arrays["labels"], meta


def tensor(a, device):
    return torch.as_tensor(np.asarray(a), device=device)


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


def train(args, heads, grid, probe_data, head_data, n_classes, device):
    """Train the standard probes (one per lr) on ``probe_data`` and ``heads`` on ``head_data``.

    Each *_data is (x_train, y_train, x_val, y_val) tensors. Returns the results rows.
    """
    lrs = sorted(set(lr for _, lr in grid))
    common = dict(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, weight_decay=args.weight_decay)
    probes = LinearProbes(probe_data[0].shape[1], n_classes, len(lrs), args.seed).to(device)
    std = fit(probes, lrs, *probe_data, desc="standard probe", **common)
    con = fit(heads, [lr for _, lr in grid], *head_data, desc="concept heads", **common)
    k = heads.weight.shape[1]

    def row(res, h, **extra):
        return dict(extra, top1=float(res["top1"][h]), top5=float(res["top5"][h]), epoch=int(res["epoch"][h]),
                    train_loss=float(res["train_loss"][h]), val_loss=float(res["val_loss"][h]))
    runs = [row(std, h, head="standard", ratio=None, lr=lr) for h, lr in enumerate(lrs)]
    runs += [row(con, h, head="concept", ratio=r, lr=lr, n_active=n_keep(r, k)) for h, (r, lr) in enumerate(grid)]
    return runs, probes


def save(out, key, meta, grid, runs, heads, probes, extra_tensors):
    """heads.pt, then results.json (whose presence with a matching key marks the run done)."""
    ratios, lrs = sorted(set(r for r, _ in grid)), sorted(set(lr for _, lr in grid))
    os.makedirs(out, exist_ok=True)
    atomic_torch_save(os.path.join(out, "heads.pt"), {
        **extra_tensors, "ratios": torch.tensor(ratios, dtype=torch.float64),
        "lrs": torch.tensor(lrs, dtype=torch.float64), "grid": torch.tensor(grid, dtype=torch.float64),
        **{f"concept.{n}": p.detach().cpu() for n, p in heads.named_parameters()},
        **{f"standard.{n}": p.detach().cpu() for n, p in probes.named_parameters()}})
    path = os.path.join(out, "results.json")
    atomic_write_json(path, {"schema": RESULTS_SCHEMA, "key": key, "key_hash": key_hash(key), "meta": meta,
                             "sparsity_grid": ratios, "lr_grid": lrs, "runs": runs})
    best = max(r["top1"] for r in runs if r["head"] == "standard")
    print(f"standard top-1 {best:.2f}%; concept heads at s={ratios[0]}: "
          f"{max(r['top1'] for r in runs if r['ratio'] == ratios[0]):.2f}% -> {path}")


def backbone_meta(train_meta):
    spec = train_meta["info"]["backbone"]
    return {"backbone": spec["name"], "arch": spec["arch"], "weights": spec["weights"], "layer": spec["layer"],
            "pooling": spec["pooling"], "dataset": train_meta["info"].get("dataset"),
            "classes": train_meta["info"]["classes"]}

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

Partial fine-tuning (``train_layers`` N or module names): everything computed before the first trained module is fixed,
so its output (that module's input) is computed once per image view and cached; each step runs only the rest of the
network (:class:`utils.finetune.surgery.TopForward`), checked against the full forward before it is used.

Two steps: :func:`plan` checks everything and reads the data (nothing is written on bad input); :class:`FineTuner`
takes a plan and builds the whole training state in its constructor. :func:`run` chains them, resumes and publishes.
"""
import itertools
import math
import os
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..backbones import FeatureExtractor, Preprocess, build_model, load_weights, preprocess_for
from ..concepts import cluster_centres, select_prototypes
from ..data import ElementImages, get_source, subset_indices, subset_key
from ..device import resolve_device
from ..errors import UserError
from ..fileio import atomic_torch_save, atomic_write_bytes, atomic_write_json, file_digest, key_hash, read_json
from ..heads import LinearProbes
from ..masks import n_keep
from ..library import read_index
from ..specs import load_spec, weights_id
from .augment import AUG_RATIO, AUG_SCALE, AugmentedImages, batches, eval_images, loader
from .objective import LiveConceptHead, cosine, grad_scale
from .surgery import ActivationCache, TopForward, resolve_trained

SCHEMA = "iis.finetune/1"
REFRESH = ("step", "epoch", "frozen")
CONCEPT_TYPES = ("prototype", "cluster")
CHECKPOINT = "backbone.safetensors"
STATE = "state.pt"


def epoch_checkpoint(epoch):
    """The file name of the checkpoint ``--save_epochs`` writes after ``epoch`` (1-based), next to CHECKPOINT."""
    return f"backbone_epoch{int(epoch)}.safetensors"


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run, as IP_training/IP_finetune.py's flags of the same names give it (see its --help)."""
    model_config: str
    backbone: str
    weights: str
    layer: str
    pooling: str
    dataset: str
    data_root: str
    train_size: int
    val_size: int
    elements: str
    concept_type: str
    n_concepts: int
    concept_seed: int
    refresh: str
    lambda_interp: float
    ratio: float
    train_layers: list
    epochs: int
    save_epochs: list
    lr: float
    head_lr: float
    weight_decay: float
    batch_size: int
    seed: int
    aug_seed: int
    cache: str
    cache_views: int
    cache_dir: str
    device: str
    amp: bool
    workers: int
    out: str


def check(cfg):
    """Values that need nothing but themselves."""
    if not cfg.lambda_interp >= 0 or not math.isfinite(cfg.lambda_interp):
        raise UserError(f"--lambda_interp must be a finite number >= 0, got {cfg.lambda_interp}")
    if not 0.0 <= cfg.ratio < 1.0:
        raise UserError(f"--ratio must be in [0, 1), got {cfg.ratio}")
    for flag in ("n_concepts", "epochs", "batch_size"):
        if getattr(cfg, flag) < 1:
            raise UserError(f"--{flag} must be at least 1, got {getattr(cfg, flag)}")
    bad = [e for e in cfg.save_epochs if not 1 <= e <= cfg.epochs]
    if bad:
        raise UserError(f"--save_epochs takes epochs from 1 to --epochs ({cfg.epochs}), got {bad[0]}")
    for flag in ("lr", "head_lr"):
        if not getattr(cfg, flag) > 0:
            raise UserError(f"--{flag} must be positive, got {getattr(cfg, flag)}")
    if cfg.weight_decay < 0 or cfg.cache_views < 0 or cfg.train_size < 0 or cfg.val_size < 0:
        raise UserError("--weight_decay, --cache_views, --train_size and --val_size must not be negative")


# ---------------------------------------------------------------------------------------------------------------------
# The plan: everything checkable before anything is written
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """What a run will do, checked: the backbone (random init until :class:`FineTuner` loads its weights), the trained
    part, the data and element rows, and the training key that names the result."""
    cfg: FinetuneConfig
    spec: object
    model: torch.nn.Module
    extractor: FeatureExtractor
    preprocess: Preprocess
    trained: dict
    index_path: str
    elements: ElementImages
    example_shape: tuple
    device: torch.device
    train_src: object
    val_src: object
    train_idx: np.ndarray
    val_idx: np.ndarray
    concept_rows: np.ndarray         # prototype: the element rows that are the concepts; cluster: None
    element_rows: np.ndarray         # the element rows embedded (prototype: the concepts; cluster: all)
    views: int                       # augmented views per train image
    feature_dim: int
    backbone_key: dict
    data_key: dict
    key: dict


def plan(cfg):
    """Check ``cfg`` against the backbone, the element library and the data, and return the :class:`Plan`; raises
    UserError (having written nothing) otherwise."""
    check(cfg)
    spec = load_spec(cfg.model_config, cfg.backbone, cfg.weights, cfg.layer, cfg.pooling)
    index_path, index = read_index(cfg.elements)
    model = build_model(spec).eval()
    pre = preprocess_for(spec, model)
    ext = FeatureExtractor(model, spec.layer, spec.pooling, spec.layout)
    example = torch.zeros(2, 3, pre.crop, pre.crop)
    trained = resolve_trained(model, ext, list(cfg.train_layers), example)
    device = resolve_device(cfg.device)
    train_src, val_src = get_source(cfg.dataset, "train", cfg.data_root), get_source(cfg.dataset, "val", cfg.data_root)
    if train_src.classes != val_src.classes:
        raise UserError("train and val splits have different class lists")
    train_idx = subset_indices(len(train_src), cfg.train_size or None, 0)
    val_idx = subset_indices(len(val_src), cfg.val_size or None, 0)
    rows = index["elements"]
    concept_rows = None
    if cfg.concept_type == "prototype":
        concept_rows = select_prototypes(np.array([r["label"] for r in rows]), cfg.n_concepts, "balanced",
                                         cfg.concept_seed)
        element_rows = concept_rows
    else:
        if cfg.n_concepts > len(rows):
            raise UserError(f"cannot make {cfg.n_concepts} cluster concepts from {len(rows)} elements; lower "
                            f"--n_concepts")
        element_rows = np.arange(len(rows))
    with torch.no_grad():
        feature_dim = int(ext(torch.zeros(example.shape)).shape[1])
    backbone_key = dict(asdict(spec), weights=weights_id(spec), preprocess=asdict(pre))
    data_key = dict(train=subset_key(train_src, train_idx), val=subset_key(val_src, val_idx),
                    elements=file_digest(index_path))
    views = cfg.cache_views or cfg.epochs
    key = dict(schema=SCHEMA, backbone=backbone_key, data=data_key, train_params=sorted(trained["params"]),
               lambda_interp=float(cfg.lambda_interp), ratio=cfg.ratio, n_concepts=cfg.n_concepts,
               concept_type=cfg.concept_type, concept_seed=cfg.concept_seed, refresh=cfg.refresh, epochs=cfg.epochs,
               lr=cfg.lr, head_lr=cfg.head_lr, weight_decay=cfg.weight_decay, batch_size=cfg.batch_size,
               seed=cfg.seed, aug_seed=cfg.aug_seed, aug_scale=AUG_SCALE, aug_ratio=AUG_RATIO, views=views)
    return Plan(cfg=cfg, spec=spec, model=model, extractor=ext, preprocess=pre, trained=trained, index_path=index_path,
                elements=ElementImages(cfg.elements, [rows[i] for i in element_rows], pre.element_transform()),
                example_shape=tuple(example.shape), device=device, train_src=train_src, val_src=val_src,
                train_idx=train_idx, val_idx=val_idx, concept_rows=concept_rows, element_rows=element_rows,
                views=views, feature_dim=feature_dim, backbone_key=backbone_key, data_key=data_key, key=key)


# ---------------------------------------------------------------------------------------------------------------------
# The fine-tuner
# ---------------------------------------------------------------------------------------------------------------------
class FineTuner:
    """The training state of one run, built whole by the constructor from a :class:`Plan`: the backbone with its
    weights loaded and its trained part unfrozen, the activation cache (when part of the network is fixed and the
    cached path reproduces the full forward), the two heads and their optimiser, the cached or in-memory inputs, the
    cluster membership and frozen concepts. ``on_step(epoch, step)`` is called after every optimiser step."""

    def __init__(self, p, on_step=None):
        cfg, dev, tr = p.cfg, p.device, p.trained
        self.plan, self.cfg, self.device, self.on_step = p, cfg, dev, on_step
        self.model, self.ext, self.pre = p.model, p.extractor, p.preprocess
        self.lam = float(cfg.lambda_interp)
        self.amp = dev.type == "cuda" and cfg.amp
        self.n_train = len(p.train_idx)

        load_weights(self.model, p.spec)
        self.model.to(dev)
        if dev.type == "cuda":
            self.model.to(memory_format=torch.channels_last)
        names = set(tr["params"])
        for n, prm in self.model.named_parameters():
            prm.requires_grad_(n in names)
        self.model.eval()
        # cached path: only when part of the network is fixed, asked for, and it reproduces the full forward
        self.top, self.cache, self.cache_note = None, None, "off (every layer trains)" if tr["cut"] is None else "off"
        if tr["cut"] is not None and cfg.cache != "off":
            self._try_cache(tr["cut"])
        print(f"fine-tuning {sum(self.model.get_parameter(n).numel() for n in names):,} parameters "
              f"({', '.join(tr['modules'])}); lambda = {self.lam:g}; activation cache: {self.cache_note}")
        # heads: same initialisation in every arm (their own seeded generators, not the global RNG)
        n_classes = len(p.train_src.classes)
        k = len(p.concept_rows) if cfg.concept_type == "prototype" else cfg.n_concepts
        self.linear = LinearProbes(p.feature_dim, n_classes, 1, cfg.seed).to(dev)
        self.head = LiveConceptHead(k, n_classes, cfg.ratio, cfg.seed).to(dev)
        decay = [prm for n, prm in self.model.named_parameters() if n in names and prm.ndim >= 2]
        no_decay = [prm for n, prm in self.model.named_parameters() if n in names and prm.ndim < 2]
        heads = list(self.linear.parameters()) + list(self.head.parameters())
        self.opt = torch.optim.AdamW([dict(params=decay, lr=cfg.lr, weight_decay=cfg.weight_decay),
                                      dict(params=no_decay, lr=cfg.lr, weight_decay=0.0),
                                      dict(params=heads, lr=cfg.head_lr, weight_decay=0.0)], lr=cfg.lr)
        self.base_lrs = [cfg.lr, cfg.lr, cfg.head_lr]
        self.n_trained = sum(prm.numel() for prm in decay + no_decay)

        t0 = time.time()
        self.el_images = self.train_act = self.train_lab = self.val_act = self.val_lab = self.el_act = None
        self.val_loader = None
        if self.cache is None:          # every layer trains: only the element images are kept (as tensors)
            els = loader(p.elements, batches(len(p.elements), cfg.batch_size), cfg.workers, dev)
            self.el_images = torch.cat([x for x, _ in els]).to(dev)
            val = eval_images(p.val_src, p.val_idx, self.pre)
            self.val_loader = loader(val, batches(len(val), cfg.batch_size), cfg.workers, dev, persistent=True)
        else:
            self._fill_cache()
        self.cache_seconds = time.time() - t0

        # cluster membership (KMeans of the pretrained element embeddings) and the frozen concepts, if asked
        self.membership = None
        with torch.no_grad():
            e = self._element_embeddings(False) if (cfg.concept_type == "cluster" or cfg.refresh == "frozen") else None
        if cfg.concept_type == "cluster":
            centres, _ = cluster_centres(e.cpu().numpy(), cfg.n_concepts, cfg.concept_seed)
            d = torch.cdist(e.cpu().double(), torch.from_numpy(centres).double())
            self.membership = d.argmin(1)
        self.frozen = self._reduce(e).detach() if cfg.refresh == "frozen" else None

    def _try_cache(self, cut):
        p, cfg = self.plan, self.cfg
        try:
            top = TopForward(self.model, self.ext, cut, p.trained["calls"], p.trained["outputs"], p.example_shape)
            probe = torch.stack([eval_images(p.val_src, p.val_idx[:4], self.pre)[i][0]
                                 for i in range(min(4, len(p.val_idx)))]).to(self.device)
            ok = top.matches(probe)
        except ValueError:
            ok = False
        if ok:
            self.top = top
            self.cache = ActivationCache(top, cfg.cache_dir or os.path.join(cfg.out, "cache"),
                                         dict(schema=1, backbone=p.backbone_key, cut=cut), self.device, cfg.workers,
                                         cfg.batch_size)
            self.cache_note = f"inputs of {cut} cached ({p.views} augmented view(s) per train image)"
        elif cfg.cache == "on":
            raise UserError(f"the network cannot be resumed at {cut} from a cached input (the cached path "
                            f"does not reproduce the full forward); use --cache off")
        else:
            self.cache_note = f"off: resuming the network at {cut} does not reproduce the full forward"

    def _fill_cache(self):
        p, dk = self.plan, self.plan.data_key
        train = AugmentedImages(p.train_src, p.train_idx, self.pre, range(p.views), self.cfg.aug_seed)
        act, lab = self.cache.get("train", train, dict(dk["train"], views=p.views, aug_seed=self.cfg.aug_seed,
                                                       scale=AUG_SCALE, ratio=AUG_RATIO), "trunk: train views")
        self.train_act = act.view(p.views, self.n_train, *act.shape[1:])
        self.train_lab = lab[:self.n_train]
        self.val_act, self.val_lab = self.cache.get("val", eval_images(p.val_src, p.val_idx, self.pre), dk["val"],
                                                    "trunk: val")
        self.el_act, _ = self.cache.get("elements", p.elements,
                                        dict(elements=dk["elements"], rows=[int(r) for r in p.element_rows]),
                                        "trunk: elements")

    def close(self):
        """Stop the val loader's workers (the train stream's stop when it is closed)."""
        self.val_loader = None

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
        if self.cfg.concept_type == "prototype":
            return e
        k = self.cfg.n_concepts
        member = self.membership.to(e.device)
        sums = torch.zeros(k, e.shape[1], device=e.device, dtype=e.dtype).index_add(0, member, e)
        return sums / torch.bincount(member, minlength=k).clamp(min=1).unsqueeze(1).to(e.dtype)

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
        order = np.random.default_rng([self.cfg.seed, epoch]).permutation(self.n_train)
        return batches(self.n_train, self.cfg.batch_size, order)

    def train_stream(self, start):
        """(images or cached inputs, labels, cached?) for every step of epochs ``start``.. (0-based): epoch e uses
        augmented view e mod V of each image, in the batches of :meth:`_order`. Without a cache, one DataLoader
        serves the whole run (its workers start once)."""
        p, n = self.plan, self.n_train
        epochs = range(start, self.cfg.epochs)
        if self.cache is not None:
            for epoch in epochs:
                view = self.train_act[epoch % p.views]
                for b in self._order(epoch):
                    idx = torch.as_tensor(b)
                    yield view[idx].to(self.device, non_blocking=True), self.train_lab[idx].to(self.device), True
            return
        data = AugmentedImages(p.train_src, p.train_idx, self.pre, range(p.views), self.cfg.aug_seed)
        steps = [[(epoch % p.views) * n + i for i in b] for epoch in epochs for b in self._order(epoch)]
        for x, y in loader(data, steps, self.cfg.workers, self.device):
            yield self._on_device(x, False), y.to(self.device, non_blocking=True), False

    def epoch(self, epoch, stream, steps_per_epoch, total_steps):
        """Train one epoch on the next ``steps_per_epoch`` items of ``stream`` (:meth:`train_stream`); evaluate."""
        cfg, lam = self.cfg, self.lam
        t_concepts = 0.0
        concepts = None
        if cfg.refresh == "frozen":
            concepts = self.frozen
        elif cfg.refresh == "epoch":
            t = time.time()
            with torch.no_grad():
                concepts = self.concept_vectors(False)
            t_concepts += time.time() - t
        sums = torch.zeros(2, dtype=torch.float64)
        bar = tqdm(itertools.islice(stream, steps_per_epoch), total=steps_per_epoch,
                   desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", dynamic_ncols=True)
        for i, (x, y, cached) in enumerate(bar):
            step = epoch * steps_per_epoch + i
            for g, base in zip(self.opt.param_groups, self.base_lrs):
                g["lr"] = cosine(base, step, total_steps)
            f = self.features_of(x, cached)
            if cfg.refresh == "step":
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
        if cfg.refresh == "step":
            with torch.no_grad():
                concepts = self.concept_vectors(False)
        top1 = self.evaluate(concepts)
        return dict(train_loss_linear=float(sums[0] / self.n_train), train_loss_concept=float(sums[1] / self.n_train),
                    val_top1_linear=top1[0], val_top1_concept=top1[1], concept_seconds=round(t_concepts, 2))

    @torch.no_grad()
    def evaluate(self, concepts):
        self.head.set_concepts(concepts)
        hits = torch.zeros(2, dtype=torch.int64)
        if self.cache is not None:
            val = ((self.val_act[i:i + 256].to(self.device), self.val_lab[i:i + 256], True)
                   for i in range(0, len(self.val_act), 256))
        else:
            val = ((self._on_device(x, False), y, False) for x, y in self.val_loader)
        for x, y, cached in val:
            f = self.features_of(x, cached)
            y = y.to(self.device)
            hits[0] += int((self.linear(f)[0].argmax(1) == y).sum())
            hits[1] += int((self.head(f)[0].argmax(1) == y).sum())
        return [round(100.0 * int(h) / len(self.plan.val_idx), 4) for h in hits]


# ---------------------------------------------------------------------------------------------------------------------
# A whole run
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Finetuned:
    """What :func:`run` returns: finetune.json's contents and the backbone cut at its feature layer (fine-tuned, unless
    the run was already up to date) with its preprocessing."""
    info: dict
    extractor: FeatureExtractor
    preprocess: Preprocess


def save_checkpoint(path, model):
    """The full model's state dict as safetensors (what ``--weights PATH`` loads with strict key matching)."""
    from safetensors.torch import save
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, save(tensors))


def reload_check(spec, path, extractor, images, device):
    """Max |difference| between the in-memory model's features and those of a fresh model loaded from ``path``
    through the pipeline's ``--weights`` path (load_spec + load_weights), on ``images``."""
    fresh_spec = replace(spec, weights=os.path.abspath(path))
    fresh = load_weights(build_model(fresh_spec), fresh_spec).eval().to(device)
    ext2 = FeatureExtractor(fresh, spec.layer, spec.pooling, spec.layout)
    with torch.no_grad():
        a = extractor(images.to(device)).float()
        b = ext2(images.to(device)).float()
    return float((a - b).abs().max())


def run(cfg, on_step=None):
    """Fine-tune as ``cfg`` says (see IP_training/IP_finetune.py): a run already finished with the same key is left as
    it is; a killed one resumes after its last finished epoch. ``on_step(epoch, step)`` is called after every
    optimiser step (tests use it to interrupt a run). Returns a :class:`Finetuned`."""
    p = plan(cfg)
    out, key = cfg.out, p.key
    info_path, ckpt, state_path = (os.path.join(out, f) for f in ("finetune.json", CHECKPOINT, STATE))
    saved = {int(e): epoch_checkpoint(e) for e in sorted(set(cfg.save_epochs))}
    if os.path.isfile(info_path) and os.path.isfile(ckpt):
        done = read_json(info_path)
        if done.get("finished") and done.get("key_hash") == key_hash(key) and \
                all(os.path.isfile(os.path.join(out, f)) for f in saved.values()):
            print(f"{info_path} is up to date")
            return Finetuned(done, p.extractor, p.preprocess)
    os.makedirs(out, exist_ok=True)
    tuner = FineTuner(p, on_step)
    start, history = 0, []
    if os.path.isfile(state_path):
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        if st.get("key_hash") == key_hash(key):
            start, history = tuner.load_state(st["state"])
            print(f"resuming {out} after epoch {start} of {cfg.epochs}")
        else:
            print(f"{state_path} belongs to other settings; starting over")
    n = tuner.n_train
    steps = -(-n // cfg.batch_size)
    tr = p.trained
    info = dict(schema=SCHEMA, key=key, key_hash=key_hash(key), finished=False, settings=asdict(cfg),
                backbone=dict(asdict(p.spec), weights_id=p.backbone_key["weights"]),
                checkpoint=CHECKPOINT, epoch_checkpoints={str(e): f for e, f in saved.items()},
                trained=dict(train_layers=list(cfg.train_layers), modules=tr["modules"], n_params=tuner.n_trained,
                             n_param_tensors=len(tr["params"]), cut=tr["cut"], cache=tuner.cache_note),
                data=dict(dataset=p.train_src.name, classes=p.train_src.classes, n_train=n, n_val=len(p.val_idx),
                          elements=os.path.abspath(p.index_path),
                          concept_rows=[int(r) for r in p.concept_rows] if cfg.concept_type == "prototype" else None,
                          n_concepts=int(tuner.head.weight.shape[1]),
                          n_active=n_keep(cfg.ratio, int(tuner.head.weight.shape[1]))),
                device=str(p.device), epochs=history, cache_seconds=round(tuner.cache_seconds, 1))
    stream = tuner.train_stream(start)
    try:
        for epoch in range(start, cfg.epochs):
            t0 = time.time()
            row = tuner.epoch(epoch, stream, steps, steps * cfg.epochs)
            row = dict(epoch=epoch + 1, **row, seconds=round(time.time() - t0, 2))
            history.append(row)
            if epoch + 1 in saved:      # before state.pt: a run killed in between redoes this epoch and this file
                save_checkpoint(os.path.join(out, saved[epoch + 1]), tuner.model)
            print(f"epoch {epoch + 1}: train CE {row['train_loss_linear']:.4f} (linear) "
                  f"{row['train_loss_concept']:.4f} (concepts); val top-1 {row['val_top1_linear']:.2f}% (linear) "
                  f"{row['val_top1_concept']:.2f}% (concept head, s={cfg.ratio:g}); {row['seconds']:.1f} s")
            atomic_torch_save(state_path, {"key_hash": key_hash(key), "state": tuner.state(epoch + 1, history)})
            atomic_write_json(info_path, dict(info, epochs=history))
    finally:
        stream.close()                  # a train DataLoader's workers stop here, the val loader's just below
        tuner.close()
    save_checkpoint(ckpt, tuner.model)
    probe = torch.stack([eval_images(p.val_src, p.val_idx, p.preprocess)[i][0] for i in range(min(8, len(p.val_idx)))])
    diff = reload_check(p.spec, ckpt, p.extractor, probe, p.device)
    info.update(finished=True, epochs=history, reload_check=dict(images=len(probe), max_abs_diff=diff))
    atomic_write_json(info_path, info)
    if os.path.exists(state_path):
        os.remove(state_path)
    print(f"checkpoint -> {ckpt} (reloads through --weights with max feature difference {diff:.2e}); "
          f"log -> {info_path}")
    return Finetuned(info, p.extractor, p.preprocess)

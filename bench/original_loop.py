"""The original code's head training (ssfgunner/IIS at 4cf6405, IP_training/IP_Prototype_training.py with its
model.py, dataset.py and utils), re-written from its behaviour: the baseline of bench.bench_heads and the check of
``--protocol reference`` in tests/test_protocol.py.

What it reproduces, point by point (everything that affects a result or the time):

1. Dataset: built once, one dict per row holding that row's feature (a view of the loaded tensor) and its label as a
   (1,) int64 tensor made from a float tensor; each item is the pair (feature, label tensor). Building it is timed.
2. Loaders: one train DataLoader (batch 1024, shuffle, no drop_last) and one val DataLoader (batch 1024, in order),
   both with 4 worker processes as shipped (or 0), no pinned memory, workers not persistent (so every epoch starts
   fresh workers for training and again for validation); created once and shared by every module. Labels arrive
   (B, 1) and are reshaped then squeezed to (B,).
3. Modules, one after another: first the standard probe, a Linear(D, C); then one module per sparsity ratio:
   unit-norm concepts (normalised twice when built, and again in every forward), scores x . concepts^T, LayerNorm(K)
   with affine (eps 1e-5), every |activation| not strictly above the int(K * s)-th smallest (a full sort per row,
   detached) zeroed, then Linear(K, C). Every Linear starts as trunc_normal(std 0.02) weights (the cut at +-2 is an
   absolute bound, i.e. none at this std) and zero bias, LayerNorm as gain 1 and bias 0; nn.Linear's own default
   init runs first and draws from the RNG, as in the original.
4. The zeroing is written as the original computes it, through autograd: gate = max(d, d - d) with d = |a| - t,
   then 1 where the gate is non-zero. Its value is the strict mask, but at the threshold element itself (d = 0)
   torch's max passes half of the gradient, so that element's LayerNorm gain and bias receive 0.5 |a| times its
   upstream gradient although it is dropped. Kept here because it changes the heads' training.
5. Training: Adam (lr 1e-2, no weight decay, torch's defaults), ExponentialLR(0.99) stepped once per epoch, 30
   epochs, mean cross-entropy from a fresh nn.CrossEntropyLoss per step, loss.item() every step.
6. Validation every epoch, without torch.no_grad (as the original: an autograd graph is built and dropped): softmax
   of the logits, gathered on the CPU, converted to NumPy, top-1 and top-5 each from its own full np.argsort of the
   scores (so ties are broken as NumPy's sort breaks them). A module keeps its best val top-1 (strict improvement over
   the previous best, starting from 0) and the top-5 of that epoch; its state_dict is saved with the accuracies in
   the file name (into ``save_dir`` when given, as the original writes one file per module).
7. Reported numbers: each ratio's best val top-1 and the standard probe's best val top-1, trapezoid IIS over the
   sorted ratios (iis_computing.py; with one lr its max-over-lrs is that lr's value).

What it cannot reproduce:

* The RNG stream of a real run: the original sets no seed, so each of its runs starts from different weights and
  batch orders. Here ``seed`` seeds torch's global generator once before anything is built (default 0), so a run is
  repeatable; weights and orders are then drawn in the original's sequence (module init, one shuffle seed and one
  loader base seed per epoch and per loader), but not bit-equal to any particular run of the original.
* Its surroundings: features and labels arrive as arrays instead of torch.load of its .pt files and ImageFolder's
  targets, and the device is a parameter (the original hard-codes 'cuda'; the CPU is what bench_heads measures). Its
  soft_threshold calls an undefined ``ch`` (torch under another name), which a run must patch; the shipped script
  trains only s = 0.7 (its full grid and lr list are commented out): ``run`` takes the ratios and the lr. Its
  optimiser is today's torch Adam (its implementation choice, e.g. foreach, is torch's default for the device).

Two optional hooks exist only so that a test can isolate the arithmetic from the randomness: ``orders`` (the batch
order of every epoch, replayed for every module) and ``init`` (every module's initial parameters). The benchmark uses
neither.
"""
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

WORKERS_AS_SHIPPED = 4


class RowDataset(Dataset):
    """One dict per row, built up front; an item is (feature row, (1,) int64 label)."""

    def __init__(self, features, labels):
        features = torch.as_tensor(features)
        self.items = [{"data": features[i], "label": torch.tensor([float(lab)]).long()}
                      for i, lab in enumerate(np.asarray(labels).tolist())]

    def __getitem__(self, i):
        item = self.items[i]
        return item["data"], item["label"]

    def __len__(self):
        return len(self.items)


def _init_like_original(module):
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)   # same draw as timm's trunc_normal_ (a=-2, b=2)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _cross_entropy(logits, labels):
    return nn.CrossEntropyLoss()(logits, labels)


class StandardProbe(nn.Module):
    def __init__(self, dim, n_classes):
        super().__init__()
        self.fc = nn.Linear(dim, n_classes)
        _init_like_original(self)

    def forward(self, x, labels=None):
        out = self.fc(x)
        return out, (None if labels is None else _cross_entropy(out, labels))


class PrototypeHead(nn.Module):
    def __init__(self, concepts, n_classes, ratio):
        super().__init__()
        c = F.normalize(torch.as_tensor(concepts).float(), dim=-1)
        # a frozen Parameter (not a buffer), as the original: it is in parameters() and so in Adam's list
        self.concepts = nn.Parameter(F.normalize(c, dim=-1), requires_grad=False)
        k = len(c)
        self.threshold_rank = int(k * ratio)   # truncation of the float product, as the original
        self.ln = nn.LayerNorm(k)
        self.fc = nn.Linear(k, n_classes)
        _init_like_original(self)

    def forward(self, x, labels=None):
        a = self.ln(x @ F.normalize(self.concepts, dim=-1).T)
        out = self.fc(zero_to_threshold(a, a.detach().abs().sort(dim=-1).values[:, self.threshold_rank, None]))
        return out, (None if labels is None else _cross_entropy(out, labels))


def zero_to_threshold(a, threshold):
    """``a`` with every |a| not above ``threshold`` (detached, one per row) zeroed, through autograd as the original
    does it (point 4 of the module docstring)."""
    d = a.abs() - threshold
    gate = torch.maximum(d, d - d)
    return a * torch.where(gate != 0, torch.ones_like(gate), gate)


def top_k_accuracies(scores, labels, ks=(1, 5)):
    """Fractions of rows whose label is among the k highest scores, one full argsort per k (as the original)."""
    labels = np.asarray(labels)[:, None]
    out = []
    for k in ks:
        best = np.argsort(scores, axis=1)[:, -k:][:, ::-1]
        out.append((best == labels).any(axis=1).sum() / len(labels))
    return out


class _Orders:
    """A batch sampler replaying given per-epoch permutations (test hook)."""

    def __init__(self, orders, batch_size):
        self.orders, self.batch_size, self.epoch = orders, batch_size, 0

    def __iter__(self):
        perm = self.orders[self.epoch]
        self.epoch += 1
        for i in range(0, len(perm), self.batch_size):
            yield [int(j) for j in perm[i:i + self.batch_size]]

    def __len__(self):
        return -(-len(self.orders[0]) // self.batch_size)


def train_module(model, train_loader, val_loader, epochs, lr, gamma=0.99, device="cpu"):
    """(best mean train loss, best val top-1, its top-5), fractions, the original's way."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma, last_epoch=-1)
    best_loss, best_top1, best_top5 = 9999, 0, 0
    for _ in range(epochs):
        losses = []
        model.train()
        for x, y in train_loader:
            x, y = x.to(device), y.to(device).reshape(-1, 1).squeeze()
            optimizer.zero_grad()
            _, loss = model(x, y)
            loss.backward()
            losses.append(loss.item())
            optimizer.step()
        scheduler.step()
        best_loss = min(sum(losses) / len(losses), best_loss)
        model.eval()
        probs, labels = [], []
        for x, y in val_loader:      # no torch.no_grad(), as the original
            out, _ = model(x.to(device))
            probs.append(out.softmax(-1).detach().cpu())
            labels.append(y.to(device).reshape(-1, 1).cpu())
        top1, top5 = top_k_accuracies(np.array(torch.cat(probs)), np.array(torch.cat(labels)).squeeze())
        if best_top1 < top1:
            best_top1, best_top5 = top1, top5
    return best_loss, best_top1, best_top5


def run(x_train, y_train, x_val, y_val, concepts, n_classes, ratios, epochs=30, lr=1e-2, batch_size=1024,
        workers=WORKERS_AS_SHIPPED, seed=0, device="cpu", save_dir=None, orders=None, init=None):
    """(standard top-1, [top-1 per ratio]) in percent, as the original code computes them.

    ``seed``: torch's global seed, set once first (None: leave the generator as it is, like the original).
    ``init``: optional {"probe": (weight, bias), "head": (ln_weight, ln_bias, weight, bias)} in nn.Linear's layout,
    copied into every module after its own initialisation (test hook, like ``orders``).
    """
    if seed is not None:
        torch.manual_seed(seed)
    train_set, val_set = RowDataset(x_train, y_train), RowDataset(x_val, y_val)
    if orders is None:
        train_loader = DataLoader(train_set, batch_size=batch_size, num_workers=workers, shuffle=True)
    else:
        train_loader = DataLoader(train_set, batch_sampler=_Orders(orders, batch_size), num_workers=workers)
    val_loader = DataLoader(val_set, batch_size=batch_size, num_workers=workers, shuffle=False)

    def fit(model, name, init_values):
        if init_values is not None:
            with torch.no_grad():
                for p, v in zip([p for p in model.parameters() if p.requires_grad], init_values):
                    p.copy_(v)
        if orders is not None:
            train_loader.batch_sampler.epoch = 0    # every module replays the same epochs
        loss, top1, top5 = train_module(model.to(device), train_loader, val_loader, epochs, lr, device=device)
        if save_dir is not None:
            torch.save(model.state_dict(), os.path.join(save_dir, f"{name}##{lr}##{loss}##{top1}##{top5}.pth"))
        return 100.0 * top1

    standard = fit(StandardProbe(np.shape(x_train)[1], n_classes), "standard", init and init["probe"])
    accs = [fit(PrototypeHead(concepts, n_classes, r), f"{len(concepts)}##{r}", init and init["head"])
            for r in ratios]
    return standard, accs

"""A faithful re-implementation of the original code's head training loop: the baseline of bench.bench_heads and the
check of ``--protocol reference`` in tests/test_protocol.py.

What it does, as the original does: a per-sample Dataset returning a dict per row, a torch DataLoader (batch 1024,
shuffled, 4 worker processes as shipped), one module per sparsity ratio (LayerNorm of the activations on normalised
concepts, every |activation| at or below the floor(K*s)-th smallest zeroed, a linear layer), the standard probe as a
plain linear layer trained the same way, Adam at lr 1e-2 with ExponentialLR(0.99) stepped once per epoch, 30 epochs,
validation logits gathered into NumPy, and each head's best val top-1 over the epochs.

Two optional hooks exist only so that a test can isolate the arithmetic from the randomness: ``orders`` (the batch
order of every epoch) and ``init`` (the initial parameters). The benchmark uses neither.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset


class FeatureDataset(Dataset):
    def __init__(self, features, labels):
        self.features, self.labels = features, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"feature": torch.as_tensor(self.features[i]), "label": int(self.labels[i])}


class PrototypeHead(nn.Module):
    def __init__(self, concepts, n_classes, ratio):
        super().__init__()
        self.register_buffer("concepts", F.normalize(torch.as_tensor(concepts).float(), dim=1))
        self.n_concepts = len(concepts)
        self.n_drop = int(math.floor(self.n_concepts * ratio + 1e-9))
        self.ln = nn.LayerNorm(self.n_concepts)
        self.fc = nn.Linear(self.n_concepts, n_classes)

    def forward(self, x):
        a = self.ln(x @ self.concepts.T)
        threshold = a.abs().sort(dim=1).values[:, self.n_drop:self.n_drop + 1]
        return self.fc(a * (a.abs() > threshold).float())


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


def train_head(model, train_set, val_set, epochs=30, lr=1e-2, gamma=0.99, batch_size=1024, workers=4,
               orders=None, device="cpu"):
    """Best val top-1 (%) over the epochs of one head, the original's way."""
    model = model.to(device)
    if orders is None:
        train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=workers)
    else:
        train_loader = DataLoader(train_set, batch_sampler=_Orders(orders, batch_size), num_workers=workers)
    val_loader = DataLoader(val_set, batch_size=batch_size, shuffle=False, num_workers=workers)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma)
    best = 0.0
    for _ in range(epochs):
        model.train()
        for batch in train_loader:
            logits = model(batch["feature"].to(device).float())
            loss = F.cross_entropy(logits, batch["label"].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
        model.eval()
        preds, labels = [], []
        with torch.no_grad():
            for batch in val_loader:
                preds.append(model(batch["feature"].to(device).float()).cpu().numpy())
                labels.append(batch["label"].numpy())
        acc = 100.0 * np.mean(np.concatenate(preds).argmax(1) == np.concatenate(labels))
        best = max(best, float(acc))
    return best


def run(x_train, y_train, x_val, y_val, concepts, n_classes, ratios, epochs=30, lr=1e-2, batch_size=1024,
        workers=4, orders=None, init=None, device="cpu"):
    """(standard top-1, [top-1 per ratio]) as the original code computes them, one module after another.

    ``init``: optional {"probe": (weight, bias), "head": (ln_weight, ln_bias, weight, bias)} in nn.Linear's layout.
    """
    train_set, val_set = FeatureDataset(x_train, y_train), FeatureDataset(x_val, y_val)
    probe = nn.Linear(x_train.shape[1], n_classes)
    if init:
        with torch.no_grad():
            probe.weight.copy_(init["probe"][0])
            probe.bias.copy_(init["probe"][1])
    common = dict(epochs=epochs, lr=lr, batch_size=batch_size, workers=workers, orders=orders, device=device)
    standard = train_head(probe, train_set, val_set, **common)
    accs = []
    for r in ratios:
        head = PrototypeHead(concepts, n_classes, r)
        if init:
            with torch.no_grad():
                for p, v in zip((head.ln.weight, head.ln.bias, head.fc.weight, head.fc.bias), init["head"]):
                    p.copy_(v)
        if orders is not None:
            common["orders"] = orders   # each head replays the same epochs
        accs.append(train_head(head, train_set, val_set, **common))
    return standard, accs

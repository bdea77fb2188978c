"""Sparse concept heads and the linear probe, trained many at once on features resident in memory.

A *sweep* is H independent heads that share one input: a grid of sparsity ratios x learning rates. Their parameters
are stacked along a leading head axis, one batch order is shared, and each head's loss only reaches its own
parameters, so training them together gives what training each alone would (tests check this), at the cost of one.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

SPARSITY_GRID = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.98)


def n_keep(ratio, n_concepts):
    """Concepts a sample keeps at sparsity ``ratio``: round((1 - ratio) * K), at least one.

    Rounding (not truncation) matters: (1 - 0.9) * 200 is 19.999999999999996 in floating point.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"sparsity ratio must be in [0, 1), got {ratio}")
    return max(1, int(round((1.0 - ratio) * n_concepts)))


def ranks(a):
    """Rank of each entry of ``a`` within its row by absolute value, 0 = largest (ties: lower index first)."""
    order = a.abs().argsort(dim=-1, descending=True, stable=True)
    return torch.empty_like(order).scatter_(-1, order, torch.arange(a.shape[-1], device=a.device).expand_as(order))


def _keep_k(x, k):
    """Mask of each row's k largest entries of ``x`` (non-negative), exactly k per row."""
    n = x.shape[-1]
    if k >= n:
        return torch.ones_like(x, dtype=torch.bool)
    if k <= n // 2:
        return torch.zeros_like(x, dtype=torch.bool).scatter_(-1, x.topk(k, dim=-1).indices, True)
    # selecting the n - k smallest is cheaper than the k largest when k is large
    return torch.ones_like(x, dtype=torch.bool).scatter_(-1, x.topk(n - k, dim=-1, largest=False).indices, False)


def topk_mask(a, keep):
    """Boolean mask of each row's ``keep`` largest entries of ``a`` by absolute value; exactly ``keep`` per row.

    ``keep`` is an int, or a sequence of H ints (one per head) for ``a`` of shape (H or 1, N, K). With one shared
    activation matrix (leading size 1) a single sort serves every head; with per-head activations each head takes a
    partial top-k, which on CPU is several times cheaper than sorting. Plain ints (not a device tensor) keep the GPU
    free of host synchronisations.
    """
    if isinstance(keep, int):
        return _keep_k(a.abs(), keep)
    keep = [int(k) for k in keep]
    if a.shape[0] == 1:
        return ranks(a) < torch.tensor(keep, device=a.device).view(-1, 1, 1)
    mags = a.abs()
    return torch.stack([_keep_k(mags[h], k) for h, k in enumerate(keep)])


def with_ranks(a):
    """Fixed activations (N, K) with their per-row ranks appended, (N, 2K): the input :class:`MaskedLinearHeads`
    takes with ``ranked=True``, so masks are computed once for the whole dataset instead of at every step."""
    return torch.cat([a.float(), ranks(a).float()], dim=1)


def _init_linear(n_in, n_out, n_heads, seed):
    """The same initial weights for every head (so a head's result does not depend on its place in the sweep)."""
    g = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(n_in)
    w = (torch.rand(n_in, n_out, generator=g) * 2 - 1) * bound
    b = (torch.rand(n_out, generator=g) * 2 - 1) * bound
    return nn.Parameter(w.expand(n_heads, -1, -1).clone()), nn.Parameter(b.expand(n_heads, -1).clone())


class MaskedLinearHeads(nn.Module):
    """H linear heads on given concept activations (N, K): each sample keeps its top-k activations by absolute value
    (k from the head's sparsity ratio), the rest are zeroed. The text path feeds standardised activations here, with
    ``ranked=True`` and inputs from :func:`with_ranks`, since its activations never change during training."""

    def __init__(self, n_concepts, n_classes, ratios, seed=0, ranked=False):
        super().__init__()
        self.keep_list = [n_keep(r, n_concepts) for r in ratios]
        self.register_buffer("keep", torch.tensor(self.keep_list))
        self.weight, self.bias = _init_linear(n_concepts, n_classes, len(ratios), seed)
        self.ranked = ranked

    def activations(self, a):
        """(1, N, K): the same activations for every head."""
        return a.float().unsqueeze(0)

    def masked_activations(self, x):
        """(H, N, K) activations with all but each sample's top-k zeroed (the heads' linear input)."""
        if self.ranked:
            k = self.weight.shape[1]
            return x[:, :k].unsqueeze(0) * (x[:, k:].unsqueeze(0) < self.keep[:, None, None])
        a = self.activations(x)
        return a * topk_mask(a, self.keep_list)

    def forward(self, x):
        a = self.masked_activations(x)
        return torch.baddbmm(self.bias.unsqueeze(1), a.expand(len(self.keep), -1, -1), self.weight)


class _SparseHeads(MaskedLinearHeads):
    """H heads: activations = LayerNorm(x . unit concepts), keep each sample's top-k by |activation|, then linear.

    Subclasses say where the concepts come from (:meth:`concept_matrix`).
    """

    def __init__(self, n_concepts, n_classes, ratios, seed=0):
        super().__init__(n_concepts, n_classes, ratios, seed)
        self.ln_weight = nn.Parameter(torch.ones(len(ratios), n_concepts))
        self.ln_bias = nn.Parameter(torch.zeros(len(ratios), n_concepts))

    def concept_matrix(self):
        """Unit-norm concept vectors: (K, D) shared by every head, or (H, K, D) one set per head."""
        raise NotImplementedError

    def activations(self, x):
        """(H, N, K) concept activations after each head's LayerNorm, before masking."""
        c = self.concept_matrix()
        s = (x.float() @ c.T).unsqueeze(0) if c.ndim == 2 else torch.einsum("nd,hkd->hnk", x.float(), c)
        s = F.layer_norm(s, s.shape[-1:])
        return s * self.ln_weight.unsqueeze(1) + self.ln_bias.unsqueeze(1)


class SparseConceptHeads(_SparseHeads):
    """Sparse heads over fixed concept vectors (Prototype or Cluster concepts).

    Parameters
    ----------
    concepts : (K, D) tensor, concept vectors (normalised here)
    n_classes : int
    ratios : sequence of H sparsity ratios, one per head
    """

    def __init__(self, concepts, n_classes, ratios, seed=0):
        super().__init__(concepts.shape[0], n_classes, ratios, seed)
        self.register_buffer("concepts", F.normalize(concepts.float(), dim=-1))

    def concept_matrix(self):
        return self.concepts


class End2EndConceptHeads(_SparseHeads):
    """Sparse heads whose concepts are learnt jointly: each head assigns every candidate element to one concept.

    Each head has assignment logits (E, K) over the E candidate element embeddings. A LayerNorm over K (affine, one
    gain/bias per head and concept) and a hard Gumbel-softmax (tau = 0.1) make each element's assignment exactly
    one-hot in the forward pass; the gradient is the soft sample's (straight-through). Concept k = normalised sum of the
    elements assigned to it. In eval mode the assignment is the noise-free argmax, so validation is deterministic.

    Why the gain starts above 1: a hard Gumbel sample picks concept k with probability softmax(z)_k whatever tau is,
    and unit-variance logits over 200 concepts make that nearly uniform, i.e. concepts of random elements. The logits
    start as cosine similarities to K seed elements (so training starts from a partition of the elements around
    seeds), and ``gain`` sets how sharply.

    Parameters
    ----------
    elements : (E, D) candidate element embeddings
    seeds : (K,) rows of ``elements`` that start one concept each
    """

    def __init__(self, elements, seeds, n_classes, ratios, seed=0, tau=0.1, gain=5.0):
        seeds = torch.as_tensor(seeds)
        k = len(seeds)
        super().__init__(k, n_classes, ratios, seed)
        self.register_buffer("elements", elements.float())
        self.tau = tau
        unit = F.normalize(self.elements, dim=1)
        sim = unit @ unit[seeds].T
        self.assign_logits = nn.Parameter(sim.expand(len(ratios), -1, -1).clone())
        self.assign_gain = nn.Parameter(torch.full((len(ratios), 1, k), float(gain)))
        self.assign_bias = nn.Parameter(torch.zeros(len(ratios), 1, k))

    def assignment(self):
        """(H, E, K) one-hot assignment of elements to concepts."""
        z = F.layer_norm(self.assign_logits, self.assign_logits.shape[-1:]) * self.assign_gain + self.assign_bias
        if self.training:
            return F.gumbel_softmax(z, tau=self.tau, hard=True, dim=-1)
        return F.one_hot(z.argmax(-1), z.shape[-1]).to(z.dtype)

    def concept_matrix(self):
        return F.normalize(torch.einsum("hek,ed->hkd", self.assignment(), self.elements), dim=-1)


class LinearProbes(nn.Module):
    """H plain linear classifiers on the raw features (the standard accuracy)."""

    def __init__(self, dim, n_classes, n_heads, seed=0):
        super().__init__()
        self.weight, self.bias = _init_linear(dim, n_classes, n_heads, seed)

    def forward(self, x):
        return torch.matmul(x.float(), self.weight) + self.bias.unsqueeze(1)


class _Adam:
    """Adam over head-stacked parameters with one learning rate per head (torch's Adam takes one per tensor)."""

    def __init__(self, params, lrs, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self.params, self.lrs, self.betas, self.eps, self.wd = list(params), lrs, betas, eps, weight_decay
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    @torch.no_grad()
    def step(self, grads):
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            lr = self.lrs.view(-1, *([1] * (p.ndim - 1)))
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            if self.wd:
                p.mul_(1 - lr * self.wd)
            p.sub_(lr * (m / c1) / ((v / c2).sqrt() + self.eps))


def rows(x, idx, device):
    """Rows ``idx`` (sorted 1-D tensor) of features held as a tensor (resident) or a NumPy memory map (streamed),
    on ``device`` as float32."""
    if torch.is_tensor(x):
        return x[idx.to(x.device)].to(device, non_blocking=True).float()
    return torch.from_numpy(np.asarray(x[idx.cpu().numpy()], dtype=np.float32)).to(device, non_blocking=True)


def _device_of(module):
    return next(module.parameters()).device


@torch.no_grad()
def evaluate(module, x, y, chunk=4096):
    """Per-head top-1, top-5 (percent) and mean cross-entropy on (x, y), in chunks."""
    n = len(y)
    was_training = module.training
    module.eval()
    top1 = top5 = loss = 0
    for i in range(0, n, chunk):
        logits = module(rows(x, torch.arange(i, min(i + chunk, n)), _device_of(module)))
        yy = y[i:i + chunk].to(logits.device)
        h, b, c = logits.shape
        loss = loss + F.cross_entropy(logits.reshape(h * b, c), yy.repeat(h), reduction="none").view(h, b).sum(1)
        top = logits.topk(min(5, c), dim=-1).indices
        hit = top == yy.view(1, -1, 1)
        top1 = top1 + hit[..., 0].sum(1)
        top5 = top5 + hit.any(-1).sum(1)
    module.train(was_training)
    return (100.0 * top1.double() / n).cpu().numpy(), (100.0 * top5.double() / n).cpu().numpy(), \
        (loss.double() / n).cpu().numpy()


def fit(module, lrs, x_train, y_train, x_val, y_val, epochs=30, batch_size=256, seed=0, weight_decay=0.0,
        desc="heads"):
    """Train every head of ``module`` together; keep each head's parameters from its best val-top-1 epoch.

    Features are tensors (resident, on any device, any float dtype) or NumPy memory maps (streamed batch by batch);
    labels are tensors. Each batch's rows are taken in sorted order (reads from a memory map stay sequential-ish; the
    loss is a mean, so the order inside a batch does not matter). Returns a dict of per-head arrays: top1, top5,
    epoch (1-based, the one kept), train_loss, val_loss.
    """
    device = _device_of(module)
    lrs = torch.as_tensor(lrs, dtype=torch.float32, device=device)
    params = list(module.parameters())
    opt = _Adam(params, lrs, weight_decay=weight_decay)
    n_heads = len(lrs)
    best = {k: np.full(n_heads, -np.inf if k == "top1" else np.nan) for k in
            ("top1", "top5", "epoch", "train_loss", "val_loss")}
    best_params = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(seed)
    n = len(y_train)
    bar = tqdm(range(1, epochs + 1), desc=desc, unit="epoch", dynamic_ncols=True)
    for epoch in bar:
        module.train()
        perm = torch.randperm(n, generator=g)
        loss_sum = torch.zeros(n_heads, device=device, dtype=torch.float64)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size].sort().values
            logits = module(rows(x_train, idx, device))
            h, b, c = logits.shape
            yb = y_train[idx.to(y_train.device)].to(device)
            loss = F.cross_entropy(logits.reshape(h * b, c), yb.repeat(h), reduction="none").view(h, b)
            loss = loss.mean(1)
            opt.step(torch.autograd.grad(loss.sum(), params))
            loss_sum += loss.detach().double() * b
        top1, top5, vloss = evaluate(module, x_val, y_val)
        better = top1 > best["top1"]
        for k, v in (("top1", top1), ("top5", top5), ("val_loss", vloss),
                     ("train_loss", (loss_sum / n).cpu().numpy()), ("epoch", np.full(n_heads, epoch))):
            best[k][better] = v[better]
        mask = torch.as_tensor(better, device=device)
        for p, bp in zip(params, best_params):
            bp[mask] = p.detach()[mask]
        bar.set_postfix(best_top1=f"{best['top1'].max():.1f}", refresh=False)
    with torch.no_grad():
        for p, bp in zip(params, best_params):
            p.copy_(bp)
    return best

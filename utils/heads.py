"""Sparse concept heads and the linear probe, trained many at once.

A *sweep* is H independent heads: a grid of sparsity ratios x learning rates, repeated once per seed. Their parameters
are stacked along a leading head axis and each head's loss only reaches its own parameters, so training them
together gives what training each alone would (tests check this), at the cost of one.

Heads are grouped: head h reads the input of group ``groups[h]``. A group is one seed's view of the data (its own
concept vectors, batch order, and, with a held-out split, its own training rows); inputs therefore arrive as
(G, B, F), or (1, B, F) when every group sees the same rows (validation).
"""
import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

SPARSITY_GRID = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.98)
KEEP_RULES = ("round", "reference")


def n_keep(ratio, n_concepts):
    """Concepts a sample keeps at sparsity ``ratio``: round((1 - ratio) * K), at least one.

    Rounding (not truncation) matters: (1 - 0.9) * 200 is 19.999999999999996 in floating point.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"sparsity ratio must be in [0, 1), got {ratio}")
    return max(1, int(round((1.0 - ratio) * n_concepts)))


def n_keep_reference(ratio, n_concepts):
    """What the original code keeps: every activation strictly above the int(K * ratio)-th smallest, i.e.
    K - int(K * ratio) - 1 concepts (199, 179, 139, 99, 59, 19, 9, 3 of 200 on the grid).

    int() of the floating-point product, as the original truncates it: 90 * 0.7 is 62.99999999999999, so 90 concepts
    at s = 0.7 keep 27, not 26."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"sparsity ratio must be in [0, 1), got {ratio}")
    return max(0, n_concepts - int(n_concepts * ratio) - 1)


def keep_counts(ratios, n_concepts, rule="round"):
    if rule not in KEEP_RULES:
        raise ValueError(f"keep rule must be one of {KEEP_RULES}, not {rule!r}")
    f = n_keep if rule == "round" else n_keep_reference
    return [f(r, n_concepts) for r in ratios]


def ranks(a):
    """Rank of each entry of ``a`` within its row by absolute value, 0 = largest (ties: lower index first)."""
    order = a.abs().argsort(dim=-1, descending=True, stable=True)
    return torch.empty_like(order).scatter_(-1, order, torch.arange(a.shape[-1], device=a.device).expand_as(order))


_POOL = {}


def _np_mask(a, k, rule):
    """One head's mask of rows ``a`` (N, K), by absolute value."""
    a = np.abs(a)
    k_all = a.shape[-1]
    if k >= k_all or k <= 0:
        return np.full(a.shape, k > 0)
    if rule == "reference":   # strictly above the (K - k - 1)-th smallest, as the original thresholds
        j = k_all - k - 1
        return a > np.partition(a, j, axis=-1)[:, j:j + 1]
    j = k_all - k             # at or above the k-th largest: exactly k per row unless values tie there
    m = a >= np.partition(a, j, axis=-1)[:, j:j + 1]
    for r in np.flatnonzero(m.sum(1) != k):   # ties: keep the lower indices, as a stable sort would
        m[r] = False
        m[r, np.argsort(-a[r], kind="stable")[:k]] = True
    return m


def _np_masks(a, keep, rule):
    """CPU masks with NumPy's introselect (np.partition): for K = 200 several times faster per row than torch.topk or
    a sort (bench/bench_topk.py). NumPy releases the GIL while it partitions, so large blocks are split over torch's
    number of threads (heads x row blocks); each piece is computed alone, so the result is the same for any count."""
    threads = torch.get_num_threads()
    n = a.shape[1]
    step = max(1024, -(-n * len(keep) // threads))   # rows per piece: threads pieces in all, none tiny
    pieces = [(h, i) for h in range(len(keep)) for i in range(0, n, step)]
    if threads == 1 or len(pieces) == 1:
        return torch.from_numpy(np.stack([_np_mask(a[h], k, rule) for h, k in enumerate(keep)]))
    if threads not in _POOL:
        from concurrent.futures import ThreadPoolExecutor
        _POOL[threads] = ThreadPoolExecutor(threads, thread_name_prefix="topk")
    out = np.empty(a.shape, dtype=bool)

    def work(piece):
        h, i = piece
        out[h, i:i + step] = _np_mask(a[h, i:i + step], keep[h], rule)
    list(_POOL[threads].map(work, pieces))
    return torch.from_numpy(out)


def topk_mask(a, keep, rule="round"):
    """Boolean mask of the activations each row keeps, by absolute value.

    ``a`` is (N, K) with an int ``keep``, or (H, N, K) with H ints (one per head). rule 'round': exactly ``keep`` per
    row, the largest (ties broken towards the lower index, as a stable sort would); rule 'reference': the original
    code's strict threshold, every |a| above the (K - keep - 1)-th smallest, which keeps ``keep`` per row unless
    values tie at the threshold.
    """
    if isinstance(keep, int):
        return topk_mask(a.unsqueeze(0), [keep], rule)[0]
    keep = [int(k) for k in keep]
    with torch.no_grad():
        if a.device.type == "cpu":
            return _np_masks(a.detach().float().numpy(), keep, rule)
        mags = a.detach().abs().float()
        if rule == "reference":   # one batched sort gives every head's threshold, no host synchronisation
            j = torch.as_tensor([min(mags.shape[-1] - 1, mags.shape[-1] - k - 1) for k in keep], device=a.device)
            return mags > mags.sort(dim=-1).values.gather(-1, j.view(-1, 1, 1).expand(-1, mags.shape[1], 1))
        return ranks(mags) < torch.as_tensor(keep, device=a.device).view(-1, 1, 1)


class _ThresholdGradient(torch.autograd.Function):
    """``a * mask`` in value, ``factor`` times the upstream gradient in the backward pass."""

    @staticmethod
    def forward(ctx, a, mask, factor):
        ctx.save_for_backward(factor)
        return a * mask

    @staticmethod
    def backward(ctx, grad):
        (factor,) = ctx.saved_tensors
        return grad * factor, None, None


def masked(a, mask, rule="round"):
    """``a * mask``. Under the 'reference' rule, with the original code's gradient as well: it zeroes through
    max(d, d - d) with d = |a| - threshold, and torch's max splits the gradient at a tie, so every element at the
    threshold (dropped, d = 0) passes 0.5 |a| times its upstream gradient back to ``a`` (into the LayerNorm's gain and
    bias); the others pass theirs times the mask."""
    if rule != "reference" or not a.requires_grad:
        return a * mask
    mags = a.detach().abs()
    threshold = torch.where(mask, 0.0, mags).amax(-1, keepdim=True)   # the largest dropped |a|; kept ones are above
    factor = torch.where(mags == threshold, 0.5 * mags, mask.to(mags.dtype))
    return _ThresholdGradient.apply(a, mask, factor)


def with_ranks(a):
    """Fixed activations (N, K) with their per-row ranks appended, (N, 2K): the input :class:`MaskedLinearHeads`
    takes with ``ranked=True``, so masks are computed once for the whole dataset instead of at every step."""
    return torch.cat([a.float(), ranks(a).float()], dim=1)


INITS = ("uniform", "trunc_normal_0.02")


def _init_linear(n_in, n_out, seeds, init="uniform"):
    """Initial weights per head from that head's seed: heads of one seed start equal (so a head's result does not
    depend on its place in the sweep), and a seed starts the same whatever else is in the sweep.

    ``init`` 'uniform': nn.Linear's default, weight and bias U(+-1/sqrt(n_in)); 'trunc_normal_0.02': the original
    code's (timm's trunc_normal_ on every nn.Linear), weight N(0, 0.02^2) truncated at +-2 (an absolute bound, so in
    effect none) and bias 0, so that ``--protocol reference`` starts from the original's distribution."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, not {init!r}")
    bound = 1.0 / math.sqrt(n_in)
    w, b = torch.empty(len(seeds), n_in, n_out), torch.empty(len(seeds), n_out)
    for s in sorted(set(seeds)):
        g = torch.Generator().manual_seed(int(s))
        if init == "uniform":
            ws = (torch.rand(n_in, n_out, generator=g) * 2 - 1) * bound
            bs = (torch.rand(n_out, generator=g) * 2 - 1) * bound
        else:
            ws = nn.init.trunc_normal_(torch.empty(n_in, n_out), std=0.02, generator=g)
            bs = torch.zeros(n_out)
        for h, sh in enumerate(seeds):
            if sh == s:
                w[h], b[h] = ws, bs
    return nn.Parameter(w), nn.Parameter(b)


def _head_seeds(seed, n_heads):
    return [int(seed)] * n_heads if np.ndim(seed) == 0 else [int(s) for s in seed]


class _Grouped(nn.Module):
    """H heads, head h reading group ``groups[h]`` of a (G, B, F) input; (1, B, F) or (B, F) is shared by all."""

    def _set_groups(self, n_heads, groups):
        g = torch.zeros(n_heads, dtype=torch.long) if groups is None else torch.as_tensor(groups, dtype=torch.long)
        if g.shape != (n_heads,):
            raise ValueError(f"groups must give one group per head ({n_heads}), got shape {tuple(g.shape)}")
        self.register_buffer("groups", g)

    def per_head(self, x):
        """(H, B, F) view of the input each head reads."""
        if x.ndim == 2:
            x = x.unsqueeze(0)
        if x.shape[0] == 1:
            return x.expand(len(self.groups), -1, -1)
        return x[self.groups]


class MaskedLinearHeads(_Grouped):
    """H linear heads on given concept activations (N, K): each sample keeps its top-k activations by absolute value
    (k from the head's sparsity ratio), the rest are zeroed. The text path feeds standardised activations here, with
    ``ranked=True`` and inputs from :func:`with_ranks`, since its activations never change during training."""

    def __init__(self, n_concepts, n_classes, ratios, seed=0, ranked=False, keep_rule="round", groups=None,
                 init="uniform"):
        super().__init__()
        self.keep_rule = keep_rule
        self.keep_list = keep_counts(ratios, n_concepts, keep_rule)
        self.register_buffer("keep", torch.tensor(self.keep_list))
        self.weight, self.bias = _init_linear(n_concepts, n_classes, _head_seeds(seed, len(ratios)), init)
        self._set_groups(len(ratios), groups)
        self.ranked = ranked

    def activations(self, a):
        """(H or 1, N, K) activations before masking."""
        return a.float() if a.ndim == 3 else a.float().unsqueeze(0)

    def masked_activations(self, x):
        """(H, N, K) activations with all but each sample's kept ones zeroed (the heads' linear input)."""
        if self.ranked:
            k = self.weight.shape[1]
            x = x if x.ndim == 3 else x.unsqueeze(0)
            a, r = self.per_head(x[..., :k]), self.per_head(x[..., k:])
            return a.float() * (r < self.keep[:, None, None])
        a = self.activations(x)
        a = a if a.shape[0] == len(self.keep_list) else self.per_head(a)
        return masked(a, topk_mask(a, self.keep_list, self.keep_rule), self.keep_rule)

    def forward(self, x):
        return torch.baddbmm(self.bias.unsqueeze(1), self.masked_activations(x), self.weight)


class _SparseHeads(MaskedLinearHeads):
    """H heads: activations = LayerNorm(x . unit concepts), keep each sample's top-k by |activation|, then linear.

    Subclasses say where the concepts come from (:meth:`concept_matrix`).
    """

    def __init__(self, n_concepts, n_classes, ratios, seed=0, keep_rule="round", groups=None, init="uniform"):
        super().__init__(n_concepts, n_classes, ratios, seed, keep_rule=keep_rule, groups=groups, init=init)
        self.ln_weight = nn.Parameter(torch.ones(len(ratios), n_concepts))
        self.ln_bias = nn.Parameter(torch.zeros(len(ratios), n_concepts))

    def concept_matrix(self):
        """Unit-norm concept vectors: (K, D) shared by every head, or (H, K, D) one set per head."""
        raise NotImplementedError

    def affine(self, z):
        """Each head's LayerNorm gain and bias on normalised scores z (H or 1, N, K)."""
        return torch.addcmul(self.ln_bias.unsqueeze(1), z, self.ln_weight.unsqueeze(1))   # one pass, not two

    def activations(self, x):
        """(H, N, K) concept activations after each head's LayerNorm, before masking."""
        c, x = self.concept_matrix(), x.float()
        shared = x.ndim == 2 or x.shape[0] == 1   # one input for every head: one GEMM, not a batch of H
        if c.ndim == 3 and shared:
            s = torch.einsum("nd,hkd->hnk", x.reshape(-1, x.shape[-1]), c)
        elif c.ndim == 3:
            s = torch.einsum("hnd,hkd->hnk", self.per_head(x), c)
        elif x.ndim == 3 and x.shape[0] > 1:
            s = self.per_head(x) @ c.T
        else:
            s = (x.reshape(-1, x.shape[-1]) @ c.T).unsqueeze(0)
        return self.affine(F.layer_norm(s, s.shape[-1:]))


class SparseConceptHeads(_SparseHeads):
    """Sparse heads over fixed concept vectors (Prototype or Cluster concepts).

    Because the concepts are fixed, LayerNorm(x . unit concepts) without its affine part is fixed too: :meth:`scores`
    computes it once per sample, and :meth:`on_scores` gives a view of the heads that trains on those scores, so an
    epoch costs only each head's affine, top-k mask and K -> C layer.

    Parameters
    ----------
    concepts : (K, D) tensor, or (G, K, D): one set per group (seed); normalised here
    n_classes : int
    ratios : sequence of H sparsity ratios, one per head
    seed : int, or H ints (each head's initialisation)
    groups : (H,) group of each head (default: all 0)
    """

    def __init__(self, concepts, n_classes, ratios, seed=0, keep_rule="round", groups=None, init="uniform"):
        super().__init__(concepts.shape[-2], n_classes, ratios, seed, keep_rule, groups, init)
        c = concepts.float() if concepts.ndim == 3 else concepts.float().unsqueeze(0)
        self.register_buffer("concepts", F.normalize(c, dim=-1))

    def concept_matrix(self):
        return self.concepts[0] if len(self.concepts) == 1 else self.concepts[self.groups]

    def concept_matrix_by_group(self):
        """(K, D) for one group, else (G, K, D): what heads.pt stores (``head_group`` maps heads to groups)."""
        return self.concepts[0] if len(self.concepts) == 1 else self.concepts

    def scores(self, x):
        """(G, N, K) normalised concept scores of raw features x (N, D): LayerNorm without affine, per group."""
        s = torch.einsum("nd,gkd->gnk", x.float(), self.concepts)
        return F.layer_norm(s, s.shape[-1:])

    def forward_scores(self, z):
        """Logits (H, B, C) from normalised scores z (G or 1, B, K)."""
        a = self.affine(self.per_head(z.float()))
        a = masked(a, topk_mask(a, self.keep_list, self.keep_rule), self.keep_rule)
        return torch.baddbmm(self.bias.unsqueeze(1), a, self.weight)

    def on_scores(self):
        return _OnScores(self)


class _OnScores(nn.Module):
    """The same heads (shared parameters), taking normalised scores instead of raw features."""

    def __init__(self, heads):
        super().__init__()
        self.heads = heads

    @property
    def groups(self):
        return self.heads.groups

    def forward(self, z):
        return self.heads.forward_scores(z)


class End2EndConceptHeads(_SparseHeads):
    """Sparse heads whose concepts are learnt jointly: each head assigns every candidate element to one concept.

    Each head has assignment logits (E, K) over the E candidate element embeddings of its group. A LayerNorm over K
    (affine, one gain/bias per head and concept) and a hard Gumbel-softmax (tau = 0.1) make each element's assignment
    exactly one-hot in the forward pass; the gradient is the soft sample's (straight-through). Concept k = normalised
    sum of the elements assigned to it. In eval mode the assignment is the noise-free argmax, so validation is
    deterministic.

    Why the gain starts above 1: a hard Gumbel sample picks concept k with probability softmax(z)_k whatever tau is,
    and unit-variance logits over 200 concepts make that nearly uniform, i.e. concepts of random elements. The logits
    start as cosine similarities to K seed elements (so training starts from a partition of the elements around
    seeds), and ``gain`` sets how sharply.

    Parameters
    ----------
    elements : (E, D) candidate element embeddings, or (G, E, D) one pool per group
    seeds : (K,) rows of ``elements`` that start one concept each, or (G, K)
    """

    def __init__(self, elements, seeds, n_classes, ratios, seed=0, tau=0.1, gain=5.0, keep_rule="round",
                 groups=None, init="uniform"):
        seeds = torch.as_tensor(np.asarray(seeds))
        seeds = seeds if seeds.ndim == 2 else seeds.unsqueeze(0)
        super().__init__(seeds.shape[1], n_classes, ratios, seed, keep_rule, groups, init)
        e = elements.float() if elements.ndim == 3 else elements.float().unsqueeze(0)
        self.register_buffer("elements", e)
        self.tau = tau
        unit = F.normalize(e, dim=-1)
        sim = torch.einsum("ged,gkd->gek", unit, torch.stack([unit[g][seeds[g]] for g in range(len(e))]))
        self.assign_logits = nn.Parameter(sim[self.groups].clone())
        k = seeds.shape[1]
        self.assign_gain = nn.Parameter(torch.full((len(ratios), 1, k), float(gain)))
        self.assign_bias = nn.Parameter(torch.zeros(len(ratios), 1, k))

    def assignment(self):
        """(H, E, K) one-hot assignment of elements to concepts."""
        z = F.layer_norm(self.assign_logits, self.assign_logits.shape[-1:]) * self.assign_gain + self.assign_bias
        if self.training:
            return F.gumbel_softmax(z, tau=self.tau, hard=True, dim=-1)
        return F.one_hot(z.argmax(-1), z.shape[-1]).to(z.dtype)

    def concept_matrix(self):
        a = self.assignment()
        if len(self.elements) == 1:   # one pool for every head: one GEMM
            return F.normalize(torch.einsum("hek,ed->hkd", a, self.elements[0]), dim=-1)
        return F.normalize(torch.einsum("hek,hed->hkd", a, self.elements[self.groups]), dim=-1)


class LinearProbes(_Grouped):
    """H plain linear classifiers on the raw features (the standard accuracy)."""

    def __init__(self, dim, n_classes, n_heads, seed=0, groups=None, init="uniform"):
        super().__init__()
        self.weight, self.bias = _init_linear(dim, n_classes, _head_seeds(seed, n_heads), init)
        self._set_groups(n_heads, groups)

    def forward(self, x):
        return torch.baddbmm(self.bias.unsqueeze(1), self.per_head(x.float()), self.weight)


class _Adam:
    """Adam over head-stacked parameters with one learning rate per head (torch's Adam takes one per tensor).

    ``step(grads, active)`` leaves the parameters of heads with ``active`` False untouched, so a diverged head keeps its
    last finite parameters.
    """

    def __init__(self, params, lrs, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self.params, self.lrs, self.betas, self.eps, self.wd = list(params), lrs, betas, eps, weight_decay
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    @torch.no_grad()
    def step(self, grads, active=None):
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            shape = (-1,) + (1,) * (p.ndim - 1)
            lr = self.lrs.view(shape)
            if active is not None:   # a stopped head's NaN gradient never enters its moments, and its lr is 0
                on = active.view(shape)
                g = torch.where(on, g, 0.0)
                lr = lr * on
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


@dataclass
class Split:
    """One group's rows: ``train`` (sorted row indices it trains on), ``dev`` (rows that choose its epoch, or None
    to choose on val) and the ``seed`` of its batch order."""
    train: torch.Tensor
    dev: torch.Tensor = None
    seed: int = 0


def gather(x, idx, device):
    """The input of a batch: ``idx`` is one index tensor (the same rows for every group: (1, B, F)) or a list of G
    (G, B, F). ``x`` is (N, F) shared by the groups (tensor or memory map) or a (G, N, F) tensor, one per group."""
    per_group = torch.is_tensor(x) and x.ndim == 3
    if torch.is_tensor(idx):
        if per_group:
            return x[:, idx.to(x.device)].to(device, non_blocking=True).float()
        return rows(x, idx, device).unsqueeze(0)
    if per_group:
        return torch.stack([x[g, i.to(x.device)] for g, i in enumerate(idx)]).to(device, non_blocking=True).float()
    if len(idx) == 1:
        return rows(x, idx[0], device).unsqueeze(0)
    return torch.stack([rows(x, i, device) for i in idx])


def matmul_precision(device, precision):
    """A context computing the heads' matrix products in ``precision``: 'float32', or 'bfloat16' (autocast: bf16
    inputs, fp32 accumulation; about four times faster on CPUs with AVX512-BF16 or AMX, bench/bench_heads.py)."""
    if precision == "float32":
        return contextlib.nullcontext()
    if precision != "bfloat16":
        raise ValueError(f"precision must be float32 or bfloat16, not {precision!r}")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(module, x, y, chunk=4096, row_groups=None):
    """Per-head top-1, top-5 (percent), mean cross-entropy and predicted class on (x, y), in chunks, in float32.

    ``row_groups``: None (every head on all rows of x) or G equal-length index tensors (group g's heads on its rows).
    Returns NumPy arrays (H,), (H,), (H,), (H, n).
    """
    device = _device_of(module)
    n = len(y) if row_groups is None else len(row_groups[0])
    was_training = module.training
    module.eval()
    top1 = top5 = loss = 0
    preds = []
    for i in range(0, n, chunk):
        if row_groups is None:
            idx = torch.arange(i, min(i + chunk, n))
            inp, yy = gather(x, idx, device), y[idx.to(y.device)].to(device).unsqueeze(0)
        else:
            idx = [r[i:i + chunk] for r in row_groups]
            inp = gather(x, idx, device)
            yy = torch.stack([y[r.to(y.device)] for r in idx]).to(device)
        logits = module(inp).float()
        yy = yy.expand(len(logits), -1) if len(yy) == 1 else yy[module.groups]
        h, b, c = logits.shape
        ce = F.cross_entropy(logits.reshape(h * b, c), yy.reshape(-1), reduction="none").view(h, b)
        loss = loss + ce.double().sum(1)
        pred = logits.argmax(-1)
        # top-5: fewer than five classes score above the true one (a comparison, cheaper than a top-k)
        above = (logits > logits.gather(-1, yy.unsqueeze(-1))).sum(-1)
        top1 = top1 + (pred == yy).sum(1)
        top5 = top5 + ((above < 5) | (pred == yy)).sum(1)
        preds.append(pred)
    module.train(was_training)
    return (100.0 * top1.double() / n).cpu().numpy(), (100.0 * top5.double() / n).cpu().numpy(), \
        (loss / n).cpu().numpy(), torch.cat(preds, 1).cpu().numpy()


RESULT_FIELDS = ("top1", "top5", "select_top1", "epoch", "train_loss", "val_loss")


def fit(module, lrs, x_train, y_train, x_val, y_val, epochs=30, batch_size=256, seed=0, weight_decay=0.0,
        lr_decay=1.0, splits=None, precision="float32", desc="heads"):
    """Train every head of ``module`` together; keep each head's parameters from its best epoch.

    Parameters
    ----------
    module : heads with a ``groups`` buffer (head -> group), called on (G or 1, B, F) inputs
    lrs : (H,) learning rates
    x_train, x_val : (N, F) tensors (resident, any float dtype) or NumPy memory maps (streamed), or (G, N, F)
        tensors, one per group; y_train, y_val : label tensors
    lr_decay : the lr is multiplied by this after every epoch (the original code's ExponentialLR(0.99))
    precision : 'float32' or 'bfloat16', the precision of the training steps' matrix products
        (:func:`matmul_precision`); evaluation is always float32 (TF32 on CUDA where the caller allows it, as
        :func:`utils.sweep.train` does)
    splits : G :class:`Split` (default: one group training on every row, batch order from ``seed``). Groups must have
        equally many train rows (and dev rows). A group with dev rows chooses its heads' epochs by their dev top-1;
        otherwise by val top-1, as linear-probe evaluations customarily report.

    Each batch's rows are taken in sorted order (reads from a memory map stay sequential-ish; the loss is a mean, so
    the order inside a batch does not matter). A head whose training loss becomes NaN/Inf stops there: it is no longer
    updated, the epoch it happened in is recorded in ``diverged``, and it keeps its best earlier epoch (``epoch`` 0 and
    NaN accuracies when there was none).

    Returns a dict of per-head arrays: top1, top5, select_top1, epoch (1-based, the one kept), train_loss, val_loss,
    diverged (0 = never), pred (H, N_val) predicted classes at the kept epoch (-1 where none).
    """
    device = _device_of(module)
    lrs = torch.as_tensor(lrs, dtype=torch.float32, device=device).clone()
    params = list(module.parameters())
    opt = _Adam(params, lrs, weight_decay=weight_decay)
    n_heads = len(lrs)
    if splits is None:
        splits = [Split(torch.arange(len(y_train)), None, seed)]
    n_train = len(splits[0].train)
    if any(len(s.train) != n_train for s in splits) or len({0 if s.dev is None else len(s.dev) for s in splits}) > 1:
        raise ValueError("every group needs as many train (and dev) rows as the others")
    holdout = splits[0].dev is not None
    groups = module.groups.to(device)
    best = {k: np.full(n_heads, np.nan) for k in RESULT_FIELDS}
    best["select_top1"][:] = -np.inf
    best["epoch"][:] = 0
    best["pred"] = np.full((n_heads, len(y_val)), -1, dtype=np.int64)
    diverged = np.zeros(n_heads, dtype=np.int64)
    best_params = [p.detach().clone() for p in params]
    gens = [torch.Generator().manual_seed(int(s.seed)) for s in splits]
    alive = torch.ones(n_heads, dtype=torch.bool, device=device)
    bar = tqdm(range(1, epochs + 1), desc=desc, unit="epoch", dynamic_ncols=True)
    for epoch in bar:
        module.train()
        # the epoch's order goes to the device once: indexing resident features with host indices would copy and
        # synchronise at every step
        on = device if torch.is_tensor(x_train) and x_train.device == device else torch.device("cpu")
        perms = [s.train[torch.randperm(n_train, generator=g)].to(on) for s, g in zip(splits, gens)]
        loss_sum = torch.zeros(n_heads, device=device, dtype=torch.float64)
        for i in range(0, n_train, batch_size):
            idx = [p[i:i + batch_size].sort().values for p in perms]
            inp = gather(x_train, idx if len(idx) > 1 else idx[0], device)
            yb = torch.stack([y_train[j.to(y_train.device)] for j in idx]).to(device)
            with matmul_precision(device, precision):
                logits = module(inp)
            h, b, c = logits.shape
            yb = yb.expand(h, -1) if len(yb) == 1 else yb[groups]
            loss = F.cross_entropy(logits.float().reshape(h * b, c), yb.reshape(-1), reduction="none").view(h, b)
            loss = loss.mean(1)
            finite = torch.isfinite(loss)
            alive &= finite
            opt.step(torch.autograd.grad(torch.where(finite, loss, 0.0).sum(), params), alive)
            loss_sum += torch.where(finite, loss.detach(), 0.0).double() * b
        top1, top5, vloss, pred = evaluate(module, x_val, y_val)
        sel = top1
        if holdout:
            sel = evaluate(module, x_train, y_train, row_groups=[s.dev for s in splits])[0]
        ok = alive.cpu().numpy() & np.isfinite(vloss)
        newly = (diverged == 0) & ~ok
        diverged[newly] = epoch
        alive &= torch.as_tensor(ok, device=device)
        better = ok & (sel > best["select_top1"])
        for k, v in (("top1", top1), ("top5", top5), ("select_top1", sel), ("val_loss", vloss),
                     ("train_loss", (loss_sum / n_train).cpu().numpy()), ("epoch", np.full(n_heads, epoch))):
            best[k][better] = v[better]
        best["pred"][better] = pred[better]
        mask = torch.as_tensor(better, device=device)
        for p, bp in zip(params, best_params):
            bp[mask] = p.detach()[mask]
        opt.lrs.mul_(lr_decay)
        bar.set_postfix(best_top1=f"{np.nanmax(best['top1']) if np.isfinite(best['top1']).any() else 0:.1f}",
                        refresh=False)
    with torch.no_grad():
        for p, bp in zip(params, best_params):
            p.copy_(bp)
    best["select_top1"][best["epoch"] == 0] = np.nan
    best["epoch"] = best["epoch"].astype(np.int64)
    best["diverged"] = diverged
    return best

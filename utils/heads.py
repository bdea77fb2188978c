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

from .masks import keep_counts, keep_weights, masked, threshold_factor

SPARSITY_GRID = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.98)
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
            return a.float() * (r < self.keep[:, None, None]).float()
        a = self.activations(x)
        a = a if a.shape[0] == len(self.keep_list) else self.per_head(a)
        return masked(a, keep_weights(a, self.keep_list, self.keep_rule), self.keep_rule)

    def forward(self, x):
        return torch.baddbmm(self.bias.unsqueeze(1), self.masked_activations(x), self.weight)


def _autocast_dtype(device):
    """The dtype torch.autocast computes products in on ``device`` now, or None when it is off."""
    kind = device.type
    try:
        return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
    except (AttributeError, TypeError):   # torch < 2.4
        if kind == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


class _SparseLinear(torch.autograd.Function):
    """Logits bias + (a * keep) @ weight of H heads, a = z * gain + shift (each head's LayerNorm affine), keep = the
    0/1 top-k weights of a (:func:`keep_weights`).

    The arithmetic is autograd's of that expression, op for op and in the same precision (under autocast: the
    products in its dtype, the rest float32), so the results are the same bits (a test checks it); what goes is what
    autograd adds around it: the broadcast z materialised (z * 1) for the gain's gradient, a * keep as a new tensor,
    a graph of eight nodes. Under the 'reference' rule the activations' gradient is the original's, as
    :func:`utils.masks.masked` gives it (0.5 |a| at the threshold). Inputs: z (H, B, K) (an expanded view is fine),
    gain and shift (H, K), weight (H, K, C), bias (H, C).
    """

    @staticmethod
    def forward(ctx, z, gain, shift, weight, bias, keep, rule):
        a = torch.addcmul(shift.unsqueeze(1), z, gain.unsqueeze(1))
        w = keep_weights(a, keep, rule)
        back = w                                # what the activations' gradient is multiplied by
        if rule == "reference" and any(ctx.needs_input_grad[:3]):
            back = threshold_factor(a, w)
        am = a.mul_(w)                          # a itself is not needed again
        cast = _autocast_dtype(am.device)
        if cast is not None:                    # what autocast would hand the batched product
            am, weight, bias = am.to(cast), weight.to(cast), bias.to(cast)
        ctx.save_for_backward(z, gain, back, am, weight)
        return torch.baddbmm(bias.unsqueeze(1), am, weight)

    @staticmethod
    def backward(ctx, g):
        z, gain, back, am, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        g = g.to(am.dtype)
        dz = d_gain = d_shift = d_weight = d_bias = None
        if need[3]:
            d_weight = am.transpose(1, 2).bmm(g).float()
        if need[4]:
            d_bias = g.sum(1).float()
        if need[0] or need[1] or need[2]:
            da = g.bmm(weight.transpose(1, 2)).float().mul_(back)
            if need[2]:
                d_shift = da.sum(1)
            if need[1]:
                d_gain = (da * z).sum(1)
            if need[0]:
                dz = da * gain.unsqueeze(1)
        return dz, d_gain, d_shift, d_weight, d_bias, None, None


class SparseHeads(MaskedLinearHeads):
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

    def sparse_logits(self, z):
        """Logits (H, B, C) from normalised scores z (H, B, K), or (G or 1, B, K) that :meth:`per_head` spreads."""
        z = z if z.shape[0] == len(self.keep_list) else self.per_head(z)
        return _SparseLinear.apply(z, self.ln_weight, self.ln_bias, self.weight, self.bias, self.keep_list,
                                   self.keep_rule)

    def forward(self, x):
        return self.sparse_logits(self.normalised(x))

    def activations(self, x):
        """(H, N, K) concept activations after each head's LayerNorm, before masking."""
        return self.affine(self.normalised(x))

    def normalised(self, x):
        """(H or 1, N, K) LayerNorm(x . unit concepts) without the affine part."""
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
        return F.layer_norm(s, s.shape[-1:])


class SparseConceptHeads(SparseHeads):
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
        return self.sparse_logits(self.per_head(z.float()))

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


class End2EndConceptHeads(SparseHeads):
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
        """p -= lr * (m / c1) / (sqrt(v / c2) + eps), every parameter at once: torch's _foreach_ ops are a few kernels
        in all on a GPU instead of a dozen per parameter, and on the CPU the same per-tensor operations (same bits)."""
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        # a stopped head's NaN gradient never enters its moments, and its lr is 0; on the CPU, with every head
        # running, masking changes nothing and is skipped (asking on a GPU would wait for it)
        if active is not None and active.device.type == "cpu" and bool(active.all()):
            active = None
        shapes = [(-1,) + (1,) * (p.ndim - 1) for p in self.params]
        lrs, grads = [self.lrs.view(s) for s in shapes], list(grads)
        if active is not None:
            on = [active.view(s) for s in shapes]
            grads = [torch.where(o, g, 0.0) for o, g in zip(on, grads)]
            lrs = [lr * o for lr, o in zip(lrs, on)]
        torch._foreach_mul_(self.m, b1)
        torch._foreach_add_(self.m, grads, alpha=1 - b1)
        torch._foreach_mul_(self.v, b2)
        torch._foreach_addcmul_(self.v, grads, grads, value=1 - b2)
        if self.wd:
            torch._foreach_mul_(self.params, [1 - lr * self.wd for lr in lrs])
        denom = torch._foreach_div(self.v, c2)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, self.eps)
        step = torch._foreach_div(self.m, c1)
        torch._foreach_mul_(step, lrs)                    # lr * (m / c1): one lr per head, broadcast
        torch._foreach_addcdiv_(self.params, step, denom, value=-1.0)


def rows(x, idx, device):
    """Rows ``idx`` (a sorted 1-D index tensor, or a slice) of features held as a tensor (resident) or a NumPy memory
    map (streamed), on ``device`` as float32. index_select, not x[idx]: the same copy, several times faster."""
    if torch.is_tensor(x):
        part = x[idx] if isinstance(idx, slice) else x.index_select(0, idx.to(x.device))
        return part.to(device, non_blocking=True).float()
    part = np.array(x[idx], dtype=np.float32) if isinstance(idx, slice) else \
        np.asarray(x[idx.cpu().numpy()], dtype=np.float32)
    return torch.from_numpy(part).to(device, non_blocking=True)


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
    """The input of a batch: ``idx`` is one index tensor or slice (the same rows for every group: (1, B, F)) or a
    list of G index tensors (G, B, F). ``x`` is (N, F) shared by the groups (tensor or memory map) or a (G, N, F)
    tensor, one per group."""
    per_group = torch.is_tensor(x) and x.ndim == 3
    if torch.is_tensor(idx) or isinstance(idx, slice):
        if per_group:
            part = x[:, idx] if isinstance(idx, slice) else x.index_select(1, idx.to(x.device))
            return part.to(device, non_blocking=True).float()
        return rows(x, idx, device).unsqueeze(0)
    if per_group:
        return torch.stack([x[g].index_select(0, i.to(x.device)) for g, i in enumerate(idx)]).to(
            device, non_blocking=True).float()
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
    if row_groups is not None and torch.is_tensor(x):   # to x's device once, not once per chunk
        row_groups = [r.to(x.device) for r in row_groups]
    was_training = module.training
    module.eval()
    top1 = top5 = loss = 0
    preds = []
    for i in range(0, n, chunk):
        if row_groups is None:   # consecutive rows: views, no copies
            idx = slice(i, min(i + chunk, n))
            inp, yy = gather(x, idx, device), y[idx].to(device).unsqueeze(0)
        else:
            idx = [r[i:i + chunk] for r in row_groups]
            inp = gather(x, idx, device)
            yy = torch.stack([y.index_select(0, r.to(y.device)) for r in idx]).to(device)
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
    the order inside a batch does not matter). A head whose training loss, or its loss on the rows that choose its
    epoch (dev, else val), becomes NaN/Inf stops there: it is no longer updated, the epoch it happened in is recorded
    in ``diverged``, and it keeps its best earlier epoch (``epoch`` 0 and NaN accuracies when there was none). With
    dev rows, val is evaluated once, after training, on each head's kept parameters.

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
            yb = torch.stack([y_train.index_select(0, j.to(y_train.device)) for j in idx]).to(device) if len(idx) > 1 \
                else y_train.index_select(0, idx[0].to(y_train.device)).to(device).unsqueeze(0)
            with matmul_precision(device, precision):
                logits = module(inp)
            h, b, c = logits.shape
            yb = yb.expand(h, -1) if len(yb) == 1 else yb[groups]
            loss = F.cross_entropy(logits.float().reshape(h * b, c), yb.reshape(-1), reduction="none").view(h, b)
            loss = loss.mean(1)
            finite = torch.isfinite(loss)
            alive &= finite
            loss = torch.where(finite, loss, 0.0)
            opt.step(torch.autograd.grad(loss.sum(), params), alive)
            loss_sum.add_(loss.detach(), alpha=b)   # in float64: the product is exact, as loss.double() * b
        if holdout:   # the dev rows choose; val is evaluated once, at the end, from the kept parameters
            sel, _, sel_loss, _ = evaluate(module, x_train, y_train, row_groups=[s.dev for s in splits])
        else:
            top1, top5, vloss, pred = evaluate(module, x_val, y_val)
            sel, sel_loss = top1, vloss
        ok = alive.cpu().numpy() & np.isfinite(sel_loss)
        newly = (diverged == 0) & ~ok
        diverged[newly] = epoch
        alive &= torch.as_tensor(ok, device=device)
        better = ok & (sel > best["select_top1"])
        fields = [("select_top1", sel), ("train_loss", (loss_sum / n_train).cpu().numpy()),
                  ("epoch", np.full(n_heads, epoch))]
        if not holdout:
            fields += [("top1", top1), ("top5", top5), ("val_loss", vloss)]
            best["pred"][better] = pred[better]
        for k, v in fields:
            best[k][better] = v[better]
        mask = torch.as_tensor(better, device=device)
        for p, bp in zip(params, best_params):
            bp[mask] = p.detach()[mask]
        opt.lrs.mul_(lr_decay)
        chosen = best["select_top1"][np.isfinite(best["select_top1"])]
        bar.set_postfix({"best_dev" if holdout else "best_top1": f"{chosen.max() if len(chosen) else 0:.1f}"},
                        refresh=False)
    with torch.no_grad():
        for p, bp in zip(params, best_params):
            p.copy_(bp)
    if holdout:   # the same evaluation as at the chosen epoch, on the same parameters: the same numbers
        kept = best["epoch"] > 0
        top1, top5, vloss, pred = evaluate(module, x_val, y_val)
        for k, v in (("top1", top1), ("top5", top5), ("val_loss", vloss)):
            best[k][kept] = v[kept]
        best["pred"][kept] = pred[kept]
    best["select_top1"][best["epoch"] == 0] = np.nan
    best["epoch"] = best["epoch"].astype(np.int64)
    best["diverged"] = diverged
    return best

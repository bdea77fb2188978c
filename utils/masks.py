"""Top-k masks of concept activations by absolute value: how many each sparsity ratio keeps under each keep rule,
the masks themselves (NumPy's sort on the CPU, one torch sort on a GPU; both give a stable sort's answer), and the
original code's gradient at its threshold (the 'reference' rule). Imports no project module.
"""
import numpy as np
import torch

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
_INDEX = {}
PIECE = 1024   # rows per piece of a CPU mask


def _np_mask(a, k, j, rule, out):
    """Masks of rows ``a`` (n, K) by absolute value into ``out`` (bool or float 0/1); row r keeps ``k[r]`` and its
    threshold is its ``j[r]``-th smallest |a|."""
    srt = np.abs(a)
    srt.sort(axis=-1)   # SIMD sorting networks (x86-simd-sort) in NumPy: for K = 200 faster than its np.partition
    thr = np.take_along_axis(srt, j[:, None], axis=-1)
    a = np.abs(a, out=srt)
    if rule == "reference":   # strictly above the (K - k - 1)-th smallest, as the original thresholds
        np.greater(a, thr, out=out)
    else:                     # at or above the k-th largest: exactly k per row unless values tie there
        np.greater_equal(a, thr, out=out)
        for r in np.flatnonzero(np.count_nonzero(out, axis=1) != k):   # ties: the lower indices, as a stable sort
            out[r] = 0
            out[r, np.argsort(-a[r], kind="stable")[:k[r]]] = 1
    out[k <= 0] = 0
    out[k >= a.shape[1]] = 1


def _np_masks(a, keep, rule, dtype):
    """CPU masks (H, N, K) of ``dtype`` (np.bool_ or float32) from activations ``a`` (H, N, K), every head's rows
    at once, in pieces of ``PIECE`` rows: small enough to stay in cache through the sort and the comparisons (an
    (8, 4096, 200) block in one piece takes 1.7 times as long), and spread over torch's number of threads (NumPy
    releases the GIL while it sorts). Each row is computed alone, so the result is the same for any split."""
    h, n, k_all = a.shape
    rows = a.reshape(h * n, k_all)
    out = np.empty(rows.shape, dtype=dtype)
    keep = np.repeat(np.asarray(keep, dtype=np.int64), n)
    j = np.clip(k_all - keep - (rule == "reference"), 0, k_all - 1)
    threads = torch.get_num_threads()

    def work(start, stop):
        for i in range(start, stop, PIECE):
            e = min(i + PIECE, stop)
            _np_mask(rows[i:e], keep[i:e], j[i:e], rule, out[i:e])
    # one share of rows per thread, each worked through piece by piece; this thread takes the last share itself
    share = max(PIECE, -(-len(rows) // threads))
    starts = list(range(0, len(rows), share)) or [0]
    if len(starts) > 1 and threads - 1 not in _POOL:
        from concurrent.futures import ThreadPoolExecutor
        _POOL[threads - 1] = ThreadPoolExecutor(threads - 1, thread_name_prefix="topk")
    others = [_POOL[threads - 1].submit(work, i, i + share) for i in starts[:-1]]
    work(starts[-1], len(rows))
    for f in others:
        f.result()
    return torch.from_numpy(out.reshape(a.shape))


def _index(keep, k_all, rule, device):
    """Per head (H, 1, 1) on ``device``: the sorted position of its threshold, and its keep count; made once per
    device and grid, since copying them there at every step would wait for the device each time."""
    key = (tuple(keep), k_all, rule, str(device))
    if key not in _INDEX:
        j = [min(max(k_all - k - (rule == "reference"), 0), k_all - 1) for k in keep]
        _INDEX[key] = tuple(torch.tensor(v, device=device).view(-1, 1, 1) for v in (j, keep))
    return _INDEX[key]


def torch_masks(mags, keep, rule):
    """The same masks from magnitudes (H, N, K) with torch ops only (the GPU path; any device): one sort of every
    head's rows gives each row's threshold; ties at it (rule 'round') go to the lower indices by a running count.
    No value leaves the device."""
    k_all = mags.shape[-1]
    j, k = _index(keep, k_all, rule, mags.device)
    thr = mags.sort(dim=-1).values.gather(-1, j.expand(-1, mags.shape[1], 1))
    if rule == "reference":
        m = mags > thr
    else:
        above, tied = mags > thr, mags == thr
        need = k - above.sum(-1, keepdim=True)   # how many of the tied values a row still keeps
        m = above | (tied & (tied.cumsum(-1, dtype=torch.int32) <= need))
    if min(keep) <= 0 or max(keep) >= k_all:   # heads keeping none or all (known here: no kernel otherwise)
        m = (m & (k > 0)) | (k >= k_all)
    return m


def _masks(a, keep, rule, dtype):
    with torch.no_grad():
        if a.device.type == "cpu":
            return _np_masks(a.detach().float().numpy(), keep, rule, np.float32 if dtype.is_floating_point
                             else np.bool_)
        return torch_masks(a.detach().abs().float(), keep, rule).to(dtype)


def topk_mask(a, keep, rule="round"):
    """Boolean mask of the activations each row keeps, by absolute value.

    ``a`` is (N, K) with an int ``keep``, or (H, N, K) with H ints (one per head). rule 'round': exactly ``keep`` per
    row, the largest (ties broken towards the lower index, as a stable sort would); rule 'reference': the original
    code's strict threshold, every |a| above the (K - keep - 1)-th smallest, which keeps ``keep`` per row unless
    values tie at the threshold.
    """
    if isinstance(keep, int):
        return topk_mask(a.unsqueeze(0), [keep], rule)[0]
    return _masks(a, [int(k) for k in keep], rule, torch.bool)


def keep_weights(a, keep, rule="round"):
    """:func:`topk_mask` (H, N, K) as 0/1 in ``a``'s dtype, the factor the heads multiply by: a float times a boolean
    mask is a slow, branching loop on the CPU (several ms per (8, 1024, 200) block), a float times a float is not;
    the products are the same."""
    return _masks(a, [int(k) for k in keep], rule, a.dtype)


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


def threshold_factor(a, mask):
    """What the original code's zeroing passes back to ``a`` per unit of upstream gradient, for a 'reference' mask
    (bool or 0/1) of ``a`` (..., K): it zeroes through max(d, d - d) with d = |a| - threshold, and torch's max splits
    the gradient at a tie, so an element at the threshold (dropped, d = 0) passes 0.5 |a|; the others pass their
    mask's 0 or 1. The threshold is each row's largest dropped |a| (every kept one is strictly above it)."""
    mags = a.detach().abs().float()
    keep = mask.bool()
    threshold = torch.where(keep, 0.0, mags).amax(-1, keepdim=True)
    return torch.where(mags == threshold, 0.5 * mags, keep.float()).to(a.dtype)


def masked(a, mask, rule="round"):
    """``a * mask`` (``mask`` bool or 0/1); under the 'reference' rule with the original's gradient at the
    threshold (:func:`threshold_factor`) as well, so that its heads train as the original's do."""
    w = mask.to(a.dtype)
    if rule != "reference" or not a.requires_grad:
        return a * w
    return _ThresholdGradient.apply(a, w, threshold_factor(a, w))


def with_ranks(a):
    """Fixed activations (N, K) with their per-row ranks appended, (N, 2K): the input :class:`MaskedLinearHeads`
    takes with ``ranked=True``, so masks are computed once for the whole dataset instead of at every step."""
    return torch.cat([a.float(), ranks(a).float()], dim=1)

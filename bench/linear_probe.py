"""A standard probe that measures the representation, not an optimiser budget (issue 17 item 2): the prototype.

The IIS divides every concept head's accuracy by the standard accuracy, so the standard accuracy must be the
features' linear classifiability. The project's probe (utils/heads.py: Adam, a fixed lr grid and epoch budget, raw
features) is not: on features with a large common offset or a small scale it stops far from its optimum (59-65 % on
three classes that a linear classifier separates perfectly), and its accuracy changes with the features' scale, so
the IIS does too.

This probe is the convex problem solved, with the one free choice made on the dev split:

* features standardised with the mean and standard deviation of the rows it trains on (a feature constant there gets
  scale 1), so scale, offset and per-feature units do not matter;
* multinomial logistic regression, mean cross-entropy + (weight_decay / 2) ||W||^2 (bias unpenalised), solved by
  full-batch L-BFGS with a strong-Wolfe line search from W = 0 (a convex objective: no initialisation or batch order
  enters, so no seed does);
* weight decay chosen on the dev split (the held-out rows the sweep already carves out of train) over a grid of prior
  precisions (weight decay = precision / train rows), solved from the largest to the smallest with warm starts, each
  until its gradient certifies the solution within ``tol`` of the optimum; the best dev top-1 wins, ties going to the
  larger weight decay.

Intended home after the redesign: :func:`fit_converged_probe` beside ``LinearProbes`` in ``utils/heads.py`` (it
imports no project module), called from the sweep (``utils/sweep.py``'s ``train``) in place of the Adam probes under
``--protocol iis`` (``reference`` keeps the original's probe), and :func:`concept_beats_probe` beside the paired
bootstrap in ``utils/stats.py`` (it uses that module's resampling).
"""
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

# Gaussian prior precisions on the summed loss: weight decay = precision / n_train on the mean loss, so the grid moves
# with the data size as a prior would (1.8 k rows: 5.6 ... 5.6e-4; 1.28 M rows: 7.8e-3 ... 7.8e-7)
PRIORS = (1e4, 1e3, 1e2, 1e1, 1.0)


@dataclass
class ConvergedProbe:
    """A fitted probe. ``logits(x)`` takes raw features; the standardisation is part of the probe.

    mean, scale : (D,) tensors, the train rows' mean and standard deviation (1 where it is 0)
    weight : (D, C), bias : (C,), on standardised features
    weight_decay : the chosen value; path : one dict per value tried (prior, weight_decay, dev_top1, dev_loss,
        iterations, grad_max, converged, seconds); converged : whether the chosen solve reached ``tol``
    """
    mean: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    weight_decay: float
    path: list = field(default_factory=list)
    converged: bool = True

    def logits(self, x, chunk=65536):
        out = []
        for i in range(0, len(x), chunk):
            xb = torch.as_tensor(np.asarray(x[i:i + chunk]) if not torch.is_tensor(x) else x[i:i + chunk])
            xb = xb.to(self.weight.device, self.weight.dtype)
            out.append(((xb - self.mean) / self.scale) @ self.weight + self.bias)
        return torch.cat(out)

    def predict(self, x):
        return self.logits(x).argmax(1)


def standardiser(x):
    """(mean, scale) of the rows ``x`` (N, D), computed in float64, returned in x's dtype; scale 1 where a feature
    does not vary."""
    x64 = x.double()
    mean = x64.mean(0)
    std = x64.std(0, unbiased=False)
    return mean.to(x.dtype), torch.where(std > 0, std, torch.ones_like(std)).to(x.dtype)


def _solve(z, y, w, b, weight_decay, max_iter, tol):
    """Minimise mean CE(z @ w + b, y) + wd/2 |w|^2 in place by L-BFGS; (iterations, max |gradient|)."""
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, max_eval=int(max_iter * 1.25), tolerance_grad=tol,
                            tolerance_change=0.0, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w + b, y) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss
    opt.step(closure)
    closure()
    grad = max(float(w.grad.abs().max()), float(b.grad.abs().max()))
    return int(opt.state[opt._params[0]].get("n_iter", 0)), grad


def fit_converged_probe(x, y, train_rows, dev_rows, n_classes, priors=PRIORS, tol=1e-3, max_iter=2000, device="cpu",
                        dtype=torch.float64):
    """Fit the standard probe to convergence, choosing the weight decay on the dev rows.

    Parameters
    ----------
    x : (N, D) features (tensor or array, any scale); y : (N,) integer labels in [0, n_classes)
    train_rows, dev_rows : 1-D index arrays into x (the sweep's ``Split.train`` / ``Split.dev`` of one seed)
    priors : the grid, as prior precisions (weight decay = prior / number of train rows), solved largest first, each
        warm-started from the previous solution
    tol : how close to the optimum a solve must end: max |gradient| <= tol x weight decay, which bounds the distance
        to the unique optimum of the (weight-decay strongly convex) objective by about tol, whatever the weight decay
    max_iter : L-BFGS iterations per value (a solve that runs out is recorded as not converged)
    dtype : float64 by default: in float32 the line search stalls before small weight decays are solved

    Returns a :class:`ConvergedProbe` (its ``path`` records every value tried).
    """
    x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).to(device, dtype)
    y = torch.as_tensor(np.asarray(y) if not torch.is_tensor(y) else y).to(device, torch.long)
    tr, dv = torch.as_tensor(np.asarray(train_rows)).to(device), torch.as_tensor(np.asarray(dev_rows)).to(device)
    mean, scale = standardiser(x[tr])
    z = (x - mean) / scale
    ztr, ytr, zdv, ydv = z[tr], y[tr], z[dv], y[dv]
    w = torch.zeros(x.shape[1], n_classes, device=device, dtype=dtype, requires_grad=True)
    b = torch.zeros(n_classes, device=device, dtype=dtype, requires_grad=True)
    best, path = None, []
    for prior in sorted(priors, reverse=True):
        wd = prior / len(tr)
        t0 = time.perf_counter()
        iters, grad = _solve(ztr, ytr, w, b, wd, max_iter, tol * wd)
        with torch.no_grad():
            logits = zdv @ w + b
            top1 = 100.0 * float((logits.argmax(1) == ydv).double().mean())
            loss = float(F.cross_entropy(logits, ydv))
        ok = grad <= tol * wd
        path.append(dict(prior=prior, weight_decay=wd, dev_top1=top1, dev_loss=loss, iterations=iters, grad_max=grad,
                         converged=ok, seconds=time.perf_counter() - t0))
        if best is None or top1 > best[0]:          # strictly better: ties keep the larger weight decay
            best = (top1, wd, w.detach().clone(), b.detach().clone(), ok)
    _, wd, wb, bb, ok = best
    return ConvergedProbe(mean, scale, wb, bb, wd, path, ok)


def concept_beats_probe(probe_correct, head_correct, n_boot=1000, seed=0, level=0.95):
    """Which concept heads beat the standard probe by more than their interval?

    ``probe_correct`` (N,) and ``head_correct`` (H, N) booleans on the same val samples. For each head, the paired
    bootstrap (the same resamples for the head and the probe) of top-1(head) - top-1(probe) in points; a head is
    flagged when the lower end of its ``level`` interval is above 0: the denominator then does not measure what the
    features allow. Returns one dict per head: difference, interval, flagged.
    """
    from utils import stats     # its resampling, so these intervals are the paired ones iis_computing prints
    pc = np.asarray(probe_correct, dtype=bool)
    hc = np.atleast_2d(np.asarray(head_correct, dtype=bool))
    acc, _ = stats.bootstrap_accuracies(np.concatenate([pc[None], hc]), None, n_boot, seed)
    lo, hi = stats.interval(acc[:, 1:] - acc[:, :1], level)
    obs = 100.0 * (hc.mean(1) - pc.mean())
    return [dict(difference=float(d), interval=[float(a), float(b)], flagged=bool(a > 0))
            for d, a, b in zip(obs, lo, hi)]

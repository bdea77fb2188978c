"""The standard probe of ``--protocol iis``: the features' linear classifiability, solved rather than trained.

The IIS divides every concept head's accuracy by the standard accuracy, so that accuracy must be what a linear
classifier on the features can reach, not what an optimiser reached within a budget. The original code's probe (Adam,
a fixed lr and epoch budget, raw features; ``--protocol reference`` keeps it) is not: on features far from the origin
or at a small scale it stops far from its optimum (issue 17: 59 % on three classes a linear classifier separates
perfectly), and its accuracy, hence the IIS, changes when the features are multiplied by 10. This probe is the convex
problem solved, with its one free choice made on the dev split:

* features standardised with the mean and standard deviation of the rows it trains on (a feature constant there keeps
  scale 1), so scale, offset and per-feature units do not matter;
* multinomial logistic regression, mean cross-entropy + (weight_decay / 2) ||W||^2 (bias unpenalised), solved in
  float64 by full-batch L-BFGS with a strong-Wolfe line search from W = 0. The objective is convex, so no seed,
  initialisation or batch order enters: the fit is a function of the rows alone;
* the weight decay chosen on the dev split (``Split.dev``; val where the sweep selects on val) over a grid of Gaussian
  prior precisions, weight decay = precision / train rows (so the grid moves with the data size as a prior would),
  solved from the largest to the smallest with warm starts. Each solve runs until every gradient entry is at most
  ``tol`` x weight decay (the penalty makes the objective that strongly convex in W, so the gradient bounds how far W
  is from its optimum); one that runs out of iterations is recorded as not converged. The best dev top-1 wins, ties
  going to the larger weight decay.

Everything that determines a fit is :data:`SETTINGS`, part of the sweep's training key (utils/sweep.py).
"""
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .fitcache import placement, rows_digest

# prior precisions on the summed loss; on 1 800 train rows the weight decays are 5.6 ... 5.6e-4
PRIORS = (1e4, 1e3, 1e2, 1e1, 1.0)
# what determines a converged probe besides its rows; bump "version" when the meaning of a fit changes
SETTINGS = dict(probe="converged", version=1, priors=list(PRIORS), tol=1e-3, max_iter=2000, dtype="float64",
                standardise="train rows")


def standardiser(x):
    """(mean, scale) of the rows ``x`` (N, D) in x's dtype, computed in float64; scale 1 where a feature does not
    vary."""
    x64 = x.double()
    std = x64.std(0, unbiased=False)
    return x64.mean(0).to(x.dtype), torch.where(std > 0, std, torch.ones_like(std)).to(x.dtype)


def _solve(z, y, w, b, weight_decay, max_iter, grad_tol):
    """Minimise mean CE(z @ w + b, y) + wd/2 |w|^2 in place by L-BFGS: (iterations, max |gradient|)."""
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, max_eval=int(max_iter * 1.25), tolerance_grad=grad_tol,
                            tolerance_change=0.0, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w + b, y) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss
    opt.step(closure)
    closure()       # the gradient at the returned point, not at the line search's last trial
    grad = max(float(w.grad.abs().max()), float(b.grad.abs().max()))
    return int(opt.state[w].get("n_iter", 0)), grad


def fit_converged_probe(x, y, x_dev, y_dev, n_classes, priors=PRIORS, tol=SETTINGS["tol"],
                        max_iter=SETTINGS["max_iter"], bar=None):
    """Fit one probe on (x, y), choosing the weight decay by top-1 on (x_dev, y_dev).

    x, x_dev : (N, D), (M, D) float64 tensors on the device to solve on (any scale: the probe standardises);
    y, y_dev : long label tensors there. Returns a dict: mean, scale (D,), weight (D, C), bias (C,) (on
    standardised features), weight_decay, dev_top1, converged (of the chosen solve) and path (one dict per value
    tried: prior, weight_decay, dev_top1, dev_loss, iterations, grad_max, converged).
    """
    mean, scale = standardiser(x)
    z, zd = (x - mean) / scale, (x_dev - mean) / scale
    w = torch.zeros(x.shape[1], n_classes, device=x.device, dtype=x.dtype, requires_grad=True)
    b = torch.zeros(n_classes, device=x.device, dtype=x.dtype, requires_grad=True)
    best, path = None, []
    for prior in sorted(priors, reverse=True):
        wd = prior / len(x)
        iters, grad = _solve(z, y, w, b, wd, max_iter, tol * wd)
        with torch.no_grad():
            logits = zd @ w + b
            top1 = 100.0 * float((logits.argmax(1) == y_dev).double().mean())
            loss = float(F.cross_entropy(logits, y_dev))
        ok = grad <= tol * wd
        path.append(dict(prior=prior, weight_decay=wd, dev_top1=top1, dev_loss=loss, iterations=iters,
                         grad_max=grad, converged=ok))
        if best is None or top1 > best["dev_top1"]:      # strictly better: ties keep the larger weight decay
            best = dict(weight=w.detach().clone(), bias=b.detach().clone(), weight_decay=wd, dev_top1=top1,
                        converged=ok)
        if bar is not None:
            bar.set_postfix(wd=f"{wd:.2g}", dev_top1=f"{top1:.1f}", refresh=False)
            bar.update(1)
    return dict(best, mean=mean, scale=scale, path=path)


class ConvergedProbes(nn.Module):
    """G fitted probes (one per seed) applied to raw features: logits (G, N, C). Their tensors (frozen parameters,
    so heads.pt stores them as ``standard.*``): mean, scale (G, D), weight (G, D, C), bias (G, C), weight_decay (G,)."""

    def __init__(self, fits):
        super().__init__()
        for name in ("mean", "scale", "weight", "bias"):
            setattr(self, name, nn.Parameter(torch.stack([f[name] for f in fits]), requires_grad=False))
        self.weight_decay = nn.Parameter(torch.tensor([f["weight_decay"] for f in fits], dtype=torch.float64),
                                         requires_grad=False)

    def forward(self, x):
        z = (x.to(self.mean.dtype).unsqueeze(0) - self.mean[:, None]) / self.scale[:, None]
        return torch.baddbmm(self.bias[:, None], z, self.weight)


def _take(x, idx, device):
    """Rows ``idx`` of a feature tensor or memory map, as a float64 tensor on ``device``."""
    if torch.is_tensor(x):
        return x[idx.to(x.device)].to(device, torch.float64)
    return torch.from_numpy(np.asarray(x[idx.cpu().numpy()], dtype=np.float64)).to(device)


def _metrics(logits, y):
    """top-1, top-5 (percent), mean cross-entropy and predictions of (N, C) logits."""
    pred = logits.argmax(1)
    above = (logits > logits.gather(1, y[:, None])).sum(1)
    return (100.0 * float((pred == y).double().mean()), 100.0 * float(((above < 5) | (pred == y)).double().mean()),
            float(F.cross_entropy(logits, y)), pred)


def fit_standard(x_train, y_train, x_val, y_val, n_classes, splits, device, cache=None):
    """The standard probe of each split (one per seed), in the shape :func:`utils.heads.fit` returns its heads'.

    Each split's probe trains on ``split.train`` and chooses its weight decay on ``split.dev`` (on val when it has
    none, as the Adam probe then chooses its epoch). Splits with the same rows share one fit, and with ``cache`` (a
    :class:`utils.fitcache.FitCache` of these features) so do runs: a fit found there is used as computed. Returns
    (result, probes, extra): ``result`` holds per-probe arrays top1, top5, select_top1 (dev top-1 of the chosen
    weight decay), epoch (0: no epochs), train_loss and val_loss (mean cross-entropy, unpenalised), diverged (0) and
    pred (G, N_val); ``probes`` is a :class:`ConvergedProbes`; ``extra`` one dict per probe for its results.json row.
    """
    dev = torch.device("cpu") if device.type == "mps" else device     # MPS has no float64
    xv, yv = _take(x_val, torch.arange(len(y_val)), dev), y_val.to(dev)
    fits, out, extra, done = [], [], [], {}
    bar = tqdm(total=len(splits) * len(PRIORS), desc="standard probe (converged)", unit="solve", dynamic_ncols=True)
    for split in splits:
        ident = (tuple(split.train.tolist()), None if split.dev is None else tuple(split.dev.tolist()))
        if ident not in done:
            key = dict(settings=SETTINGS, n_classes=n_classes, device=dev.type, train_rows=rows_digest(split.train),
                       dev_rows=rows_digest(split.dev), x_train=placement(x_train), x_val=placement(x_val))
            hit = cache.load("probe", key) if cache is not None else None
            if hit is not None:
                done[ident] = _from_cache(*hit, dev)
                bar.update(len(PRIORS))
            else:
                done[ident] = _fit_split(x_train, y_train, xv, yv, n_classes, split, dev, bar)
                if cache is not None:
                    cache.save("probe", key, *_to_cache(*done[ident]))
        else:
            bar.update(len(PRIORS))
        f, train_loss, (top1, top5, val_loss, pred) = done[ident]
        fits.append(f)
        out.append(dict(top1=top1, top5=top5, select_top1=f["dev_top1"], epoch=0, train_loss=train_loss,
                        val_loss=val_loss, diverged=0, pred=pred.cpu().numpy()))
        extra.append(dict(probe="converged", weight_decay=f["weight_decay"], converged=f["converged"],
                          solves=f["path"]))
    bar.close()
    for s, e in zip(splits, extra):
        if not e["converged"]:
            print(f"note: the standard probe of seed {s.seed} stopped after {SETTINGS['max_iter']} L-BFGS iterations "
                  f"short of its optimum (weight decay {e['weight_decay']:.3g}); results.json marks it")
    result = {k: np.array([o[k] for o in out]) for k in out[0] if k != "pred"}
    result["pred"] = np.stack([o["pred"] for o in out])
    return result, ConvergedProbes(fits), extra


def _fit_split(x_train, y_train, xv, yv, n_classes, split, dev, bar):
    """(fit, train loss, val metrics) of one split's probe."""
    x, y = _take(x_train, split.train, dev), y_train[split.train.to(y_train.device)].to(dev)
    if split.dev is None:
        xd, yd = xv, yv
    else:
        xd, yd = _take(x_train, split.dev, dev), y_train[split.dev.to(y_train.device)].to(dev)
    f = fit_converged_probe(x, y, xd, yd, n_classes, bar=bar)
    with torch.no_grad():
        train_loss = float(F.cross_entropy(((x - f["mean"]) / f["scale"]) @ f["weight"] + f["bias"], y))
        val = _metrics(((xv - f["mean"]) / f["scale"]) @ f["weight"] + f["bias"], yv)
    return f, train_loss, val


TENSORS = ("mean", "scale", "weight", "bias")
NUMBERS = ("weight_decay", "dev_top1", "converged", "path")


def _to_cache(f, train_loss, val):
    """A fit as a store entry's (arrays, info): its tensors and val predictions, and its numbers (JSON floats
    round-trip exactly)."""
    top1, top5, val_loss, pred = val
    arrays = {n: f[n].detach().cpu().numpy() for n in TENSORS}
    arrays["pred"] = pred.cpu().numpy()
    return arrays, dict({n: f[n] for n in NUMBERS}, train_loss=train_loss, top1=top1, top5=top5, val_loss=val_loss)


def _from_cache(arrays, info, dev):
    f = dict({n: torch.from_numpy(arrays[n]).to(dev) for n in TENSORS}, **{n: info[n] for n in NUMBERS})
    return f, info["train_loss"], (info["top1"], info["top5"], info["val_loss"], torch.from_numpy(arrays["pred"]))

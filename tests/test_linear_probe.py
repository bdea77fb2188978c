"""The converged standard probe prototype (bench/linear_probe.py), against known answers: an independent solver's
optimum, perfectly separable classes the project's Adam probe leaves far from solved, exact scale invariance, and the
check that flags a concept head beating the probe."""
import numpy as np
import pytest
import torch

from bench.linear_probe import concept_beats_probe, fit_converged_probe, standardiser


def three_classes(offset, n=300, n_val=150, dim=16, seed=0):
    """Means 8 sd apart in a random 3-d subspace, every feature offset by ``offset`` sd: separable to 100 %."""
    rng = np.random.default_rng(seed)
    means = 8 / np.sqrt(2) * np.linalg.qr(rng.normal(size=(dim, dim)))[0][:3]
    def split(m):
        y = rng.integers(0, 3, m)
        return (offset + means[y] + rng.normal(size=(m, dim))).astype(np.float32), y
    return split(n) + split(n_val)


def test_the_solution_is_the_penalised_optimum_an_independent_solver_finds():
    from sklearn.linear_model import LogisticRegression
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 6)) * [1, 2, 3, 0.5, 4, 1] + 5
    y = (x[:, 0] - 0.5 * x[:, 1] + rng.normal(size=400) > 5).astype(int) + (x[:, 2] > 6)
    rows = np.arange(400)
    p = fit_converged_probe(x, y, rows[:320], rows[320:], 3, priors=(10.0,), tol=1e-6)
    assert p.converged and p.weight_decay == pytest.approx(10.0 / 320)
    z = (x[:320] - x[:320].mean(0)) / x[:320].std(0)
    # sklearn minimises C * sum CE + |W|^2 / 2, i.e. mean CE + |W|^2 / (2 C n): C = 1 / prior
    ref = LogisticRegression(C=1 / 10.0, tol=1e-12, max_iter=10000).fit(z, y[:320])
    np.testing.assert_allclose(p.weight.numpy().T - p.weight.numpy().T.mean(0), ref.coef_ - ref.coef_.mean(0),
                               atol=1e-4)
    assert (p.predict(x).numpy() == ref.predict((x - x[:320].mean(0)) / x[:320].std(0))).all()


def test_separable_classes_far_from_zero_are_solved():
    from utils.heads import LinearProbes, Split, fit
    x, y, xv, yv = three_classes(offset=100.0)
    split = Split(torch.arange(270), torch.arange(270, 300), 0)
    p = fit_converged_probe(x, y, split.train, split.dev, 3)
    assert (p.predict(xv).numpy() == yv).mean() == 1.0 and p.converged
    # the project's probe (Adam, lrs 1e-3 and 1e-2, 30 epochs of batch 256) on the same rows stays near chance
    probes = LinearProbes(16, 3, 2, [0, 0])
    res = fit(probes, [1e-3, 1e-2], torch.as_tensor(x), torch.as_tensor(y), torch.as_tensor(xv), torch.as_tensor(yv),
              epochs=30, batch_size=256, splits=[split], desc="adam")
    assert max(res["top1"]) < 60


@pytest.mark.parametrize("k", [0.1, 10.0, 1e3])
def test_scale_and_offset_leave_every_prediction_unchanged(k):
    x, y, xv, yv = three_classes(offset=3.0, n=600, n_val=300)
    x[:, 0] += 4 * np.random.default_rng(2).normal(size=len(x))     # overlap so that predictions can differ
    xv[:, 0] += 4 * np.random.default_rng(3).normal(size=len(xv))
    rows = np.arange(600)
    base = fit_converged_probe(x, y, rows[:540], rows[540:], 3)
    moved = fit_converged_probe(x * k - 7.0, y, rows[:540], rows[540:], 3)
    assert moved.weight_decay == base.weight_decay
    assert (moved.predict(xv * k - 7.0) == base.predict(xv)).all()
    np.testing.assert_allclose(moved.weight.numpy(), base.weight.numpy(), atol=5e-3)


def test_standardiser_uses_the_rows_given_and_leaves_constant_features_alone():
    x = torch.tensor([[1.0, 5.0], [3.0, 5.0], [5.0, 5.0]], dtype=torch.float64)
    mean, scale = standardiser(x)
    assert mean.tolist() == [3.0, 5.0] and scale[0] == pytest.approx(np.sqrt(8 / 3)) and scale[1] == 1.0


def test_a_head_that_beats_the_probe_by_more_than_its_interval_is_flagged():
    rng = np.random.default_rng(0)
    probe = rng.random(2000) < 0.6
    better = probe | (rng.random(2000) < 0.2)          # right wherever the probe is, and on ~8 % more
    same = probe.copy()
    noisy = np.where(rng.random(2000) < 0.02, ~probe, probe)   # differs on 2 % of samples, both ways
    out = concept_beats_probe(probe, np.stack([better, same, noisy]), n_boot=500)
    assert [o["flagged"] for o in out] == [True, False, False]
    assert out[0]["difference"] == pytest.approx(100 * (better.mean() - probe.mean()))
    assert out[1]["interval"] == [0.0, 0.0]
    assert out[2]["interval"][0] < out[2]["difference"] < out[2]["interval"][1]

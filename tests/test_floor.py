"""The random-concept floor (utils/floor.py) with known answers: planted features whose class lives on the concept
directions give a lift whose interval is above 0, random directions in place of the concepts give one that holds 0;
the floor rows are keyed, reproducible, and leave the concept rows exactly as a floorless run trains them; the
scoring equals the IIS rule applied by hand and the paired bootstrap computed independently."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from utils import floor, stats, store
from utils.errors import UserError
from utils.iis import iis, load_predictions, score_with_stats

D, C = 32, 4


def write_planted(root, kind, seed=0, k=24):
    """Train 2000 / val 1000 of D-dim features, C classes, and K element embeddings. kind 'carry': class c adds 2 on
    axis c (nothing else tells the classes apart) and the elements are noisy copies of those axes; 'random': class
    c adds a dense random mean (every direction carries a little) and the elements are isotropic Gaussian vectors,
    drawn as the floor draws its directions."""
    rng = np.random.default_rng(seed)
    mu = rng.standard_normal((C, D)) * 2.0 / np.sqrt(D)
    info = {"classes": [f"c{i}" for i in range(C)],
            "backbone": dict(name="planted", arch="planted", weights="none", layer="x", pooling="avg")}
    for name, n in (("train", 2000), ("val", 1000)):
        y = rng.integers(0, C, n)
        x = rng.standard_normal((n, D))
        if kind == "carry":
            x[np.arange(n), y] += 2.0
        else:
            x += mu[y]
        store.write(str(root / name), {"features": x.astype(np.float32), "labels": y, "indices": np.arange(n)},
                    {"backbone": {"arch": "planted"}, "data": {"split": name, "kind": kind, "seed": seed}}, info)
    if kind == "carry":
        emb, lab = np.repeat(np.eye(D)[:C], k // C, 0) + 0.1 * rng.standard_normal((k, D)), np.repeat(np.arange(C), k // C)
    else:
        emb, lab = rng.standard_normal((k, D)), np.arange(k) % C
    store.write(str(root / "elements"), {"features": emb.astype(np.float32), "labels": lab},
                {"backbone": {"arch": "planted"}, "data": {"elements": kind, "seed": seed}}, {"classes": info["classes"]})


def train(root, out, *extra, k=24):
    cmd = [sys.executable, "-m", "IP_training.IP_Prototype_training", "--train_features", str(root / "train"),
           "--val_features", str(root / "val"), "--concepts", str(root / "elements"), "--n_concepts", str(k),
           "--epochs", "10", "--ratios", "0", "0.5", "0.9", "--out", str(out), *extra]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def scored(out):
    r = subprocess.run([sys.executable, "iis_computing.py", str(out)], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / "iis.json") as f:
        return json.load(f), r.stdout


def results(out):
    with open(out / "results.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def carry(tmp_path_factory):
    root = tmp_path_factory.mktemp("carry")
    write_planted(root, "carry")
    train(root, root / "run")
    return root


def test_concepts_that_carry_the_class_lift_above_the_floor(carry):
    s, out = scored(carry / "run")
    f = s["floor"]
    assert f["kind"] == "iso" and f["draws"] == 3 and f["paired_seeds"] == [0, 0, 0]   # the iis protocol's 3
    assert f["lift"] == pytest.approx(s["iis"] - f["iis"])
    assert f["lift"] > 0.05 and f["lift_interval"][0] > 0 and f["verdict"] == ">"
    assert f["interval"][0] < f["iis"] < f["interval"][1]
    assert "concept lift: planted@x prototype: IIS - floor = +" in out and "the concepts beat random directions" in out


def test_random_directions_as_concepts_have_no_lift(tmp_path):
    write_planted(tmp_path, "random")
    train(tmp_path, tmp_path / "run")
    s, out = scored(tmp_path / "run")
    f = s["floor"]
    assert f["lift_interval"][0] < 0 < f["lift_interval"][1] and f["verdict"] == "="
    assert abs(f["lift"]) < 0.05
    assert "no detectable lift" in out


def test_floor_rows_are_keyed_reproducible_and_leave_the_concept_rows_alone(carry, tmp_path):
    with_floor = results(carry / "run")
    rows = [r for r in with_floor["runs"] if r["head"] == "floor"]
    assert sorted({r["draw"] for r in rows}) == [0, 1, 2] and len(rows) == 3 * 3 * 2   # draws x ratios x lrs
    assert with_floor["key"]["floor"] == {"draws": 3, "kind": "iso", "stream": floor.STREAM}
    again = train(carry, carry / "run")                     # same key: nothing is trained again
    assert "up to date" in again.stdout
    shutil.rmtree(carry / "train.fits")                     # trained again, not read from the shared fits
    train(carry, tmp_path / "again")                        # a fresh folder: the same floor, row for row
    assert results(tmp_path / "again")["runs"] == with_floor["runs"]
    train(carry, tmp_path / "none", "--floor_draws", "0")
    none = results(tmp_path / "none")
    assert "floor" not in none["key"] and none["meta"]["floor"] is None
    assert none["runs"] == [r for r in with_floor["runs"] if r["head"] != "floor"]
    s, out = scored(tmp_path / "none")
    assert s["floor"] is None and "concept lift" not in out
    train(carry, tmp_path / "one", "--floor_draws", "1")
    one = results(tmp_path / "one")
    assert one["key_hash"] != with_floor["key_hash"]
    fields = lambda rs: [(r["ratio"], r["lr"], r["seed"], r["top1"], r["select_top1"], r["epoch"]) for r in rs]  # noqa
    assert fields(r for r in one["runs"] if r["head"] == "floor") == fields(r for r in rows if r["draw"] == 0)
    s, _ = scored(tmp_path / "one")
    assert "one floor draw" in s["floor"]["note"]


def test_the_reference_protocol_trains_no_floor_unless_asked(carry, tmp_path):
    train(carry, tmp_path / "ref", "--protocol", "reference", "--epochs", "3")
    assert not any(r["head"] == "floor" for r in results(tmp_path / "ref")["runs"])


def test_floor_score_is_the_iis_rule_and_the_paired_bootstrap(carry):
    res = results(carry / "run")
    preds = load_predictions(res, str(carry / "run"))
    s, samples = score_with_stats(res, preds, n_boot=200, boot_seed=3)
    f = floor.score(res, preds, s, samples, n_boot=200, boot_seed=3)
    pred, labels = preds
    acc = lambda r: 100.0 * np.mean(pred[r["pred_row"]] == labels)   # noqa: E731
    std = max((r for r in res["runs"] if r["head"] == "standard"),       # one converged probe: no lr
              key=lambda r: (r["select_top1"], -(r["lr"] or 0.0)))
    per_draw = []
    for d in range(3):      # by hand: per ratio the floor head of draw d with the best select_top1, over the probe
        best = [max((r for r in res["runs"] if r["head"] == "floor" and r["draw"] == d and r["ratio"] == q),
                    key=lambda r: (r["select_top1"], -r["lr"])) for q in (0.0, 0.5, 0.9)]
        per_draw.append(iis([0.0, 0.5, 0.9], [acc(r) for r in best], acc(std)))
    assert f["per_draw"] == pytest.approx(per_draw) and f["iis"] == pytest.approx(np.mean(per_draw))
    # the val resamples are the run's own: with the draws not resampled, the lift's samples would be exactly
    # stats.paired_bootstrap's (both runs' heads stacked into one matrix)
    _, fsamples = score_with_stats(floor.view(res), preds, n_boot=200, boot_seed=3)
    direct = stats.paired_bootstrap(samples["correct"], samples["rows"], s["ratios"], fsamples["correct"],
                                    fsamples["rows"], s["ratios"], labels, n_boot=200, seed=3)
    mine = stats.compare(samples["samples"]["iis"], fsamples["samples"]["iis"], f["lift"], len(labels))
    assert mine["interval"] == pytest.approx(direct["interval"]) and mine["difference"] == pytest.approx(
        direct["difference"])
    # resampling the draws as well can only widen the interval here (the draws differ)
    assert f["lift_interval"][1] - f["lift_interval"][0] >= mine["interval"][1] - mine["interval"][0]


def test_random_directions_by_hand():
    a, b = floor.random_directions("iso", 0, 5, 7), floor.random_directions("iso", 0, 5, 7)
    assert a.shape == (5, 7) and a.dtype == np.float32 and np.array_equal(a, b)
    assert not np.array_equal(a, floor.random_directions("iso", 1, 5, 7))
    e = np.random.default_rng(0).standard_normal((4, 9)) + 3.0
    m = floor.random_directions("matched", 2, 6, 9, e).astype(np.float64)
    # matched: mean + a combination of the centred elements, so every direction lies in their affine span
    centred = e - e.mean(0)
    coef, *_ = np.linalg.lstsq(centred.T, (m - e.mean(0)).T, rcond=None)
    assert np.allclose(centred.T @ coef, (m - e.mean(0)).T, atol=1e-4)
    with pytest.raises(UserError):
        floor.random_directions("matched", 0, 3, 9, e[:1])
    assert floor.paired_seed([3, 7], 0) == 3 and floor.paired_seed([3, 7], 3) == 7


def test_bad_floor_flags_exit_2_with_one_line(carry, tmp_path):
    r = subprocess.run([sys.executable, "-m", "IP_training.IP_Prototype_training", "--train_features",
                        str(carry / "train"), "--val_features", str(carry / "val"), "--concepts",
                        str(carry / "elements"), "--floor_draws", "-1", "--out", str(tmp_path / "x")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --floor_draws must be 0 (no floor) or a number of draws, got -1"]


def test_the_report_carries_the_floor_and_lift_columns(carry, tmp_path):
    r = subprocess.run([sys.executable, "iis_computing.py", str(carry / "run"), "--report", str(tmp_path / "rep")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    s, _ = scored(carry / "run")
    f = s["floor"]
    with open(tmp_path / "rep" / "report.csv") as fh:
        head, row = [line.rstrip("\n").split(",") for line in fh][:2]
    got = dict(zip(head, row))
    for col, want in (("floor", f["iis"]), ("floor_std", f["iis_std"]), ("lift", f["lift"]),
                      ("lift_lo", f["lift_interval"][0]), ("lift_hi", f["lift_interval"][1]), ("lift_p", f["lift_p"])):
        assert float(got[col]) == pytest.approx(want, abs=5e-5), col
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "concept lift [95 % paired]" in md and f"{round(f['lift'], 4)} [{round(f['lift_interval'][0], 4)}" in md

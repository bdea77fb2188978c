"""Scale features: killed extractions resume to the same store, torchrun shards merge to the single-process result,
streamed features train like resident ones."""
import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO
from utils import store
from utils.heads import LinearProbes, SparseConceptHeads, fit


def extract_cmd(folder, out, *extra):
    return [sys.executable, "-m", "concept_extractor.dataset_feature_extractor", "--dataset", folder, "--split",
            "train", "--out", out, "--workers", "0", "--device", "cpu", *extra]


@pytest.mark.slow
def test_killed_extraction_resumes_to_the_same_store(image_folder, tmp_path):
    ref, out = str(tmp_path / "ref"), str(tmp_path / "resumed")
    args = ("--chunk_size", "1", "--batch_size", "1")
    assert subprocess.run(extract_cmd(image_folder, ref, *args), cwd=REPO, capture_output=True).returncode == 0
    p = subprocess.Popen(extract_cmd(image_folder, out, *args), cwd=REPO, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(glob.glob(out + ".partial-*/chunk_*.npz")) < 4 and time.time() < deadline and p.poll() is None:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the extraction finished before it could be killed"
    assert not os.path.exists(out) and store.read_meta(out) is None         # nothing half-written in place
    done = len(glob.glob(out + ".partial-*/chunk_*.npz"))
    assert 4 <= done < 18
    r = subprocess.run(extract_cmd(image_folder, out, *args), cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and f"{done} of 18 chunks already extracted" in r.stdout, r.stdout + r.stderr
    a, ma = store.read(ref)
    b, mb = store.read(out)
    assert ma["key_hash"] == mb["key_hash"]
    for name in ("features", "labels", "indices"):
        np.testing.assert_array_equal(a[name], b[name])
    assert not glob.glob(out + ".partial-*")                                # merged and cleaned up


@pytest.mark.slow
def test_torchrun_shards_merge_to_the_single_process_result(image_folder, tmp_path):
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    args = ("--chunk_size", "4", "--batch_size", "2")
    r = subprocess.run(extract_cmd(image_folder, single, *args), cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += extract_cmd(image_folder, multi, *args)[1:]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "[rank 1/2]" in r.stderr                                         # two processes did the work
    a, _ = store.read(single)
    b, _ = store.read(multi)
    np.testing.assert_array_equal(a["labels"], b["labels"])
    np.testing.assert_array_equal(a["indices"], b["indices"])
    np.testing.assert_allclose(a["features"], b["features"], rtol=1e-5, atol=1e-5)


def test_streamed_features_train_exactly_like_resident_ones(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 16, generator=g), torch.randint(0, 4, (300,), generator=g)
    x[y == 1] += 1.0
    store.write(str(tmp_path / "f"), {"features": x.numpy()}, {"k": 1})
    mm = store.read(str(tmp_path / "f"))[0]["features"]
    assert isinstance(mm, np.memmap)
    runs = []
    for xs in (x, mm):
        heads = SparseConceptHeads(torch.randn(6, 16, generator=torch.Generator().manual_seed(1)), 4, [0.0, 0.5])
        runs.append(fit(heads, [0.01, 0.01], xs, y, xs, y, epochs=3, batch_size=64))
    for k in ("top1", "epoch", "val_loss"):
        np.testing.assert_allclose(runs[0][k], runs[1][k])


def test_half_precision_features_match_float32_closely():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(400, 32, generator=g), torch.randint(0, 3, (400,), generator=g)
    x[torch.arange(400), y] += 2.0
    accs = [fit(LinearProbes(32, 3, 1), [0.05], x.to(dt), y, x.to(dt), y, epochs=10)["top1"][0]
            for dt in (torch.float32, torch.float16, torch.bfloat16)]
    assert max(accs) - min(accs) <= 1.0 and min(accs) > 80

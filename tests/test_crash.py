"""Crash consistency (issue 18): a stage killed at any of its file replacements leaves either its old output intact
or an output the next run rebuilds, never a mix (tests/killpoint.py kills it before its N-th os.replace/os.rename,
for every N the stage has); a full disk is one error line and nothing half-written."""
import errno
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from conftest import make_image_folder
from test_corruption import PROTO, file_digest, io_args, script, three_class_entries   # noqa: F401  (script: a fixture)
from utils import fileio, store
from utils.errors import UserError

KILL = "tests/killpoint.py"
RUN_FILES = ("heads.pt", "predictions.npz", "results.json")


def digests(folder, names=None):
    names = names or sorted(os.listdir(folder))
    return {n: file_digest(os.path.join(folder, n)) for n in names if os.path.isfile(os.path.join(folder, n))}


def killed_at(script, n, count, *argv, only=None):
    r = script(KILL, str(n), str(count), *(["--only", only] if only else []), *argv)
    return r, int(open(count).read())


@pytest.fixture(scope="module")
def entries(tmp_path_factory):
    ent = tmp_path_factory.mktemp("crash") / "entries"
    return three_class_entries(ent)


def test_training_killed_at_every_replacement_never_leaves_a_mixed_run(entries, script, tmp_path):
    """The issue's case: a finished 6-concept run, retrained with 9 concepts and killed at each replacement. The old
    command then finds its run intact (up to date) or retrains it; the new command always retrains to the very
    files a clean run writes."""
    def train(out, k, kill=0):
        # the kill points of the run folder alone: the fits shared beside the train entry (utils/fitcache.py) are
        # published by the first run that needs them (their own kill test is tests/test_fitcache.py); the floor
        # heads write no file of their own, so they are left out of this workload
        count = tmp_path / "count"
        r, n = killed_at(script, kill, count, *PROTO[:2], *PROTO[4:], "--n_concepts", str(k), "--floor_draws", "0",
                         *io_args(entries, out), only=str(out) + os.sep)
        return r, n
    clean = {}
    for k in (6, 9):
        r, n = train(tmp_path / f"clean{k}", k)
        assert r.returncode == 0, r.stderr[-2000:]
        clean[k] = digests(tmp_path / f"clean{k}", RUN_FILES)
    points = n
    assert points >= 3                       # heads.pt, predictions.npz, results.json at least
    seen = set()
    for kill in range(1, points + 1):
        out = tmp_path / f"k{kill}"
        shutil.copytree(tmp_path / "clean6", out)
        r, _ = train(out, 9, kill)
        assert r.returncode == -9, (kill, r.returncode, r.stderr[-1500:])
        old = digests(out, RUN_FILES)
        r, _ = train(out, 6)                 # the old command
        assert r.returncode == 0, r.stderr[-2000:]
        if "is up to date" in r.stdout:
            assert old == clean[6], kill     # said up to date: the folder was the old run, whole
            seen.add("intact")
        else:
            assert "unfinished run" in r.stdout, r.stdout[-1500:]
            seen.add("retrained")
        assert digests(out, RUN_FILES) == clean[6], kill
        assert not [f for f in os.listdir(out) if ".tmp-" in f], os.listdir(out)
        r, _ = train(out, 9)                 # and the new one
        assert r.returncode == 0 and "up to date" not in r.stdout, r.stdout[-1500:]
        assert digests(out, RUN_FILES) == clean[9], kill
    assert seen == {"intact", "retrained"}   # both outcomes occur: the kill points were really hit


EXTRACT = ["-m", "concept_extractor.dataset_feature_extractor", "--model_config", "efficientnet_lite0",
           "--backbone", "timm:test_efficientnet", "--weights", "none", "--split", "val", "--workers", "0",
           "--device", "cpu", "--batch_size", "9", "--chunk_size", "9"]


def entry_files(path):
    return digests(path) if os.path.isdir(path) else None


def test_extraction_killed_at_every_replacement_resumes_or_keeps_the_old_entry(script, tmp_path):
    """An entry of 6 images, re-extracted for all 9 and killed at its chunk write, at the swap of the old entry aside
    and at the merge's rename: the old command then finds its entry intact or rebuilds it, the new one always ends
    with the bytes of a clean run, and no temp folder survives."""
    folder = make_image_folder(str(tmp_path / "shapes"), n_train=1, n_val=3, size=24)

    def extract(out, n, kill=0):
        return killed_at(script, kill, tmp_path / "count", *EXTRACT, "--dataset", folder, "--out", str(out),
                         *(["--max_images", str(n)] if n else []))
    clean = {}
    for n in (6, None):
        r, points = extract(tmp_path / f"clean{n}", n)
        assert r.returncode == 0, r.stderr[-2000:]
        clean[n] = entry_files(tmp_path / f"clean{n}")
    points += 1                                   # over an existing entry: one more rename (the old one aside)
    seen = set()
    for kill in range(1, points + 1):
        out = tmp_path / f"k{kill}" / "val"
        shutil.copytree(tmp_path / "clean6", out)
        r, _ = extract(out, None, kill)
        assert r.returncode == -9, (kill, r.returncode, r.stderr[-1500:])
        before = entry_files(out)
        r, _ = extract(out, 6)                    # the old command
        assert r.returncode == 0, r.stderr[-2000:]
        if "is up to date" in r.stdout:
            assert before == clean[6], kill
            seen.add("intact")
        else:
            seen.add("rebuilt")
        assert entry_files(out) == clean[6], kill
        r, _ = extract(out, None)                 # the new command: resumes its chunks or starts afresh
        assert r.returncode == 0 and "up to date" not in r.stdout, r.stdout[-1500:]
        assert entry_files(out) == clean[None], kill
        assert sorted(os.listdir(out.parent)) == ["val"], os.listdir(out.parent)
    assert seen == {"intact", "rebuilt"}


def bmp_folder(root, seed):
    """A 2-class ImageFolder val split of uncompressed BMPs: other pixels give files of the very same size."""
    rng = np.random.default_rng(seed)
    from PIL import Image
    for c in ("a", "b"):
        os.makedirs(os.path.join(root, "val", c), exist_ok=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(
                os.path.join(root, "val", c, f"{i}.bmp"))
    return root


def test_an_edited_image_is_noticed_by_size_and_mtime_and_a_same_stat_edit_by_verify(script, tmp_path):
    """The issue's case (every image regenerated under its old name) re-extracts, saying why; an edit that keeps
    size and mtime (as `touch -r` does) is the documented limit: only --verify, which reads the bytes, finds it."""
    folder, out = bmp_folder(str(tmp_path / "imgs"), 0), tmp_path / "f"
    args = [*EXTRACT, "--dataset", folder, "--out", str(out)]
    assert script(*args).returncode == 0
    first = store.read(str(out))[0]["features"].copy()
    bmp_folder(folder, 1)                                      # same names, other pixels
    r = script(*args)
    assert r.returncode == 0 and "was made from other inputs (data.files changed): rebuilding it" in r.stdout, r.stdout
    second = store.read(str(out))[0]["features"].copy()
    assert not np.array_equal(first, second)

    victim = os.path.join(folder, "val", "b", "1.bmp")
    st = os.stat(victim)
    data = bytearray(open(victim, "rb").read())
    data[-10:] = bytes(255 - x for x in data[-10:])            # other pixels, same size
    open(victim, "wb").write(bytes(data))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))      # and the old modification time
    assert "is up to date" in script(*args).stdout             # the limit: a same-size, same-mtime edit passes
    r = script(*args, "--verify")
    assert r.returncode == 0 and "its images' bytes changed since it was extracted" in r.stdout, r.stdout
    third = store.read(str(out))[0]["features"]
    assert not np.array_equal(third[-1], second[-1]) and np.array_equal(third[:-1], second[:-1])
    r = script(*args, env={"IIS_VERIFY": "1"})
    assert "is up to date" in r.stdout, r.stdout              # the digest recorded by the re-extraction matches


# ---------------------------------------------------------------------------------------------------------------------
# a full disk and a file-size limit
# ---------------------------------------------------------------------------------------------------------------------
class FullDisk:
    """``open`` for the store module whose files accept ``room`` bytes in all, then fail with ENOSPC."""

    def __init__(self, room):
        self.room = room

    def __call__(self, path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        if "w" not in mode:
            return f
        disk, write = self, f.write

        def limited(data):
            n = memoryview(data).nbytes if not isinstance(data, str) else len(data)
            if n > disk.room:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
            disk.room -= n
            return write(data)
        f.write = limited
        return f


def chunked_entry(tmp_path, rows=40, dim=64):
    partial = str(tmp_path / "e.partial")
    for c in range(4):
        store.write_chunk(partial, c, {"features": np.full((rows // 4, dim), c, np.float32),
                                       "labels": np.arange(rows // 4)})
    return partial


@pytest.mark.parametrize("room", [100, 6000])   # fails in the first array, in the second
def test_a_full_disk_during_the_merge_is_one_error_and_leaves_the_old_entry(tmp_path, monkeypatch, room):
    out = str(tmp_path / "e")
    store.write(out, {"features": np.ones((3, 2), np.float32)}, {"old": 1})
    before = digests(out)
    partial = chunked_entry(tmp_path)
    monkeypatch.setattr(store, "open", FullDisk(room), raising=False)
    with pytest.raises(UserError) as e:
        store.merge_chunks(partial, out, 4, {"new": 1})
    msg = str(e.value)
    assert msg.startswith("no space left writing ") and str(tmp_path / "e.tmp-") in msg and "bytes needed" in msg, msg
    assert digests(out) == before                                # the old entry, untouched
    assert sorted(os.listdir(tmp_path)) == ["e", "e.partial"]    # no temp folder; the chunks stay for the rerun
    monkeypatch.undo()
    store.merge_chunks(partial, out, 4, {"new": 1})
    assert store.read(out)[0]["features"].shape == (40, 64)


def test_too_little_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    partial, out = chunked_entry(tmp_path), str(tmp_path / "e")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 5000))
    with pytest.raises(UserError, match=r"no space left writing .*/e \(10,560 bytes needed, 5,000 bytes free on "):
        store.merge_chunks(partial, out, 4, {"new": 1})
    assert sorted(os.listdir(tmp_path)) == ["e.partial"]


def test_a_file_size_limit_during_extraction_is_one_error_line(tmp_path):
    """Under `ulimit -f` (EFBIG) the extractor says which file it was writing, on its own line after the progress
    bar, exit 2, and leaves no temp or empty partial folder."""
    import resource
    import subprocess
    import sys
    from conftest import REPO
    folder = make_image_folder(str(tmp_path / "shapes"), n_train=1, n_val=3, size=24)
    out = tmp_path / "out" / "val"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    r = subprocess.run([sys.executable, *EXTRACT, "--dataset", folder, "--out", str(out)], cwd=REPO, text=True,
                       capture_output=True, preexec_fn=limit, timeout=300)
    errors = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert r.returncode == 2 and len(errors) == 1 and errors[0].startswith("error: file too large writing "), r.stderr
    assert ".partial-" in errors[0] and "bytes needed" in errors[0] and "ulimit -f" in errors[0], errors[0]
    print(errors[0])
    assert not os.path.exists(out.parent) or os.listdir(out.parent) == [], os.listdir(out.parent)


# ---------------------------------------------------------------------------------------------------------------------
# element libraries and report folders
# ---------------------------------------------------------------------------------------------------------------------
def tree(root):
    """{relative path: sha256} of every file under ``root`` (None when it does not exist)."""
    if not os.path.isdir(root):
        return None
    return {os.path.relpath(os.path.join(d, f), root): file_digest(os.path.join(d, f)) for d, _, fs in os.walk(root)
            for f in fs}


def check_killed_at_every_point(script, tmp_path, old_args, new_args, out, name, expect=("intact", "rebuilt"),
                                only=None):
    """Clean runs of both commands; then, for every kill point N of the new command run over the old output: the
    old command afterwards finds its output intact (up to date) or rebuilds it to the clean bytes, and the new
    command always ends with its clean bytes, leaving no stray temp folder."""
    clean = {}
    for which, args in (("old", old_args), ("new", new_args)):
        r, points = killed_at(script, 0, tmp_path / "count", *args(tmp_path / f"clean_{which}"), only=only)
        assert r.returncode == 0, r.stderr[-2000:]
        clean[which] = tree(tmp_path / f"clean_{which}" / out)
    outcomes = set()
    for kill in range(1, points + 2):              # + 1: the swap of the old folder aside
        base = tmp_path / f"k{kill}"
        shutil.copytree(tmp_path / "clean_old", base)
        r, _ = killed_at(script, kill, tmp_path / "count", *new_args(base), only=only)
        if r.returncode == 0:                      # fewer points than N: nothing left to kill
            assert tree(base / out) == clean["new"]
            continue
        assert r.returncode == -9, (kill, r.returncode, r.stderr[-1500:])
        before = tree(base / out)
        r = script(*old_args(base))
        assert r.returncode == 0, r.stderr[-2000:]
        outcomes.add("intact" if before == clean["old"] else "rebuilt")
        assert tree(base / out) == clean["old"], (name, kill)
        r = script(*new_args(base))
        assert r.returncode == 0, r.stderr[-2000:]
        assert tree(base / out) == clean["new"], (name, kill)
        strays = [f for d, ds, fs in os.walk(base) for f in ds + fs if ".tmp-" in f or ".old-" in f]
        assert not strays, (name, kill, strays)
    assert outcomes == set(expect), outcomes


def same_library(a, b):
    """Two libraries hold the same files, byte for byte, but for how many classes a resumed build found finished
    (index.json's ``classes_resumed``: the one thing that says a build was resumed) and the command recorded (it
    names the folder built)."""
    def without_resumed(d):
        if isinstance(d, dict):
            return {k: without_resumed(v) for k, v in d.items() if k not in ("classes_resumed", "command")}
        return [without_resumed(v) for v in d] if isinstance(d, list) else d
    ta, tb = tree(a), tree(b)
    index = [k for k in ta if k.endswith("index.json")]
    return {k: v for k, v in ta.items() if k not in index} == {k: v for k, v in tb.items() if k not in index} and \
        set(index) == {k for k in tb if k.endswith("index.json")} and \
        all(without_resumed(json.load(open(os.path.join(a, k)))) == without_resumed(json.load(open(os.path.join(b, k))))
            for k in index)


def test_library_building_killed_at_every_replacement(script, tmp_path):
    images = make_image_folder(str(tmp_path / "shapes"), n_train=2, n_val=1, size=24)

    def patches(per_class):
        return lambda base: ["-m", "concept_extractor.patch_extractor", "--images", os.path.join(images, "train"),
                             "--images_per_class", str(per_class), "--image_size", "32", "--out_size", "16",
                             "--workers", "1", "--grids", "2", "--out_dir", str(base / "lib")]
    # a finished library is never rebuilt in place (runs may point at it: issue 19): another build over it is one
    # error line and leaves it byte-identical; a build killed at any replacement resumes to the clean bytes
    r, points = killed_at(script, 0, tmp_path / "count", *patches(1)(tmp_path / "clean"))
    assert r.returncode == 0, r.stderr[-2000:]
    clean = tree(tmp_path / "clean" / "lib")
    r = script(*patches(2)(tmp_path / "clean"))
    assert r.returncode == 2 and r.stderr.count("error:") == 1 and "finished library" in r.stderr, r.stderr[-1500:]
    assert tree(tmp_path / "clean" / "lib") == clean
    assert points >= 2
    for kill in range(1, points + 1):
        base = tmp_path / f"k{kill}"
        r, _ = killed_at(script, kill, tmp_path / "count", *patches(1)(base))
        assert r.returncode == -9, (kill, r.returncode, r.stderr[-1500:])
        r = script(*patches(1)(base))
        assert r.returncode == 0, r.stderr[-2000:]
        assert same_library(base / "lib", tmp_path / "clean" / "lib"), kill
        strays = [f for d, ds, fs in os.walk(base) for f in ds + fs if ".tmp-" in f or ".old-" in f]
        assert not strays, (kill, strays)


def test_report_killed_at_every_replacement(script, tmp_path, entries):
    runs = tmp_path / "runs"
    for k in (6, 9):
        r = script(*PROTO[:2], *PROTO[4:], "--n_concepts", str(k), *io_args(entries, runs / f"r{k}"))
        assert r.returncode == 0, r.stderr[-2000:]

    def report(names):
        return lambda base: ["iis_computing.py", *[str(runs / n) for n in names], "--report", str(base / "report"),
                             "--bootstrap", "0"]
    # only the report folder's own replacements (each run's iis.json is one atomic file write): keeps the test short
    check_killed_at_every_point(script, tmp_path, report(["r6"]), report(["r6", "r9"]), "report", "report",
                                only=os.sep + "report")


def test_advice_about_a_damaged_entry_names_a_command_that_rebuilds_it(script, tmp_path):
    """A NaN planted in a finished entry looks current to the extractor (its structure is sound); the trainers'
    message says to rerun with --force, and --force does re-extract it."""
    from utils import sweep
    folder = make_image_folder(str(tmp_path / "shapes"), n_train=1, n_val=3, size=24)
    out = tmp_path / "f"
    args = [*EXTRACT, "--dataset", folder, "--out", str(out)]
    assert script(*args).returncode == 0
    clean = entry_files(out)
    a = np.load(out / "features.npy", mmap_mode="r+")
    a[2, 3] = np.nan
    a.flush()
    del a
    with pytest.raises(UserError, match=r"row 2, column 3 is nan.*re-extract it: cd ") as refused:
        sweep.load_split(str(out))
    assert "is up to date" in script(*args).stdout
    cmd = str(refused.value).split("re-extract it: ", 1)[1]       # the command recorded in the entry, + --force
    assert cmd.endswith(" --force") and "-m concept_extractor.dataset_feature_extractor" in cmd, cmd
    r = subprocess.run(cmd, shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "up to date" not in r.stdout, r.stdout + r.stderr[-2000:]
    assert entry_files(out) == clean
    sweep.load_split(str(out))

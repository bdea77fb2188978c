"""The corruption table (issue 13): each stage input x each way an input goes bad. The real scripts run as a user runs
them: a good run first, then the input is damaged and the same command reruns into the same --out. Every case must
exit with code 2, print exactly one `error:` line naming the damaged entry (and what is wrong with it), and leave the
previous output byte-identical. Without the checks most of these reruns would print "up to date" (the entries' keys
do not change) or a traceback."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, make_image_folder
from utils import fileio, store, validate
from utils.errors import UserError

CLASSES = ["blue", "green", "red"]          # make_image_folder's classes, sorted as ImageFolder sorts them
D = 8
BACKBONE = {"name": "synthetic", "arch": "-", "weights": "-", "layer": "-", "pooling": "-"}
TRAIN = ["--ratios", "0", "0.5", "--lrs", "0.01", "--epochs", "1", "--batch_size", "32", "--device", "cpu"]
PROTO = ["-m", "IP_training.IP_Prototype_training", "--n_concepts", "6", *TRAIN]
TEXT = ["-m", "IP_training.IP_Text_training", "--proj_epochs", "2", "--clip_cutoff", "0",
        "--interpretability_cutoff", "-1", *TRAIN]


def run(*args, env=None):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=None if env is None else {**os.environ, **env})


# Each refused case is a real process running the real script's __main__ (its own exit status, stderr and stdout), but
# forked from a driver that has imported torch and the project once: `python -m ...` would spend about 1 s of CPU per
# case importing torch, minutes over the table. The driver never runs a torch op, so forking it is safe. Set
# IIS_TEST_EXEC=1 to run every case with a plain `python ...` instead (same assertions).
ZYGOTE = r"""
import io, json, os, runpy, sys, traceback
import numpy, torch, PIL.Image, utils.store, utils.sweep, utils.heads, utils.concepts, utils.explanations, utils.report
import utils.backbones, utils.data, utils.text, matplotlib
for line in sys.stdin:
    job = json.loads(line)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.environ.update(job["env"])
            for fd, name in ((1, "stdout"), (2, "stderr")):
                f = os.open(job[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(f, fd)
                os.close(f)
            sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
            sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
            argv = job["argv"]
            try:
                if argv[0] == "-m":
                    sys.argv = [argv[1], *argv[2:]]
                    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
                else:
                    sys.argv = list(argv)
                    runpy.run_path(argv[0], run_name="__main__")
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if e.code is not None and not isinstance(e.code, int):
                    print(e.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
                code = 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class Zygote:
    def __init__(self, tmp):
        self.tmp, self.n = tmp, 0
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], cwd=REPO, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def run(self, *args, env=None):
        self.n += 1
        files = {k: os.path.join(self.tmp, f"case{self.n}.{k}") for k in ("stdout", "stderr")}
        self.proc.stdin.write(json.dumps({"argv": list(args), "env": env or {}, **files}) + "\n")
        self.proc.stdin.flush()
        rc = json.loads(self.proc.stdout.readline())["rc"]
        out, err = (open(files[k]).read() for k in ("stdout", "stderr"))
        return subprocess.CompletedProcess(args, rc, out, err)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    """run(*args, env=None) -> CompletedProcess of one script run in its own process."""
    if os.environ.get("IIS_TEST_EXEC") == "1" or not hasattr(os, "fork"):
        yield run
        return
    z = Zygote(str(tmp_path_factory.mktemp("zygote")))
    yield z.run
    z.close()


def planted(n, seed, dim=D, labels=None):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(CLASSES), n) if labels is None else np.asarray(labels)
    means = np.random.default_rng(99).normal(size=(len(CLASSES), dim)) * 2
    return (means[y] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32), y.astype(np.int64)


def write_split(path, x, y, split, info, clip=False):
    key = {"split": split} if clip else {"backbone": BACKBONE, "data": split}
    store.write(str(path), {"features": x, "labels": y, "indices": np.arange(len(y), dtype=np.int64)}, key, info)


def file_digest(path):
    """sha256 of a file's bytes; of a JSON file, without the command it records (utils/cli.command: it names the
    folder the run wrote to, and the clean runs compared with write to other folders). All the rest is compared."""
    data = open(path, "rb").read()
    if path.endswith(".json"):
        obj = json.loads(data)
        for d in (obj, obj.get("meta"), obj.get("info")) if isinstance(obj, dict) else ():
            if isinstance(d, dict):
                d.pop("command", None)
        data = json.dumps(obj, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


def three_class_entries(ent):
    """Train (60), val (9) and concept (12, 4 per class) entries of planted 3-class features under ``ent``: the
    small workload the kill-point and shared-fit tests train on."""
    info = {"classes": ["blue", "green", "red"], "backbone": {"name": "synthetic", "arch": "-", "weights": "-",
                                                               "layer": "-", "pooling": "-"}}
    write_split(ent / "train", *planted(60, 0), "train", info)
    write_split(ent / "val", *planted(9, 1), "val", info)
    write_split(ent / "concepts", *planted(12, 2, labels=np.repeat(np.arange(3), 4)), "concepts", info)
    return ent


def snapshot(path):
    """Every file under ``path`` (relative name -> bytes)."""
    out = {}
    for d, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                out[os.path.relpath(os.path.join(d, f), path)] = fh.read()
    return out


def one_error_line(r, *fragments):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, (r.returncode, r.stdout[-1500:], r.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    print(lines[0])          # shown with pytest -s: the table of messages
    return lines[0]


# --------------------------------------------------------------------------------------------------------------------
# good inputs and good outputs, made once
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("corruption")
    folder = make_image_folder(str(root / "shapes"), n_train=2, n_val=3, size=24)
    info = {"classes": CLASSES, "backbone": BACKBONE, "dataset": folder, "split": "val"}
    ent = root / "entries"
    write_split(ent / "train", *planted(60, 0), "train", info)
    write_split(ent / "val", *planted(9, 1, labels=[0, 0, 0, 1, 1, 1, 2, 2, 2]), "val", info)  # = the folder's val
    write_split(ent / "concepts", *planted(12, 2, labels=np.repeat(np.arange(3), 4)), "concepts", info)
    # CLIP entries: image features (the same images as the backbone's) and 4 unit text features
    rng = np.random.default_rng(5)
    for split, n in (("train", 60), ("val", 9)):
        y = store.read(str(ent / split))[0]["labels"]
        c = rng.normal(size=(n, 4)).astype(np.float32)
        write_split(ent / "clip" / split, c / np.linalg.norm(c, axis=1, keepdims=True), np.asarray(y), split, info,
                    clip=True)
    text = np.random.default_rng(6).normal(size=(10, 4)).astype(np.float32)    # 10 concepts
    store.write(str(ent / "clip" / "text"), {"features": text / np.linalg.norm(text, axis=1, keepdims=True)},
                {"t": 1}, {"concepts": [f"concept {i}" for i in range(10)]})

    outs = root / "outputs"
    r = run(*PROTO, *io_args(ent, outs / "prototype"))
    assert r.returncode == 0, r.stderr[-3000:]
    r = run(*TEXT, *io_args(ent, outs / "text", text=True))
    assert r.returncode == 0, r.stderr[-3000:]
    r = run("explain.py", str(outs / "prototype"), "--index", "4", "--ratio", "0.5", "--out", str(outs / "explain"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.isfile(outs / "explain" / "explain_val4.html")
    return root


def io_args(ent, out, text=False):
    return ["--train_features", str(ent / "train"), "--val_features", str(ent / "val"),
            *(["--clip", str(ent / "clip")] if text else ["--concepts", str(ent / "concepts")]), "--out", str(out)]


def case_copy(base, tmp_path, output):
    """Copies of the good entries and of one good output; the output's results.json points at the copies."""
    shutil.copytree(base / "entries", tmp_path / "entries")
    out = tmp_path / output
    shutil.copytree(base / "outputs" / output, out)
    if output == "explain":   # explain reads the run's recorded val entry: give it a run that points at the copy
        shutil.copytree(base / "outputs" / "prototype", tmp_path / "run")
        res = json.load(open(tmp_path / "run" / "results.json"))
        res["meta"]["inputs"] = {k: str(tmp_path / "entries" / k) for k in ("train", "val", "concepts")}
        fileio.atomic_write_json(str(tmp_path / "run" / "results.json"), res)
    return tmp_path / "entries", out


# --------------------------------------------------------------------------------------------------------------------
# corruptions of a store entry: each returns the fragments its error line must contain
# --------------------------------------------------------------------------------------------------------------------
def _npy(entry, name):
    return os.path.join(entry, f"{name}.npy")


def _labels_or_features(entry):
    return "labels" if os.path.exists(_npy(entry, "labels")) else "features"


def truncated(entry):
    path = _npy(entry, "features")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2 + 64)     # keeps the header: the size check, not the header parser, must catch it
    return ["'features'", "truncated", f"is {size // 2 + 64} bytes, expected {size}"]


def header_flipped(entry):
    with open(_npy(entry, "features"), "r+b") as f:
        f.seek(12)
        b = bytearray(f.read(6))
        f.seek(12)
        f.write(bytes(x ^ 0xFF for x in b))
    return ["'features'", "not a valid .npy file"]


def no_meta(entry):
    os.remove(os.path.join(entry, "meta.json"))
    return ["not a finished store entry (no meta.json)"]


def no_array(entry):
    name = _labels_or_features(entry)
    os.remove(_npy(entry, name))
    return [f"array '{name}': {name}.npy is missing"]


def _set(entry, name, index, value):
    a = np.load(_npy(entry, name), mmap_mode="r+")
    a[index] = value
    a.flush()
    del a


def nan(entry):
    _set(entry, "features", (5, 2), np.nan)
    return ["'features' row 5, column 2 is nan"]


def inf(entry):
    _set(entry, "features", (7, 1), np.inf)
    _set(entry, "features", (8, 0), np.nan)          # a later bad row: the first one is reported
    return ["'features' row 7, column 1 is inf"]


def label_n_classes(entry):
    _set(entry, "labels", 3, len(CLASSES))
    return ["'labels' row 3 is 3, outside [0, 3)"]


def label_minus_one(entry):
    _set(entry, "labels", 2, -1)
    return ["'labels' row 2 is -1, outside [0, 3)"]


def _rewrite(entry, **change):
    """The entry rewritten under its own key (so its key hash, and a trainer's run key, do not change)."""
    arrays, meta = store.read(entry)
    arrays = {n: np.array(a) for n, a in arrays.items()}
    arrays.update(change)
    store.write(entry, arrays, meta["key"], meta["info"])


def zero_rows(entry):
    _rewrite(entry, **{n: np.array(a)[:0] for n, a in store.read(entry)[0].items()})
    return ["the split is empty (0 rows)"]


def other_dim(entry):
    x = store.read(entry)[0]["features"]
    _rewrite(entry, features=np.ones((len(x), D - 2), np.float32))
    return [f"features are {D - 2}-d, expected {D}-d"]


CORRUPTIONS = [truncated, header_flipped, no_meta, no_array, nan, inf, label_n_classes, label_minus_one, zero_rows,
               other_dim]
ROWS = [(inp, c) for inp in ("train", "val", "concepts") for c in CORRUPTIONS
        if not (c is other_dim and inp == "train")]   # the train entry sets the dimension the others must match


def check_refused(r, entry, fragments, out, before, tmp_path, listing):
    line = one_error_line(r, str(entry), *fragments)
    assert snapshot(out) == before                       # the previous output is untouched
    assert sorted(os.listdir(tmp_path)) == listing      # and nothing was written beside it
    return line


@pytest.mark.parametrize("inp,corrupt", ROWS, ids=[f"{i}-{c.__name__}" for i, c in ROWS])
def test_prototype_training_refuses(base, script, tmp_path, inp, corrupt):
    ent, out = case_copy(base, tmp_path, "prototype")
    before, listing = snapshot(out), sorted(os.listdir(tmp_path))
    fragments = corrupt(str(ent / inp))
    r = script(*PROTO, *io_args(ent, out))
    check_refused(r, ent / inp, fragments, out, before, tmp_path, listing)


TEXT_ROWS = [("clip/train", c) for c in CORRUPTIONS if c is not other_dim] + \
            [("clip/text", c) for c in (truncated, header_flipped, no_meta, no_array, nan, inf)]


@pytest.mark.parametrize("inp,corrupt", TEXT_ROWS, ids=[f"{i}-{c.__name__}" for i, c in TEXT_ROWS])
def test_text_training_refuses(base, script, tmp_path, inp, corrupt):
    """The text path's own inputs (its train/val backbone entries go through the same load_split as above)."""
    ent, out = case_copy(base, tmp_path, "text")
    before, listing = snapshot(out), sorted(os.listdir(tmp_path))
    fragments = corrupt(str(ent / inp))
    r = script(*TEXT, *io_args(ent, out, text=True))
    check_refused(r, ent / inp, fragments, out, before, tmp_path, listing)


def indices_outside(entry):
    _set(entry, "indices", 6, 9)                 # the image folder's val split has 9 images
    return ["'indices' row 6 is 9, outside [0, 9) (the ", " val split has 9 images)"]


@pytest.mark.parametrize("corrupt", CORRUPTIONS + [indices_outside], ids=lambda c: c.__name__)
def test_explain_refuses(base, script, tmp_path, corrupt):
    ent, out = case_copy(base, tmp_path, "explain")
    before, listing = snapshot(out), sorted(os.listdir(tmp_path))
    fragments = corrupt(str(ent / "val"))
    r = script("explain.py", str(tmp_path / "run"), "--index", "4", "--ratio", "0.5", "--out", str(out))
    check_refused(r, ent / "val", fragments, out, before, tmp_path, listing)


def test_good_copies_pass(base, script, tmp_path):
    """The control: the same reruns on undamaged copies succeed (trainers: "up to date", outputs unchanged)."""
    ent, out = case_copy(base, tmp_path, "prototype")
    before = snapshot(out)
    r = script(*PROTO, *io_args(ent, out))
    assert r.returncode == 0 and "up to date" in r.stdout and r.stderr.strip() == "", r.stderr
    assert snapshot(out) == before
    shutil.copytree(base / "outputs" / "text", tmp_path / "text")
    r = script(*TEXT, *io_args(ent, tmp_path / "text", text=True))
    assert r.returncode == 0 and "up to date" in r.stdout, r.stderr


def test_digest_catches_a_changed_finite_value_on_request(base, script, tmp_path):
    """A finite value changed in place passes every content check; --verify (or IIS_VERIFY=1) re-hashes the arrays
    and refuses the entry."""
    ent, out = case_copy(base, tmp_path, "prototype")
    before = snapshot(out)
    _set(str(ent / "concepts"), "features", (3, 3), 1.5)
    assert "up to date" in script(*PROTO, *io_args(ent, out)).stdout
    for r in (script(*PROTO, *io_args(ent, out), "--verify"),
              script(*PROTO, *io_args(ent, out), env={"IIS_VERIFY": "1"})):
        one_error_line(r, str(ent / "concepts"), "array 'features': content digest", "differs")
    assert snapshot(out) == before


def test_the_issues_one_nan_case(script, tmp_path):
    """Issue 13's report: one NaN in 4 000 x 512 train features used to train to chance and score IIS = 0.98."""
    info = {"classes": [str(c) for c in range(10)], "backbone": BACKBONE}
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(4000, 512)).astype(np.float32), rng.integers(0, 10, 4000)
    x[1234, 77] = np.nan
    write_split(tmp_path / "train", x, y, "train", info)
    write_split(tmp_path / "val", *(rng.normal(size=(500, 512)).astype(np.float32), rng.integers(0, 10, 500)),
                "val", info)
    out = tmp_path / "run"
    r = script(*PROTO, "--train_features", str(tmp_path / "train"), "--val_features", str(tmp_path / "val"),
            "--concepts", str(tmp_path / "val"), "--out", str(out))
    one_error_line(r, str(tmp_path / "train"), "'features' row 1234, column 77 is nan")
    assert not os.path.exists(out) and sorted(os.listdir(tmp_path)) == ["train", "val"]


# --------------------------------------------------------------------------------------------------------------------
# the element library index (input of visual_element_emb_extractor): checked before the backbone is even loaded
# --------------------------------------------------------------------------------------------------------------------
def write_library(root):
    elements = []
    for c, name in enumerate(CLASSES):
        os.makedirs(root / name, exist_ok=True)
        for i in range(2):
            Image.new("RGB", (16, 16), (40 * c, 80, 200 - 40 * i)).save(root / name / f"{i}.png")
            elements.append({"file": f"{name}/{i}.png", "label": c, "class": name})
    fileio.atomic_write_json(str(root / "index.json"), {"schema": 1, "classes": CLASSES, "elements": elements})


def index_truncated(lib):
    p = lib / "index.json"
    p.write_bytes(p.read_bytes()[:40])
    return ["index.json is not valid JSON"]


def index_flipped(lib):
    p = lib / "index.json"
    b = bytearray(p.read_bytes())
    b[0] ^= 0xFF
    p.write_bytes(bytes(b))
    return ["index.json is not valid JSON"]


def index_missing(lib):
    os.remove(lib / "index.json")
    return ["no element library at", "(no index.json)"]


def element_missing(lib):
    os.remove(lib / "green" / "1.png")
    return ["element 3: its image 'green/1.png' is missing"]


def _edit_index(lib, f):
    index = json.loads((lib / "index.json").read_text())
    f(index)
    fileio.atomic_write_json(str(lib / "index.json"), index)


def index_label_n_classes(lib):
    _edit_index(lib, lambda ix: ix["elements"][4].update(label=3))
    return ["element 4 has label 3, outside [0, 3)"]


def index_label_minus_one(lib):
    _edit_index(lib, lambda ix: ix["elements"][1].update(label=-1))
    return ["element 1 has label -1, outside [0, 3)"]


def index_empty(lib):
    _edit_index(lib, lambda ix: ix.update(elements=[]))
    return ["index.json lists no elements"]


INDEX_CORRUPTIONS = [index_truncated, index_flipped, index_missing, element_missing, index_label_n_classes,
                     index_label_minus_one, index_empty]
EMB = ["-m", "concept_extractor.visual_element_emb_extractor", "--workers", "0", "--device", "cpu",
       "--batch_size", "8"]


@pytest.fixture(scope="module")
def element_entry(tmp_path_factory):
    root = tmp_path_factory.mktemp("elements")
    write_library(root / "lib")
    r = run(*EMB, "--elements", str(root / "lib"), "--out", str(root / "emb"))
    assert r.returncode == 0, r.stderr[-3000:]
    return root


@pytest.mark.parametrize("corrupt", INDEX_CORRUPTIONS, ids=lambda c: c.__name__)
def test_element_embedding_refuses(element_entry, script, tmp_path, corrupt):
    check_element_embedding_refuses(element_entry, script, tmp_path, corrupt)


def check_element_embedding_refuses(element_entry, script, tmp_path, corrupt):
    """A copy of the element library damaged by ``corrupt``: the element-embedding extractor refuses it in one line
    naming what ``corrupt`` returns, and leaves its output entry and the folder as they were."""
    shutil.copytree(element_entry / "lib", tmp_path / "lib")
    shutil.copytree(element_entry / "emb", tmp_path / "emb")
    before, listing = snapshot(tmp_path / "emb"), sorted(os.listdir(tmp_path))
    fragments = corrupt(tmp_path / "lib")
    r = script(*EMB, "--elements", str(tmp_path / "lib"), "--out", str(tmp_path / "emb"))
    check_refused(r, tmp_path / "lib", fragments, tmp_path / "emb", before, tmp_path, listing)


# --------------------------------------------------------------------------------------------------------------------
# the store itself
# --------------------------------------------------------------------------------------------------------------------
def test_chunked_and_whole_writes_record_the_same_digest(tmp_path):
    x = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    y = np.arange(10, dtype=np.int64)
    store.write(str(tmp_path / "whole"), {"features": x, "labels": y, "indices": y}, {"k": 1})
    partial = store.partial_dir(str(tmp_path / "chunked"), {"k": 1})
    for c, rows in enumerate((slice(0, 4), slice(4, 8), slice(8, 10))):
        store.write_chunk(partial, c, {"features": x[rows], "labels": y[rows]})
    store.merge_chunks(partial, str(tmp_path / "chunked"), 3, {"k": 1}, extra={"indices": y})
    whole, chunked = (store.read_meta(str(tmp_path / n)) for n in ("whole", "chunked"))
    assert whole["digests"] == chunked["digests"] and set(whole["digests"]) == {"features", "labels", "indices"}
    assert whole["digests"]["features"] == validate.array_digest(x) != validate.array_digest(x + 1)
    store.read(str(tmp_path / "chunked"), verify=True)          # passes
    _set(str(tmp_path / "chunked"), "labels", 9, 8)
    with pytest.raises(UserError, match="array 'labels': content digest"):
        store.read(str(tmp_path / "chunked"), verify=True)


def test_a_damaged_entry_is_not_current_so_it_is_rebuilt(tmp_path, capsys):
    path = str(tmp_path / "e")
    store.write(path, {"features": np.zeros((4, 2), np.float32)}, {"k": 1})
    assert store.is_current(path, {"k": 1})
    truncated(path)
    assert not store.is_current(path, {"k": 1})
    assert "truncated" in capsys.readouterr().out


def test_meta_shape_or_dtype_differing_from_the_file(tmp_path):
    path = str(tmp_path / "e")
    store.write(path, {"features": np.zeros((4, 2), np.float32)}, {"k": 1})
    meta = store.read_meta(path)
    for spec, found in (([[4, 3], "float32"], "found [4, 2] float32"), ([[4, 2], "float64"], "found [4, 2] float32")):
        meta["arrays"]["features"] = spec
        fileio.atomic_write_json(os.path.join(path, "meta.json"), meta)
        with pytest.raises(UserError, match=rf"array 'features': expected .* \(meta.json\), {re.escape(found)}"):
            store.read(path)


def test_large_arrays_are_checked_block_by_block(monkeypatch):
    """Blocks smaller than the array: the first bad row is still found exactly, in a later block."""
    monkeypatch.setattr(validate, "BLOCK_BYTES", 64)
    x = np.zeros((100, 4), np.float32)
    x[57, 3], x[90, 0] = -np.inf, np.nan
    with pytest.raises(UserError, match=r"row 57, column 3 is -inf"):
        validate.check_finite("E", "features", x)
    y = np.zeros(100, np.int64)
    y[88] = 5
    with pytest.raises(UserError, match=r"row 88 is 5, outside \[0, 5\)"):
        validate.check_labels("E", "labels", y, 5)
    assert len(list(validate.blocks(x))) == 25

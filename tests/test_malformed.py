"""Issue 18's malformed inputs, one parametrised row each: the real script reruns over a damaged input and must exit
2 with exactly one `error:` line naming the file and what is wrong, leaving its previous output byte-identical. Where
the damaged file is the stage's own output (results.json, index.json), the rerun rebuilds it instead."""
import json
import os
import struct
import zlib

import pytest
import torch

from test_corruption import (PROTO, base, case_copy, check_element_embedding_refuses, check_refused,  # noqa: F401
                             element_entry, io_args, one_error_line, script, snapshot)
from utils import fileio


def _meta(entry, change):
    p = os.path.join(entry, "meta.json")
    meta = json.load(open(p))
    change(meta)
    fileio.atomic_write_json(p, meta)


def key_missing(e):
    _meta(e, lambda m: m.pop("key"))
    return ["meta.json: 'key' is missing, expected an object"]


def key_wrong_type(e):
    _meta(e, lambda m: m.update(key="resnet50"))
    return ["meta.json: 'key' is a string, expected an object"]


def key_backbone_missing(e):
    _meta(e, lambda m: m["key"].pop("backbone"))
    return ["meta.json: 'key.backbone' is missing, expected an object"]


def info_missing(e):
    _meta(e, lambda m: m.pop("info"))
    return ["meta.json: 'info' is missing, expected an object"]


def info_wrong_type(e):
    _meta(e, lambda m: m.update(info=["classes"]))
    return ["meta.json: 'info' is a list, expected an object"]


def info_backbone_missing(e):
    _meta(e, lambda m: m["info"].pop("backbone"))
    return ["meta.json: 'info.backbone' is missing, expected an object"]


def digests_malformed(e):
    _meta(e, lambda m: m.update(digests=["sha256:00"]))
    return ["meta.json: 'digests' is malformed"]


def schema_unknown(e):
    _meta(e, lambda m: m.update(schema="v99-unknown"))
    return ["meta.json has schema 'v99-unknown'; this version reads schema 1"]


META = [key_missing, key_wrong_type, key_backbone_missing, info_missing, info_wrong_type, info_backbone_missing,
        digests_malformed, schema_unknown]


@pytest.mark.parametrize("corrupt", META, ids=lambda c: c.__name__)
def test_training_refuses_a_malformed_meta_json(base, script, tmp_path, corrupt):
    ent, out = case_copy(base, tmp_path, "prototype")
    before, listing = snapshot(out), sorted(os.listdir(tmp_path))
    fragments = corrupt(str(ent / "train"))
    r = script(*PROTO, *io_args(ent, out))
    check_refused(r, ent / "train", fragments, out, before, tmp_path, listing)


# ---------------------------------------------------------------------------------------------------------------------
# a run folder's own files
# ---------------------------------------------------------------------------------------------------------------------
def results_truncated(run):
    p = run / "results.json"
    p.write_bytes(p.read_bytes()[:100])
    return [f"{p} is damaged (not valid JSON"]


def results_schema(run):
    res = json.load(open(run / "results.json"))
    res["schema"] = "iis.results/99"
    fileio.atomic_write_json(str(run / "results.json"), res)
    return ["has schema 'iis.results/99'; this version reads schema 'iis.results/1' or 'iis.results/2'"]


def heads_bare_tensor(run):
    torch.save(torch.zeros(3), run / "heads.pt")
    return [f"{run} is an unfinished run (heads.pt is not the one its manifest records"]


def heads_list_unrecorded(run):      # a run written before manifests: the file itself is checked
    torch.save([1, 2], run / "heads.pt")
    res = json.load(open(run / "results.json"))
    del res["files"]
    fileio.atomic_write_json(str(run / "results.json"), res)
    return [f"{run / 'heads.pt'} holds list, not the trainer's dict of tensors"]


def predictions_swapped(run):
    p = run / "predictions.npz"
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 1
    p.write_bytes(bytes(b))
    return [f"{run} is an unfinished run (predictions.npz is not the one its manifest records"]


RUN_DAMAGE = [results_truncated, results_schema, heads_bare_tensor, heads_list_unrecorded, predictions_swapped]


@pytest.mark.parametrize("corrupt", RUN_DAMAGE, ids=lambda c: c.__name__)
def test_readers_refuse_a_damaged_run_and_training_rebuilds_it(base, script, tmp_path, corrupt):
    ent, out = case_copy(base, tmp_path, "explain")
    run = tmp_path / "run"
    good = snapshot(run)
    fragments = corrupt(run)
    before = snapshot(run)
    if corrupt is not heads_list_unrecorded:     # iis_computing never reads heads.pt
        one_error_line(script("iis_computing.py", str(run)), *fragments)
    r = script("explain.py", str(run), "--index", "4", "--ratio", "0.5", "--out", str(out))
    one_error_line(r, *fragments)
    assert snapshot(run) == before
    r = script(*PROTO, *io_args(ent, run))       # the advice: rerun the training command; it retrains
    assert r.returncode == 0 and "retraining it" in r.stdout and "up to date" not in r.stdout, r.stdout[-2000:]
    assert snapshot(run)["heads.pt"] == good["heads.pt"]
    assert json.load(open(run / "results.json"))["runs"] == json.loads(good["results.json"])["runs"]


# ---------------------------------------------------------------------------------------------------------------------
# element libraries
# ---------------------------------------------------------------------------------------------------------------------
def _index(lib, change):
    ix = json.load(open(lib / "index.json"))
    change(ix)
    fileio.atomic_write_json(str(lib / "index.json"), ix)


def path_escapes(lib):
    _index(lib, lambda ix: ix["elements"][2].update(file="../../../../etc/passwd"))
    return ["element 2: its path '../../../../etc/passwd' is not a normalised relative path inside the library"]


def path_absolute(lib):
    _index(lib, lambda ix: ix["elements"][0].update(file=str(lib / "blue" / "0.png")))
    return ["element 0: its path", "is not a normalised relative path inside the library"]


def path_unnormalised(lib):
    _index(lib, lambda ix: ix["elements"][1].update(file="blue/../blue/1.png"))
    return ["element 1: its path 'blue/../blue/1.png' is not a normalised"]


def index_schema(lib):
    _index(lib, lambda ix: ix.update(schema=7))
    return ["index.json has schema 7; this version reads schema 1"]


@pytest.mark.parametrize("corrupt", [path_escapes, path_absolute, path_unnormalised, index_schema],
                         ids=lambda c: c.__name__)
def test_element_embedding_refuses_paths_outside_the_library(element_entry, script, tmp_path, corrupt):
    check_element_embedding_refuses(element_entry, script, tmp_path, corrupt)


def bomb_png(path, side=20000):
    """A PNG whose header claims side x side pixels (over twice PIL's decompression-bomb limit); no pixel data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                + chunk(b"IEND", b""))


PATCH = ["-m", "concept_extractor.patch_extractor", "--images_per_class", "2", "--image_size", "32",
         "--workers", "1"]


def test_a_library_skips_a_decompression_bomb_and_rebuilds_a_truncated_index(script, tmp_path):
    from conftest import make_image_folder
    folder = make_image_folder(str(tmp_path / "shapes"), n_train=2, n_val=1, size=24)
    bomb_png(os.path.join(folder, "train", "red", "001.png"))
    args = [*PATCH, "--images", os.path.join(folder, "train"), "--out_dir", str(tmp_path / "lib")]
    r = script(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    index = tmp_path / "lib" / "patches" / "index.json"
    summary = json.load(open(index))["summary"]
    assert summary["skipped_unreadable"] == 1 and "red/001.png: DecompressionBombError" in summary["skipped_files"][0]
    good = index.read_bytes()
    index.write_bytes(good[:50])                 # truncated: the rerun rebuilds (never "up to date", never a traceback)
    r = script(*args)
    assert r.returncode == 0 and "is damaged" in r.stdout and "rebuilding" in r.stdout, r.stdout + r.stderr
    rebuilt, first = json.load(open(index)), json.loads(good)
    assert rebuilt["summary"].pop("classes_resumed") == 3 and first["summary"].pop("classes_resumed") == 0
    assert rebuilt == first                      # the complete class folders were kept, the index written again


# ---------------------------------------------------------------------------------------------------------------------
# dataset extraction: unreadable images and checkpoints of the wrong kind
# ---------------------------------------------------------------------------------------------------------------------
EXTRACT = ["-m", "concept_extractor.dataset_feature_extractor", "--model_config", "efficientnet_lite0",
           "--backbone", "timm:test_efficientnet", "--split", "val", "--device", "cpu", "--batch_size", "3"]


def bare_tensor(path):
    torch.save(torch.zeros(3), path)
    return "holds Tensor, not a state dict of tensors"


def safetensors_header(path):
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 40) + b'{"w": {"dtype": "F32", "shape": [2')
    return "cannot read checkpoint"


@pytest.mark.parametrize("make,name", [(bare_tensor, "w.pt"), (safetensors_header, "w.safetensors")],
                         ids=["bare_tensor", "safetensors_header"])
def test_a_checkpoint_of_the_wrong_kind_is_one_line(script, tmp_path, make, name):
    from conftest import make_image_folder
    folder = make_image_folder(str(tmp_path / "shapes"), n_train=1, n_val=1, size=24)
    w = str(tmp_path / name)
    fragment = make(w)
    r = script(*EXTRACT, "--weights", w, "--dataset", folder, "--workers", "0", "--out", str(tmp_path / "f"))
    one_error_line(r, w, fragment)
    assert not os.path.exists(tmp_path / "f")


def damage_image(folder, damage, name="001.png"):
    bad = os.path.join(folder, "val", "green", name)
    if damage == "bomb":
        bomb_png(bad)
    else:
        with open(bad, "r+b") as f:
            f.truncate(60)


@pytest.mark.parametrize("damage", ["truncated", "bomb"])
def test_an_unreadable_dataset_image_under_strict_is_one_line_from_a_loader_worker(script, tmp_path, damage):
    from conftest import make_image_folder
    folder = make_image_folder(str(tmp_path / "shapes"), n_train=1, n_val=3, size=24)
    damage_image(folder, damage)
    r = script(*EXTRACT, "--weights", "none", "--dataset", folder, "--workers", "2", "--out", str(tmp_path / "f"),
               "--strict")
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error")]
    assert r.returncode == 2 and len(errors) == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "DataLoader worker" not in r.stderr, r.stderr[-3000:]
    assert "green/001.png) is unreadable (" + ("DecompressionBombError" if damage == "bomb" else "OSError") in errors[0]
    print(errors[0])
    assert not os.path.exists(tmp_path / "f")


@pytest.mark.parametrize("workers,decode", [(0, "pil"), (2, "pil"), (2, "gpu"), (0, "cache")])
def test_an_unreadable_dataset_image_is_skipped_counted_and_listed(script, tmp_path, workers, decode):
    """Two unreadable images of nine (a truncated PNG and a decompression bomb) are left out of every array, so the
    other seven rows are exactly what the folder without them gives (features, labels: no shift); the entry's info
    and the summary line name them, and the run's n_val is the seven rows present. --decode gpu on CPU takes the
    PIL path, cache the decoded copy (its rows keep a black image labelled -1)."""
    from conftest import make_image_folder
    from utils import store
    folder = make_image_folder(str(tmp_path / "shapes"), n_train=1, n_val=3, size=24)
    clean = make_image_folder(str(tmp_path / "clean"), n_train=1, n_val=3, size=24)
    damage_image(folder, "truncated", "001.png")
    damage_image(folder, "bomb", "002.png")
    for name in ("001.png", "002.png"):
        os.remove(os.path.join(clean, "val", "green", name))
    flags = ["--weights", "none", "--workers", str(workers), "--chunk_size", "4", "--decode", decode,
             "--decode_cache", str(tmp_path / "decoded")]
    r = script(*EXTRACT, *flags, "--dataset", folder, "--out", str(tmp_path / "f"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert ("(2 unreadable images skipped: green/001.png (OSError), green/002.png (DecompressionBombError); "
            "listed in its meta.json info; --strict stops on them instead)") in r.stdout, r.stdout
    ref = script(*EXTRACT, *flags, "--dataset", clean, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    got, meta = store.read(str(tmp_path / "f"))
    want, _ = store.read(str(tmp_path / "ref"))
    # classes sorted: blue 0-2, green 3-5, red 6-8; rows 4 and 5 (green/001, green/002) are gone
    assert list(got["labels"]) == [0, 0, 0, 1, 2, 2, 2] == list(want["labels"])
    assert list(got["indices"]) == [0, 1, 2, 3, 6, 7, 8]
    # equal up to float rounding (a batch of other shape), and each row nearest its own counterpart: aligned
    import numpy as np
    gf, wf = np.asarray(got["features"]), np.asarray(want["features"])
    assert np.allclose(gf, wf, rtol=1e-4, atol=1e-5), np.abs(gf - wf).max()
    dist = ((gf[:, None] - wf[None]) ** 2).sum(-1)
    assert list(dist.argmin(1)) == list(range(7)), dist
    assert meta["info"]["rows"] == 7
    assert meta["info"]["skipped"] == {"count": 2, "files": [
        {"file": "green/001.png", "row": 4, "error": "OSError"},
        {"file": "green/002.png", "row": 5, "error": "DecompressionBombError"}]}
    again = script(*EXTRACT, *flags, "--dataset", folder, "--out", str(tmp_path / "f"))
    assert again.returncode == 0 and "is up to date" in again.stdout, again.stdout + again.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------------------------
# iis.json, read back (utils/results.read_score: the fine-tune comparison's reader)
# ---------------------------------------------------------------------------------------------------------------------
GOOD_SCORED = {"schema": "iis.scored/1", "iis": 0.8, "standard_accuracy": 85.0, "ratios": [0.0, 0.1, 0.9],
               "accuracies": [85.0, 84.0, 75.0], "metric": "top1", "meta": {}, "results": "r/results.json"}
SCORED_DAMAGE = {
    "field_missing": (lambda s: s.pop("iis"), "'iis' is missing, expected a number"),
    "field_wrong_type": (lambda s: s.update(ratios="0.1 0.9"), "'ratios' is a string, expected a list"),
    "lengths_differ": (lambda s: s.update(accuracies=[85.0]), "'ratios' and 'accuracies' are not two number lists"),
    "schema_unknown": (lambda s: s.update(schema="iis.scored/99"), "has schema 'iis.scored/99' (written by another "
                                                                    "version); this version reads schema 'iis.scored/1'"),
    "schema_missing": (lambda s: s.pop("schema"), "has schema None (written by a version before iis.json had one)"),
    "not_json": (None, "is damaged (not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(SCORED_DAMAGE))
def test_a_malformed_iis_json_is_one_line_naming_it(script, tmp_path, case):
    change, fragment = SCORED_DAMAGE[case]
    run = tmp_path / "run"
    run.mkdir()
    s = json.loads(json.dumps(GOOD_SCORED))
    if change is None:
        (run / "iis.json").write_text(json.dumps(s)[:40])
    else:
        change(s)
        (run / "iis.json").write_text(json.dumps(s))
    (tmp_path / "m.tsv").write_text(f"plain\t0\t0\t{run}\n")
    before = snapshot(tmp_path)
    r = script("-m", "IP_training.IP_finetune_compare", str(tmp_path / "m.tsv"), "--out", str(tmp_path / "report"))
    one_error_line(r, str(run / "iis.json"), fragment, f"rerun iis_computing.py on the run to write it again: python iis_computing.py {run}")
    assert snapshot(tmp_path) == before


def test_a_good_iis_json_is_read(script, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "iis.json").write_text(json.dumps(GOOD_SCORED))
    (tmp_path / "m.tsv").write_text(f"plain\t0\t0\t{run}\n")
    r = script("-m", "IP_training.IP_finetune_compare", str(tmp_path / "m.tsv"), "--out", str(tmp_path / "report"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| plain | 0 | 0 | 85.00 | 0.8000 | 84.00 | 75.00 |" in (tmp_path / "report" / "finetune_compare.md").read_text()


def test_a_run_on_features_that_skipped_images_says_so_and_records_it(capsys):
    from types import SimpleNamespace
    from utils import sweep
    backbone = {"name": "m", "arch": "a", "weights": "none", "layer": "pre_logits", "pooling": "auto"}
    def meta(count):
        return {"key": {"data": {"n": 9}}, "info": {"backbone": backbone, "classes": ["a", "b"],
                                                    "skipped": {"count": count, "files": []}}}
    cfg = SimpleNamespace(protocol="iis", select_on="holdout", seeds=[0])
    m = sweep.run_meta(cfg, meta(0), meta(2), n_train=9, n_val=7)
    assert m["skipped_images"] == {"train": 0, "val": 2} and (m["n_train"], m["n_val"]) == (9, 7)
    assert "note: the features skip unreadable images (train 0, val 2" in capsys.readouterr().out
    assert "skipped_images" not in sweep.run_meta(cfg, meta(0), meta(0))

"""--force and --verify on every extractor and builder (one definition: utils/cli/flags.add_rebuild_args), and advice
that works: a "re-extract / rebuild / retrain" message quotes the command recorded in the output it is about, and that
command, run as printed (a shell line), fixes the state.

Each --force case first makes the damage invisible to the up-to-date check (a NaN or a garbled image with the file's
structure intact), so the rerun without --force says "up to date" and only --force restores the clean bytes."""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, make_image_folder
from test_corruption import EMB, PROTO, base, io_args, one_error_line, script  # noqa: F401
from test_crash import tree      # file digests; JSON files without the recorded command (it holds --force)
from utils import store

TINY = os.path.join(REPO, "tests", "assets", "tiny-clip.json")
PATCH = ["-m", "concept_extractor.patch_extractor", "--images_per_class", "2", "--image_size", "32", "--workers", "1"]
SEGMENT = ["-m", "concept_extractor.segment_extractor", "--images_per_class", "1", "--image_size", "32",
           "--workers", "1", "--n_segments", "4"]


def plant_nan(entry):
    a = np.load(os.path.join(entry, "features.npy"), mmap_mode="r+")
    a[0, 0] = np.nan
    a.flush()
    del a


def ok(r):
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    return r


def printed_command(line, lead):
    """The shell command a message gives after ``lead`` (it runs to the end of the line)."""
    assert lead in line, (lead, line)
    return line.split(lead, 1)[1]


def run_shell(cmd):
    return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=600, executable="/bin/bash")


# ---------------------------------------------------------------------------------------------------------------------
# --force per extractor and builder (the dataset extractor's: tests/test_crash.py, the advice test)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("force")
    folder = make_image_folder(str(root / "shapes"), n_train=2, n_val=1, size=24)
    ok(script_once(*PATCH, "--dataset", folder, "--out_dir", str(root / "lib")))
    return root, folder


def script_once(*args):
    from test_corruption import run
    return run(*args)


def test_element_embedding_force_re_extracts_an_entry_that_looks_current(library, script, tmp_path):
    root, _ = library
    args = [*EMB, "--elements", str(root / "lib" / "patches"), "--out", str(tmp_path / "emb")]
    ok(script(*args))
    clean = tree(tmp_path / "emb")
    assert json.load(open(tmp_path / "emb" / "meta.json"))["info"]["command"]["command"].endswith(
        "-m concept_extractor.visual_element_emb_extractor " + " ".join(args[2:]))
    plant_nan(tmp_path / "emb")
    assert "is up to date" in ok(script(*args)).stdout
    r = ok(script(*args, "--force"))
    assert "up to date" not in r.stdout
    assert tree(tmp_path / "emb") == clean


def test_element_embedding_verify_notices_an_element_image_edited_in_place(library, script, tmp_path):
    """The entry's key holds the index's digest, not the element images': an image re-saved with other pixels is
    "up to date" until --verify compares the images' bytes with the digest recorded at extraction."""
    root, _ = library
    shutil.copytree(root / "lib", tmp_path / "lib")
    lib = tmp_path / "lib" / "patches"
    args = [*EMB, "--elements", str(lib), "--out", str(tmp_path / "emb")]
    ok(script(*args))
    before = store.read(str(tmp_path / "emb"))[0]["features"].copy()
    first = json.load(open(lib / "index.json"))["elements"][0]["file"]
    Image.new("RGB", (224, 224), (250, 0, 250)).save(lib / first)
    assert "is up to date" in ok(script(*args)).stdout
    r = ok(script(*args, "--verify"))
    assert "its images' bytes changed since it was extracted" in r.stdout and "re-extracting it" in r.stdout
    after = store.read(str(tmp_path / "emb"))[0]["features"]
    assert not np.array_equal(before[0], after[0]) and np.array_equal(before[1:], after[1:])


@pytest.mark.parametrize("builder", [PATCH, SEGMENT], ids=["patch_extractor", "segment_extractor"])
def test_a_library_builder_force_rebuilds_a_library_that_looks_finished(script, tmp_path, builder):
    folder = make_image_folder(str(tmp_path / "shapes"), n_train=1, n_val=1, size=24)
    args = [*builder, "--dataset", folder, "--out_dir", str(tmp_path / "lib")]
    ok(script(*args))
    clean = tree(tmp_path / "lib")
    method = "patches" if builder is PATCH else "segments"
    first = json.load(open(tmp_path / "lib" / method / "index.json"))["elements"][0]["file"]
    Image.new("RGB", (8, 8), (0, 0, 0)).save(tmp_path / "lib" / method / first)    # a readable, wrong element
    assert "is up to date" in ok(script(*args)).stdout
    r = ok(script(*args, "--force"))
    assert "--force: rebuilding the library" in r.stdout
    assert tree(tmp_path / "lib") == clean


def test_a_library_verify_notices_a_source_image_edited_with_the_same_size_and_mtime(script, tmp_path):
    src = tmp_path / "imgs"
    for c, name in enumerate(("a", "b")):
        os.makedirs(src / name)
        for i in range(2):
            Image.new("RGB", (24, 24), (100 * c, 50 * i, 30)).save(src / name / f"{i}.bmp")
    args = [*PATCH, "--images", str(src), "--out_dir", str(tmp_path / "lib")]
    ok(script(*args))
    index = tmp_path / "lib" / "patches" / "index.json"
    before = index.read_bytes()
    edited = src / "a" / "0.bmp"
    st = os.stat(edited)
    Image.new("RGB", (24, 24), (1, 2, 3)).save(edited)              # same size (BMP), other pixels
    os.utime(edited, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.path.getsize(edited) == st.st_size
    assert "is up to date" in ok(script(*args)).stdout
    r = ok(script(*args, "--verify"))
    assert "its source images' bytes changed since it was built" in r.stdout and "rebuilding it" in r.stdout
    assert json.loads(index.read_bytes())["content_digest"] != json.loads(before)["content_digest"]
    assert "is up to date" in ok(script(*args, "--verify")).stdout


@pytest.mark.slow
def test_textual_extractor_force_re_extracts_its_entries(script, tmp_path):
    folder = make_image_folder(str(tmp_path / "shapes"), n_train=2, n_val=1, size=24)
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("red patch\ngreen patch\nblue patch\n")
    args = ["-m", "concept_extractor.textual_emb_extractor", "--concepts", str(concepts), "--dataset", folder,
            "--clip_model", TINY, "--clip_pretrained", "none", "--out", str(tmp_path / "clip"), "--workers", "0",
            "--device", "cpu"]
    ok(script(*args))
    clean = tree(tmp_path / "clip")
    for split in ("text", "train"):
        plant_nan(tmp_path / "clip" / split)
    assert ok(script(*args)).stdout.count("is up to date") == 3
    r = ok(script(*args, "--force"))
    assert "up to date" not in r.stdout
    assert tree(tmp_path / "clip") == clean


# ---------------------------------------------------------------------------------------------------------------------
# advice that works: the printed command, run as printed, fixes the state
# ---------------------------------------------------------------------------------------------------------------------
def test_a_missing_element_image_names_the_builder_command_that_restores_it(library, script, tmp_path):
    root, _ = library
    shutil.copytree(root / "lib", tmp_path / "lib")
    lib = tmp_path / "lib" / "patches"
    index = json.load(open(lib / "index.json"))
    os.remove(lib / index["elements"][3]["file"])
    args = [*EMB, "--elements", str(lib), "--out", str(tmp_path / "emb")]
    line = one_error_line(script(*args), "element 3: its image", "is missing; rebuild the element library: cd ")
    cmd = printed_command(line, "rebuild the element library: ")
    assert "-m concept_extractor.patch_extractor" in cmd and cmd.endswith(" --force")
    # the command was recorded in the original library's folder: it rebuilds that one; point it at the copy
    assert str(root / "lib") in cmd
    ok(run_shell(cmd.replace(str(root / "lib"), str(tmp_path / "lib"))))
    assert os.path.isfile(lib / index["elements"][3]["file"])
    ok(script(*args))


def test_an_unfinished_run_names_the_training_command_that_retrains_it(base, script, tmp_path):  # noqa: F811
    shutil.copytree(base / "entries", tmp_path / "entries")
    out = tmp_path / "run"
    ok(script(*PROTO, *io_args(tmp_path / "entries", out)))
    clean = tree(out)
    with open(out / "heads.pt", "ab") as f:
        f.write(b"\0")                                          # not the heads its manifest records
    line = one_error_line(script("iis_computing.py", str(out), "--bootstrap", "0"), "is an unfinished run",
                          "retrain it: cd ")
    ok(run_shell(printed_command(line, "retrain it: ")))
    assert tree(out) == clean
    ok(script("iis_computing.py", str(out), "--bootstrap", "0"))

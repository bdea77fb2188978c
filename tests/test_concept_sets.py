import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from utils.concept_sets import WordNet, filter_concepts


def write_mini_wordnet(d):
    """A five-synset WordNet in the real file format: car is a motor vehicle, has wheels and doors; a motor vehicle
    has an engine."""
    synsets = [("motor_vehicle", [("%p", "engine")]),
               ("car", [("@", "motor_vehicle"), ("%p", "wheel"), ("%p", "door")]),
               ("wheel", []), ("door", []), ("engine", [])]
    header = "  1 This is a test licence header line\n"
    # offsets are byte positions, and each line names other offsets: lay lines out with fixed-width fields twice
    offsets = {name: 0 for name, _ in synsets}
    for _ in range(2):
        pos, lines = len(header), []
        for name, ptrs in synsets:
            offsets[name] = pos
            p = " ".join(f"{sym} {offsets[t]:08d} n 0000" for sym, t in ptrs)
            line = f"{pos:08d} 06 n 01 {name} 0 {len(ptrs):03d} {p} | a {name.replace('_', ' ')}  \n"
            lines.append(line)
            pos += len(line.encode())
    (d / "data.noun").write_text(header + "".join(lines))
    (d / "index.noun").write_text(header + "".join(
        f"{name} n 1 0 1 0 {offsets[name]:08d}  \n" for name, _ in sorted(synsets)))
    return offsets


def test_wordnet_relations_from_a_planted_database(tmp_path):
    offsets = write_mini_wordnet(tmp_path)
    wn = WordNet(str(tmp_path))
    assert wn.concepts("car") == ["wheel", "door", "engine", "motor vehicle"]
    assert wn.concepts("Car") == wn.concepts(f"n{offsets['car']:08d}")      # ImageNet wnids look up directly
    assert wn.concepts("sports car") == wn.concepts("car")                  # falls back to the head word
    assert wn.concepts("unicorn") == []


def test_filters_drop_duplicates_long_and_class_name_copies():
    kept, dropped = filter_concepts({
        "cat": ["whiskers", "Whiskers ", "whisker", "cat ears", "cats", "a very long concept of many words", "",
                "pointed ears"],
        "dog": ["wet nose", "pointed ears", "dogs tail", "doge"]})
    assert kept == ["whiskers", "pointed ears", "wet nose"]
    assert dropped["whisker"] == "duplicate" and dropped["cat ears"] == "class name" and dropped["cats"] == "class name"
    assert dropped["a very long concept of many words"] == "too long" and dropped[""] == "empty"
    assert dropped["doge"] == "class name"                                 # near-copy of 'dog'


def test_builder_cli_from_json_and_wordnet(tmp_path):
    src = tmp_path / "labo.json"
    src.write_text(json.dumps({"airplane": ["wings", "airplane wing", "jet engine"], "ship": ["hull", "wings"]}))
    out = tmp_path / "c.txt"
    r = subprocess.run([sys.executable, "-m", "concept_extractor.concept_set_builder", "--from_json", str(src),
                        "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.read_text().split("\n")[:-1] == ["wings", "jet engine", "hull"]
    assert json.load(open(str(out) + ".dropped.json")) == {"airplane wing": "class name", "wings": "duplicate"}
    write_mini_wordnet(tmp_path)
    (tmp_path / "classes.txt").write_text("car\n")
    r = subprocess.run([sys.executable, "-m", "concept_extractor.concept_set_builder", "--from_wordnet", "--wordnet",
                        str(tmp_path), "--classes", str(tmp_path / "classes.txt"), "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.read_text().split("\n")[:-1] == ["wheel", "door", "engine", "motor vehicle"]


@pytest.mark.skipif(not os.path.isfile("/usr/share/wordnet/data.noun"), reason="Debian's wordnet-base not installed")
def test_real_wordnet_names_airplane_parts():
    concepts = WordNet().concepts("airplane")
    assert {"fuselage", "wing", "landing gear"} <= set(concepts)

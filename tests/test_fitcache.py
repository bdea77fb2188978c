"""The fits shared between runs of the same features (utils/fitcache.py): the converged probe and the floor are
computed once per train entry and reused by another concept type's run, which then writes the very bytes an uncached
run writes; a damaged, foreign or half-published cache entry is said and recomputed, never trusted; a cache that
cannot be written changes nothing but the note."""
import json
import os
import shutil

import pytest

from test_corruption import PROTO, file_digest, io_args, script, three_class_entries   # noqa: F401  (script: a fixture)

RUN_FILES = ("heads.pt", "predictions.npz", "results.json")
KILL = "tests/killpoint.py"


def digests(folder, names=None):
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            rel = os.path.relpath(os.path.join(d, f), folder)
            if names is None or rel in names:
                out[rel] = file_digest(os.path.join(d, f))      # a JSON file without the command it records
    return out


@pytest.fixture
def entries(tmp_path):
    ent = tmp_path / "entries"
    return three_class_entries(ent)


def train(script, entries, out, concept_type="prototype", *extra):
    r = script(*PROTO, "--concept_type", concept_type, "--floor_draws", "2", *extra, *io_args(entries, out))
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_a_second_concept_type_reuses_the_fits_and_writes_what_an_uncached_run_writes(script, entries, tmp_path):
    fits = entries / "train.fits"
    first = train(script, entries, tmp_path / "proto")
    assert "reused" not in first
    kinds = sorted(n.split("_")[0] for n in os.listdir(fits))
    assert kinds == ["floor", "probe"], kinds          # one probe fit (one seed), one floor (one K)
    cache = digests(fits)
    cached = train(script, entries, tmp_path / "cached", "cluster")
    assert "probe fit reused from" in cached and "floor fit reused from" in cached
    assert digests(fits) == cache                       # read, not rewritten
    shutil.rmtree(fits)
    uncached = train(script, entries, tmp_path / "uncached", "cluster")
    assert "reused" not in uncached
    assert digests(tmp_path / "cached", RUN_FILES) == digests(tmp_path / "uncached", RUN_FILES)
    assert digests(fits) == cache                       # the same fits, byte for byte
    # the reused probe is the prototype run's: its rows of results.json are the same
    rows = [[r for r in json.load(open(tmp_path / d / "results.json"))["runs"] if r["head"] != "concept"]
            for d in ("proto", "uncached")]
    assert rows[0] == rows[1] and len(rows[0]) == 1 + 2 * 2 * 1   # standard + draws x ratios x lrs


def test_a_damaged_cache_entry_is_recomputed_not_trusted_and_an_unwritable_one_costs_only_the_reuse(script, entries,
                                                                                                    tmp_path):
    train(script, entries, tmp_path / "clean")
    fits = entries / "train.fits"
    cache = digests(fits)
    probe = next(n for n in os.listdir(fits) if n.startswith("probe_"))
    floor_ = next(n for n in os.listdir(fits) if n.startswith("floor_"))
    for damage in ("array bytes", "meta.json", "foreign entry"):
        if damage == "array bytes":          # same size and header, one weight changed: only the digest tells
            p = fits / probe / "weight.npy"
            b = bytearray(p.read_bytes())
            b[-1] ^= 0x40
            p.write_bytes(bytes(b))
        elif damage == "meta.json":
            (fits / probe / "meta.json").write_text("{not json")
        else:                                 # the floor's entry under the probe's name
            shutil.rmtree(fits / probe)
            shutil.copytree(fits / floor_, fits / probe)
        out = train(script, entries, tmp_path / damage)
        assert "probe fit reused" not in out and "recomputing it" in out, (damage, out[-2000:])
        assert "floor fit reused" in out
        assert digests(tmp_path / damage, RUN_FILES) == digests(tmp_path / "clean", RUN_FILES), damage
        assert digests(fits) == cache, damage    # recomputed and put back whole
    shutil.rmtree(fits)
    fits.write_text("in the way")                # not a folder: nothing can be kept there
    out = train(script, entries, tmp_path / "blocked")
    assert "could not be kept for other runs" in out and "this run is unaffected" in out
    assert digests(tmp_path / "blocked", RUN_FILES) == digests(tmp_path / "clean", RUN_FILES)


def test_a_run_killed_while_publishing_a_fit_leaves_none_or_a_whole_one(script, entries, tmp_path):
    clean = tmp_path / "clean"
    train(script, entries, clean)
    cache = digests(entries / "train.fits")
    count = tmp_path / "count"
    for kill in (1, 2):                  # the probe's entry, then the floor's
        shutil.rmtree(entries / "train.fits")
        r = script(KILL, str(kill), str(count), "--only", ".fits", *PROTO, "--floor_draws", "2",
                   *io_args(entries, tmp_path / f"k{kill}"))
        assert r.returncode == -9, (kill, r.returncode, r.stderr[-1500:])
        left = digests(entries / "train.fits")
        assert all(".tmp-" in n or n in cache for n in left), left           # only whole entries or temp folders
        assert {n: d for n, d in left.items() if n in cache} == {n: cache[n] for n in left if n in cache}
        out = train(script, entries, tmp_path / f"k{kill}")
        assert digests(tmp_path / f"k{kill}", RUN_FILES) == digests(clean, RUN_FILES)
        assert digests(entries / "train.fits") == cache                   # strays gone, both entries whole
        assert ("probe fit reused" in out) == (kill == 2)

"""bench/profile_sweep.py times the trainer it profiles: every region it wraps is called by a real run (a renamed
function would silently drop out of the table), nested where it is called, and the trainer's outputs are written."""
import json
import os

from bench import profile_sweep


def test_profile_regions_cover_a_real_trainer_run(tmp_path):
    md = tmp_path / "profile.md"
    args = profile_sweep.get_args_parser().parse_args(
        ["--n_train", "400", "--n_val", "100", "--dim", "32", "--n_classes", "4", "--n_concepts", "12", "--epochs",
         "2", "--protocol", "iis", "--ops_epochs", "1", "--top_ops", "3", "--workdir", str(tmp_path), "--md", str(md)])
    profile_sweep.main(args)
    rows = {}
    for line in md.read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 5 and cells[1].isdigit():
            rows[line.split("|")[1].rstrip()] = int(cells[1])
    for fit in ("fit: standard probe", "fit: concept heads"):    # under iis the probe is utils/probe.py's solver
        assert rows[f"   {fit}"] == 1
    for region in ("batch rows", "forward", "cross-entropy", "backward", "Adam", "evaluate dev"):   # the heads' epochs
        assert rows.get(f"     {region}", 0) > 0, region
    assert rows["       top-k mask"] > 0                                 # inside the heads' forward
    assert rows["     evaluate val"] == 1                                 # holdout: val once, after training
    assert rows["   read + validate entries"] == 3 and rows["   write results"] == 1
    run = next(p for p in os.listdir(tmp_path) if p.startswith("run-"))
    with open(tmp_path / run / "results.json") as f:
        assert len(json.load(f)["runs"]) == 1 + 16                       # 1 converged probe, 8 ratios x 2 lrs
    assert "Operators by self CPU time" in md.read_text()

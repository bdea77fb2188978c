"""Reading a training run's results.json (schema in docs/files.md) the one way every reader does: the trainers'
up-to-date check (:func:`finished`), iis_computing.py and explain.py (:func:`read`); and the score iis_computing.py
wrote for the run with given settings (:func:`read_score`).

results.json is written last and names the digest of every other file of the run (``files``: heads.pt,
predictions.npz), so a folder whose files come from two trainings (a retrain killed between its replacements) is
seen as unfinished, never read as one run.
"""
import json
import os
import shlex

from .errors import UserError
from .fileio import check_manifest, check_schema, field_problem, json_type, read_json
from .layout import SCORE_DEFAULTS, score_names, score_settings
from .validate import forced

SCHEMAS = ("iis.results/1", "iis.results/2")
SCORED_SCHEMA = "iis.scored/1"          # iis.json (iis_computing.py), checked by read_score
# iis.json's fields a reader relies on, and their JSON types (None: null allowed)
SCORED_FIELDS = {"iis": (float, int), "standard_accuracy": (float, int), "ratios": list, "accuracies": list,
                 "metric": str, "meta": dict, "results": str}
RETRAIN = "rerun the training command that wrote it (an unfinished or damaged run is retrained, not reused)"
NOT_RESULTS = "give run folders or their results.json"


def results_path(path):
    return os.path.join(path, "results.json") if os.path.isdir(path) else path


def _problem(f, need_manifest):
    """(results dict or None, why it cannot be used or None, what to do about it)."""
    try:
        res = read_json(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        if os.path.basename(f) != "results.json":     # e.g. a plot caught by a glob: not a damaged run
            return None, f"{f} is not a results file (not JSON)", NOT_RESULTS
        return None, f"{f} is damaged (not valid JSON: {str(e).splitlines()[0][:80]})", RETRAIN
    try:
        check_schema(f, res, SCHEMAS)
    except UserError as e:
        return None, str(e), retrain(res)
    if not isinstance(res.get("runs"), list) or not isinstance(res.get("meta", {}), dict):
        return None, f"{f} is not a results file (no 'runs' list or no 'meta' object)", retrain(res)
    if "files" in res or need_manifest:
        why = check_manifest(os.path.dirname(f), res.get("files"))
        if why:
            return None, f"{os.path.dirname(f) or '.'} is an unfinished run ({why})", retrain(res)
    return res, None, None


def retrain(res):
    """How to retrain a run whose results.json holds ``res``: the training command its meta records (the trainer
    retrains an unfinished or damaged run by itself), or, when it records none, :data:`RETRAIN`."""
    meta = res.get("meta") if isinstance(res, dict) else None
    cmd = forced(meta.get("command"), force=False) if isinstance(meta, dict) else None
    return f"retrain it: {cmd}" if cmd else RETRAIN


def read(path, need_manifest=False):
    """The results dict of the run ``path`` (its folder or its results.json), checked: valid JSON, a schema this
    code reads, a ``runs`` list, and the files its manifest names as recorded (``need_manifest``: a results.json
    written before manifests were, with no ``files``, is refused too). Every failure is one :class:`UserError`."""
    f = results_path(path)
    if not os.path.isfile(f):
        raise UserError(f"no results.json at {path}: train the run first")
    res, why, todo = _problem(f, need_manifest)
    if why:
        raise UserError(f"{why}; {todo}")
    return res


def finished(out, key_hash):
    """True when the run folder ``out`` holds a finished run of ``key_hash``. A run of another key is simply not
    done; a damaged or unfinished one is said so in one line and is not done either (the trainer retrains it)."""
    f = results_path(out)
    if not os.path.exists(f):
        return False
    res, why, _ = _problem(f, need_manifest=False)
    if res is not None and res.get("key_hash") != key_hash:
        return False
    if not why and "files" not in res:
        why = f"{f} records no digests of the run's files (written before they were)"
    if why:
        print(f"{why}: retraining it")
        return False
    return True


def read_score(path, **settings):
    """The score (iis.json's content) that ``iis_computing.py RUN`` wrote with ``settings`` (metric, bootstrap,
    bootstrap_seed; the defaults: ``iis.json``), from the file those settings name (utils/layout.score_names) in the
    run folder ``path`` (or the score file itself), checked: valid JSON, the schema this code writes, each field
    readers use present with its type (ratios and accuracies numbers of one length), and the recorded settings those
    asked for. Every failure is one :class:`UserError` naming the file and what to do (score the run again)."""
    name, _ = score_names(**settings)
    f = os.path.join(path, name) if os.path.isdir(path) else path
    run = os.path.dirname(os.path.abspath(f))
    flags = "".join(f" --{k} {v}" for k, v in score_settings(**settings).items())
    todo = f"rerun iis_computing.py on the run to write it again: python iis_computing.py {shlex.quote(run)}{flags}"
    if not os.path.isfile(f):
        raise UserError(f"no score {name} in {path}: score it with python iis_computing.py {shlex.quote(path)}{flags}")
    try:
        s = read_json(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{f} is damaged (not valid JSON: {str(e).splitlines()[0][:80]}); {todo}") from None
    if isinstance(s, dict) and s.get("schema") != SCORED_SCHEMA:
        raise UserError(f"{f} has schema {s.get('schema')!r} (written by " +
                        ("a version before iis.json had one" if "schema" not in s else "another version") +
                        f"); this version reads schema {SCORED_SCHEMA!r}: {todo}")
    if not isinstance(s, dict):
        raise UserError(f"{f} is not a JSON object; {todo}")
    why = field_problem(s, SCORED_FIELDS)
    if why:
        raise UserError(f"{f}: {why}; {todo}")
    if len(s["ratios"]) != len(s["accuracies"]) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in s["ratios"] + s["accuracies"]):
        raise UserError(f"{f}: 'ratios' and 'accuracies' are not two number lists of one length; {todo}")
    recorded = s.get("score_settings") or {}
    if not isinstance(recorded, dict):
        raise UserError(f"{f}: 'score_settings' is {json_type(recorded)}, expected an object; {todo}")
    if score_settings(**{k: v for k, v in recorded.items() if k in SCORE_DEFAULTS}) != score_settings(**settings):
        raise UserError(f"{f} holds a score with other settings ({recorded or 'the defaults'}); score the run again "
                        f"with python iis_computing.py {shlex.quote(run)}{flags}")
    return s

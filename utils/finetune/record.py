"""finetune.json, the commit point of a fine-tuning run's folder (IP_training/IP_finetune.py), read the one way every
reader does, as utils/results.py reads a training run's results.json.

While a run trains, finetune.json is rewritten after every epoch with ``finished`` false (a progress log; a reader
refuses it). When the run ends it is written last, after the checkpoint and every ``--save_epochs`` checkpoint, with
``files``: the sha256 (prefix, utils/fileio.manifest) of each. A folder whose checkpoint was replaced after its
finetune.json (a run killed while it re-trained with other settings) is therefore seen as unfinished, never read as
one run."""
import json
import os

from ..errors import UserError
from ..fileio import check_manifest, check_schema, field_problem, read_json

NAME = "finetune.json"
SCHEMAS = ("iis.finetune/1",)
RETRAIN = "rerun the IP_finetune command that wrote it (an unfinished or damaged run is fine-tuned again, not reused)"
# field: the JSON types it must have in a finished record
TYPES = {"key": (dict,), "key_hash": (str,), "finished": (bool,), "settings": (dict,), "checkpoint": (str,),
         "epochs": (list,), "files": (dict,), "epoch_checkpoints": (dict,)}


def record_path(path):
    return os.path.join(path, NAME) if os.path.isdir(path) else path


def problem(f):
    """(record or None, why it cannot be used as a finished run, or None)."""
    try:
        info = read_json(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, f"{f} is damaged (not valid JSON: {str(e).splitlines()[0][:80]})"
    try:
        check_schema(f, info, SCHEMAS)
    except UserError as e:
        return None, str(e)
    if info.get("finished") is not True:
        return info, f"{os.path.dirname(f) or '.'} is an unfinished fine-tuning run (finished is not true)"
    if "files" not in info:
        return None, f"{f} records no digests of its checkpoints (written before they were)"
    why = field_problem(info, TYPES)
    if why:
        return None, f"{f} is malformed: {why}"
    if not all(isinstance(e, dict) and isinstance(e.get("epoch"), int) for e in info["epochs"]):
        return None, f"{f} is malformed: 'epochs' must hold one object with an integer 'epoch' per epoch"
    covered = [info["checkpoint"], *info["epoch_checkpoints"].values()]
    missing = [c for c in covered if c not in info["files"]]
    if missing:
        return None, f"{f} is malformed: its manifest ('files') does not cover {missing[0]}"
    why = check_manifest(os.path.dirname(f), info["files"])
    if why:
        return None, f"{os.path.dirname(f) or '.'} is an unfinished fine-tuning run ({why})"
    return info, None


def read(path):
    """The finished record of the run ``path`` (its folder or its finetune.json), checked: valid JSON, a schema this
    code reads, finished, the fields of their types, and every checkpoint it names as recorded. Every failure is one
    :class:`UserError`."""
    f = record_path(path)
    if not os.path.isfile(f):
        raise UserError(f"no {NAME} at {path}: fine-tune first (python -m IP_training.IP_finetune)")
    info, why = problem(f)
    if why:
        raise UserError(f"{why}; {RETRAIN}")
    return info


def finished(path, key_hash):
    """True when ``path`` holds a finished, intact run of ``key_hash``. A run of another key is simply not done; a
    damaged or unfinished one is said so in one line and is not done either (the trainer fine-tunes it again)."""
    f = record_path(path)
    if not os.path.exists(f):
        return False
    info, why = problem(f)
    if info is not None and info.get("key_hash") != key_hash:
        return False
    if why:
        print(f"{why}: fine-tuning it again")
        return False
    return True

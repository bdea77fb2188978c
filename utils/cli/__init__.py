"""The edge between a command line and the library: :func:`run` (how every script runs) and the typed configs made
from parsed flags (:func:`config`, :func:`backbone_spec`). The shared flags themselves are defined once, in
utils/cli/flags.py. Only scripts import this package; below it, nothing sees argparse or a parsed Namespace.
"""
import dataclasses
import os
import shlex
import sys

from ..errors import UserError
from ..specs import load_spec


def run(main, parser, dialect=None):
    """Parse flags, call ``main(args)`` and turn a :class:`UserError`, or an operating-system error (a missing or
    unreadable path, a full disk), into a one-line message and exit code 2.

    ``dialect`` (a stage script's ``compat.dialect(__file__)``) first translates the original code's flags and runs
    what they stand for (utils/compat.py); None reads the command line as this project's flags only.
    """
    if dialect is not None:
        parser.epilog = parser.epilog or dialect.help
    translation = None
    _COMMAND.update(argv=list(sys.argv), main=getattr(sys.modules.get("__main__"), "__spec__", None))
    try:
        argv = sys.argv[1:]
        if dialect is not None:
            translation = dialect.translate(argv)
            argv = translation.argv
        args = parser.parse_args(argv)
        if translation is not None:
            translation.prepare(args)
        main(args)
    except (UserError, OSError) as e:     # OSError: "[Errno 2] No such file or directory: 'x'" says it all
        print(f"error: {e}{translation.note if translation is not None else ''}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; finished stages are kept, the unfinished one left nothing behind", file=sys.stderr)
        sys.exit(130)
    finally:
        _COMMAND.clear()


_COMMAND = {}        # the command line :func:`run` was started with


def command():
    """The command line this script was run with (by :func:`run`), to record in what it builds so that advice to
    rebuild it can quote it: {"command": shell-quoted (the interpreter, then ``-m`` and the module for a script run
    as one), "cwd": where it ran (its relative paths are relative to it)}; None when ``main`` was called from Python."""
    if "argv" not in _COMMAND:
        return None
    argv, spec = _COMMAND["argv"], _COMMAND["main"]
    head = [sys.executable, "-m", spec.name] if spec is not None and spec.name else [sys.executable, argv[0]]
    return {"command": shlex.join(head + argv[1:]), "cwd": os.getcwd()}


def config(cls, args):
    """The typed config ``cls`` (a dataclass: ExtractConfig, SweepConfig, FinetuneConfig, LibraryConfig ...) from the
    parsed flags whose names are its fields."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def backbone_spec(args):
    """The :class:`utils.specs.BackboneSpec` the backbone flags (utils/cli/flags.add_backbone_args) name."""
    return load_spec(args.model_config, args.backbone, args.weights, args.layer, args.pooling)

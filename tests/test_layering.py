"""The code's layering, read from the source (ast), function-local imports included:

* the project's import graph has no cycle;
* below the edge (utils/ but utils/cli and utils/compat) nothing imports argparse or takes the parsed flags (a
  parameter named ``args``, ``args.<flag>``, a ``Namespace``);
* utils/cli and utils/compat are imported only by the stage scripts (and cli by scripts/*.py); they never import each
  other;
* no private name (``_name``) is imported from, or read on, another project module;
* function-local imports are only for third-party packages (the heavy optional ones), never for a project module;
* no stage script imports another one (to call its ``main``); no runner calls the library with ``python -c``;
* no module is over 600 lines.

Each rule is checked against a synthetic source tree that breaks it, and against a copy of this checkout with a
violation planted, so the test can fail.
"""
import ast
import os
import re
import shutil

import pytest

from conftest import REPO

LIMIT = 600
EDGE = ("utils.cli", "utils.compat")
SCRIPT_PACKAGES = ("concept_extractor", "IP_training", "scripts")
SCRIPT_FILES = ("iis_computing", "explain")
SKIP_DIRS = {".git", ".venv", "outputs", "data", "datasets", "__pycache__", "concept_library", "model_configs"}
LIBRARY_SPELLING = re.compile(r"""-c\s+["'][^"']*\b(?:import|from)\s+(?:utils|concept_extractor|IP_training)\b""")


def python_files(root):
    """{module name: path} of every .py file of the checkout at ``root``."""
    out = {}
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS and not x.startswith("."))
        for f in sorted(files):
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), root)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(d, f)
    return out


def is_library(name):
    return name == "utils" or name.startswith("utils.")


def is_script(name):
    return name in SCRIPT_FILES or name.split(".")[0] in SCRIPT_PACKAGES


def in_edge(name):
    return any(name == e or name.startswith(e + ".") for e in EDGE)


def project_imports(name, path, known):
    """[(imported project module, imported names, line, function-local?)] of module ``name``."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    is_pkg = path.endswith("__init__.py")
    local_nodes = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f) if n is not f}
    out = []
    for node in ast.walk(tree):
        local = id(node) in local_nodes
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in known or a.name.split(".")[0] in {k.split(".")[0] for k in known}:
                    out.append((a.name, [], node.lineno, local))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = name.split(".") if is_pkg else name.split(".")[:-1]
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module
            if base not in known and not any(k.startswith(base + ".") for k in known):
                continue
            names = [a.name for a in node.names]
            subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in known]
            out.append((base, [n for n in names if f"{base}.{n}" not in known], node.lineno, local))
            out += [(s, [], node.lineno, local) for s in subs]
    return out, tree


def find_cycle(graph):
    """One import cycle of ``graph`` ({module: set of modules}) as a list, or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None
    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def namespace_uses(tree):
    """Lines where a module takes or reads the parsed flags."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            a = node.args
            if any(p.arg == "args" for p in a.posonlyargs + a.args + a.kwonlyargs):
                out.append((node.lineno, "a parameter named args"))
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "args":
            out.append((node.lineno, f"args.{node.attr}"))
        elif (isinstance(node, ast.Name) and node.id == "Namespace") or \
                (isinstance(node, ast.Attribute) and node.attr == "Namespace"):
            out.append((node.lineno, "Namespace"))
    return out


def module_aliases(tree, name, known):
    """Names bound in a module to project modules (``from utils import store`` binds store)."""
    bound = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in known:
                    bound[a.asname or a.name.split(".")[0]] = a.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")[:-1] if not known.get(name, "").endswith("__init__.py") else name.split(".")
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            for a in node.names:
                if f"{base}.{a.name}" in known:
                    bound[a.asname or a.name] = f"{base}.{a.name}"
    return bound


def violations(root):
    """Every breach of the rules above in the checkout at ``root``, one line each."""
    known = python_files(root)
    bad, graph = [], {}
    for name, path in sorted(known.items()):
        rel = os.path.relpath(path, root)
        n_lines = len(open(path, encoding="utf-8").read().splitlines())
        if n_lines > LIMIT:
            bad.append(f"{rel}: {n_lines} lines, over {LIMIT}")
        if name.split(".")[0] in ("tests", "bench"):
            continue
        imported, tree = project_imports(name, path, known)
        graph[name] = set()
        for target, names, line, local in imported:
            if target.split(".")[0] in ("tests", "bench"):
                continue
            graph[name].add(target)
            parts = target.split(".")           # importing a submodule runs its packages first
            for i in range(1, len(parts)):
                pkg = ".".join(parts[:i])
                if pkg in known and not (name == pkg or name.startswith(pkg + ".")):
                    graph[name].add(pkg)
            where = f"{rel}:{line}"
            if local:
                bad.append(f"{where}: function-local import of the project module {target}")
            if target == "utils.compat" and not is_script(name):
                bad.append(f"{where}: {name} imports utils.compat (only the stage scripts opt into the dialect)")
            if (target == "utils.cli" or target.startswith("utils.cli.")) and not (is_script(name) or
                                                                                  in_edge(name)):
                bad.append(f"{where}: {name} imports {target} (only scripts use the command-line edge)")
            if name.startswith("utils.compat") and target.startswith("utils.cli") or \
                    name.startswith("utils.cli") and target.startswith("utils.compat"):
                bad.append(f"{where}: {name} imports {target} (cli and compat stay apart)")
            if is_script(name) and is_script(target) and target != name:
                bad.append(f"{where}: the script {name} imports the script {target} (call the library instead)")
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    bad.append(f"{where}: imports the private name {n} from {target}")
        bound = module_aliases(tree, name, known)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound and \
                    node.attr.startswith("_") and not node.attr.startswith("__"):
                bad.append(f"{rel}:{node.lineno}: reads the private name {node.attr} of {bound[node.value.id]}")
        if is_library(name) and not in_edge(name):
            for node in ast.walk(tree):
                if isinstance(node, ast.Import) and any(a.name == "argparse" for a in node.names) or \
                        isinstance(node, ast.ImportFrom) and node.module == "argparse":
                    bad.append(f"{rel}:{node.lineno}: imports argparse below the command-line edge")
            for line, what in namespace_uses(tree):
                bad.append(f"{rel}:{line}: takes the parsed flags below the command-line edge ({what})")
    cycle = find_cycle(graph)
    if cycle:
        bad.append("import cycle: " + " -> ".join(cycle))
    runners = os.path.join(root, "scripts")
    for f in sorted(os.listdir(runners)) if os.path.isdir(runners) else []:
        if f.endswith(".sh"):
            for i, line in enumerate(open(os.path.join(runners, f), encoding="utf-8").read().splitlines()):
                if LIBRARY_SPELLING.search(line):
                    bad.append(f"scripts/{f}:{i + 1}: calls the library with python -c (give it a script)")
    return bad


def test_this_checkout_keeps_its_layers():
    assert violations(REPO) == []


# ---------------------------------------------------------------------------------------------------------------------
# The checker can fail: synthetic trees, each breaking one rule
# ---------------------------------------------------------------------------------------------------------------------
def tree(tmp_path, files):
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    for pkg in ("utils", "utils/cli", "concept_extractor"):
        if (tmp_path / pkg).is_dir() and not (tmp_path / pkg / "__init__.py").exists():
            (tmp_path / pkg / "__init__.py").write_text("")
    return str(tmp_path)


CLEAN = {"utils/errors.py": "class UserError(Exception):\n    pass\n",
         "utils/store.py": "from .errors import UserError\n\n\ndef read(path):\n    raise UserError(path)\n",
         "utils/cli/__init__.py": "import argparse\nfrom ..errors import UserError\n\n\ndef run(main, parser):\n"
                                  "    main(parser.parse_args())\n",
         "utils/compat.py": "from .errors import UserError\n\n\ndef dialect(f):\n    return None\n",
         "concept_extractor/stage.py": "from utils import cli, compat, store\n\n\ndef main(args):\n"
                                       "    store.read(args.out)\n",
         "scripts/run.sh": "python -m concept_extractor.stage --out o\n"}


@pytest.mark.parametrize("files,expected", [
    ({}, None),
    ({"utils/store.py": "from . import data\n", "utils/data.py": "def f():\n    from . import store\n"},
     "utils.data -> utils.store"),
    ({"utils/data.py": "def f():\n    from . import store\n"}, "function-local import of the project module"),
    ({"utils/data.py": "import argparse\n"}, "imports argparse below the command-line edge"),
    ({"utils/data.py": "def load(args):\n    return 1\n"}, "takes the parsed flags below the command-line edge (a "
                                                          "parameter named args)"),
    ({"utils/data.py": "def load(x):\n    return x.args.out if 0 else args.out\n"}, "(args.out)"),
    ({"utils/data.py": "from .compat import dialect\n"}, "utils.data imports utils.compat"),
    ({"utils/data.py": "from . import cli\n"}, "utils.data imports utils.cli"),
    ({"utils/compat.py": "from .cli import run\n"}, "cli and compat stay apart"),
    ({"utils/data.py": "from .store import _tmp\n"}, "imports the private name _tmp from utils.store"),
    ({"utils/data.py": "from . import store\n\n\ndef f():\n    return store._tmp\n"},
     "reads the private name _tmp of utils.store"),
    ({"concept_extractor/other.py": "from concept_extractor import stage\n\n\ndef main(a):\n    stage.main(a)\n"},
     "the script concept_extractor.other imports the script concept_extractor.stage"),
    ({"scripts/run.sh": "python -c \"from utils.store import read; read('x')\"\n"},
     "calls the library with python -c"),
    ({"utils/data.py": "x = 1\n" * (LIMIT + 1)}, f"{LIMIT + 1} lines, over {LIMIT}"),
])
def test_each_rule_catches_its_breach(tmp_path, files, expected):
    found = violations(tree(tmp_path, {**CLEAN, **files}))
    if expected is None:
        assert found == []
    else:
        assert any(expected in v for v in found), found


def test_a_violation_planted_in_a_copy_of_this_checkout_is_found(tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(REPO, root, ignore=shutil.ignore_patterns(*SKIP_DIRS, ".*", "*.egg-info"))
    with open(root / "utils" / "store.py", "a") as f:
        f.write("\n\ndef planted(args):\n    from .extraction import ExtractConfig\n    return ExtractConfig(args.n)\n")
    found = violations(str(root))
    assert any("utils/store.py" in v and "function-local import of the project module utils.extraction" in v
               for v in found), found
    assert any("utils/store.py" in v and "(args.n)" in v for v in found), found
    assert any(v.startswith("import cycle:") and "utils.store -> utils.extraction" in v for v in found), found

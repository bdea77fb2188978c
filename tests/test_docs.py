"""README.md and docs/ against the code: the tables that mirror code are rendered from it (or checked row by row), every
command block names scripts that exist and only flags they accept, every `python -m X` answers --help, every
relative link resolves. Fast: it parses markdown and builds parsers; it never runs the pipeline.

A failing table check prints the table the code gives, ready to paste into the page it names.
"""
import contextlib
import dataclasses
import functools
import glob
import importlib
import io
import os
import re
import shlex
import subprocess
import sys

import pytest
import yaml

from conftest import REPO
from utils import compat
from utils import data, masks, specs, sweep
from utils.heads import SPARSITY_GRID

DOCS = os.path.join(REPO, "docs")
PAGES = [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(DOCS, "*.md")))
README_MAX_LINES = 250
# the README's layout and utils/ paths follow the refactor branch's names (utils/errors.py, utils/compat.py, ...)
LAYOUT_LANDED = os.path.isfile(os.path.join(REPO, "utils", "errors.py"))


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def rel(path):
    return os.path.relpath(path, REPO)


def page(name):
    return read(os.path.join(DOCS, name))


# ---------------------------------------------------------------------------------------------------------------------
# markdown
# ---------------------------------------------------------------------------------------------------------------------
FENCE = re.compile(r"^([ \t]*)```([\w-]*)[ \t]*\n(.*?)^[ \t]*```[ \t]*$", re.S | re.M)


def fenced_blocks(text):
    """(language, body) of every fenced block, indentation of an indented fence removed."""
    out = []
    for m in FENCE.finditer(text):
        indent = len(m.group(1))
        body = "\n".join(line[indent:] if line[:indent].isspace() else line for line in m.group(3).splitlines())
        out.append((m.group(2), body))
    return out


def without_fences(text):
    return FENCE.sub("", text)


def tables(text):
    """Every markdown table: a list of rows, each a list of stripped cells (header first, the |---| row dropped)."""
    out, rows = [], []
    for line in text.splitlines() + [""]:
        s = line.strip()
        if s.startswith("|") and s.endswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", s[1:-1])]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                rows.append(cells)
        elif rows:
            out.append(rows)
            rows = []
    return out


def unquote(cell):
    return cell[1:-1] if cell.startswith("`") and cell.endswith("`") else cell


def slug(heading):
    """GitHub's anchor of a heading."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


# ---------------------------------------------------------------------------------------------------------------------
# scripts and their flags
# ---------------------------------------------------------------------------------------------------------------------
def module_of(path):
    """Dotted module name of a .py path relative to the repository root."""
    return os.path.splitext(os.path.normpath(path))[0].replace(os.sep, ".")


@functools.lru_cache(maxsize=None)
def parser_of(module):
    """The script's own parser (``get_args_parser()``), or None for a script that builds it inside ``main``."""
    mod = importlib.import_module(module)
    return mod.get_args_parser() if hasattr(mod, "get_args_parser") else None


OPTION = re.compile(r"(?<![\w-])--[a-zA-Z][\w-]*")


@functools.lru_cache(maxsize=None)
def help_of(argv):
    r = subprocess.run(list(argv), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{' '.join(argv)} failed:\n{r.stderr[-2000:]}"
    return r.stdout


@functools.lru_cache(maxsize=None)
def module_help(module):
    """What `python -m module --help` prints, in this process: ``main()`` of a script that builds its parser inside
    (the benches) runs with argv ``--help`` and must stop there with exit code 0."""
    p = parser_of(module)
    if p is not None:
        return p.format_help()
    out, argv = io.StringIO(), sys.argv
    sys.argv = [module, "--help"]
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
            importlib.import_module(module).main()
    finally:
        sys.argv = argv
    assert stop.value.code in (0, None), f"python -m {module} --help exited with {stop.value.code}"
    return out.getvalue()


def python_flags(module):
    """Every option string the script accepts: its parser's, or those its --help lists."""
    p = parser_of(module)
    if p is not None:
        return {s for a in p._actions for s in a.option_strings}
    return set(OPTION.findall(module_help(module)))


def original_flags(module):
    """The original code's flags the script also takes (compat's table)."""
    name = module.rsplit(".", 1)[-1]
    return {f for a in compat.ALIASES if name in a.scripts for f in a.flags}


def runner_help(path):
    """What a bash runner says about its flags: its --help where it parses flags, else its header comment (which is
    what --help prints for the runners that have one)."""
    src = read(os.path.join(REPO, path))
    if "parse_flags" in src:
        return help_of(("bash", path, "--help"))
    header = src.split("\nset -", 1)[0]
    return "\n".join(line.lstrip("#") for line in header.splitlines()[1:])


DELEGATES = re.compile(r"(?:flags|arguments|flag) go(?:es)? (?:unchanged )?to (\S+?\.(?:sh|py))\b", re.I)


@functools.lru_cache(maxsize=None)
def runner_flags(path):
    """Flags a runner's help lists, plus those of the script it hands the rest to ("extra flags go to X")."""
    text = runner_help(path)
    flags = set(OPTION.findall(text))
    for target in DELEGATES.findall(text):
        if target.endswith(".sh"):
            flags |= runner_flags(target)
        else:
            module = module_of(target)
            flags |= python_flags(module) | original_flags(module)
    return frozenset(flags)


# ---------------------------------------------------------------------------------------------------------------------
# commands in bash blocks
# ---------------------------------------------------------------------------------------------------------------------
SHELL_OK = {"cd", "source", "export", "echo", "ls", "cat", "cp", "mkdir", "pip"}   # nothing of ours to check
SEPARATORS = {"&&", "||", ";", "|", "&"}


def commands(body):
    """(cwd relative to the repository, argv) of every simple command in a bash block, in order; `cd` moves cwd."""
    cwd, out = ".", []
    for line in body.replace("\\\n", " ").splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        argv = []
        for tok in list(lex) + [";"]:
            if tok not in SEPARATORS:
                argv.append(tok)
                continue
            while argv and re.fullmatch(r"[A-Za-z_]\w*=.*", argv[0]):   # VAR=value prefixes
                argv.pop(0)
            if argv:
                out.append((cwd, argv))
                if argv[0] == "cd":
                    cwd = os.path.normpath(os.path.join(cwd, argv[1] if len(argv) > 1 else "."))
            argv = []
    return out


def target(cwd, argv):
    """('python', module, args) or ('bash', path, args) for a command of ours, ('shell', name, args) for the rest."""
    prog, rest = os.path.basename(argv[0]), argv[1:]
    if prog == "torchrun":
        i = rest.index("-m") if "-m" in rest else next(i for i, t in enumerate(rest) if t.endswith(".py"))
        prog, rest = "python", rest[i:]
    if prog in ("python", "python3"):
        if rest[0] == "-m":
            return "python", rest[1], rest[2:]
        return "python", module_of(os.path.join(cwd, rest[0])), rest[1:]
    if prog == "bash":
        return "bash", os.path.normpath(os.path.join(cwd, rest[0])), rest[1:]
    return "shell", prog, rest


def doc_commands():
    """Every command of every bash block in README.md and docs/: (page, cwd, argv)."""
    out = []
    for path in PAGES:
        for lang, body in fenced_blocks(read(path)):
            if lang in ("bash", "sh", "shell"):
                out += [(rel(path), cwd, argv) for cwd, argv in commands(body)]
    return out


def flags_in(args):
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


def check_python_command(module, args):
    """Problems with one `python -m module args` command: unknown flags, or (our own flags only) a parse error."""
    accepted = python_flags(module)
    originals = original_flags(module)
    problems = [f"{f} is not a flag of {module}" for f in flags_in(args) if f not in accepted | originals]
    if problems or any(f in originals and f not in accepted for f in flags_in(args)):
        return problems   # the original's dialect is translated before parsing (tests/test_newcomer.py runs it)
    p = parser_of(module)
    if p is not None:
        try:
            p.parse_args(args)
        except SystemExit:
            problems.append(f"{module}'s parser refuses {shlex.join(args)}")
    return problems


# ---------------------------------------------------------------------------------------------------------------------
# tables rendered from the code
# ---------------------------------------------------------------------------------------------------------------------
K_EXAMPLE = 200
KEEP_RULE = {"round": "round((1 − s)·K), at least 1",
             "reference": "K − ⌊K·s⌋ − 1: every \\|a\\| strictly above the ⌊K·s⌋-th smallest"}
INIT = {"uniform": "`uniform`: nn.Linear's default, weight and bias U(±1/√fan_in)",
        "trunc_normal_0.02": "`trunc_normal_0.02`: the original's, weight N(0, 0.02²), bias 0"}
THRESHOLD_GRADIENT = {"round": "none (a plain mask)",
                      "reference": "the original's: an element at the threshold, though dropped, passes 0.5·\\|a\\| "
                                   "times its gradient"}
SELECTION = {"holdout": "a dev split held out of train (`--holdout_fraction`)", "val": "val, the split it reports"}
STANDARD_PROBE = {"converged": "logistic regression on train-standardised features, solved to its optimum (L-BFGS, "
                            "float64), weight decay chosen where the epoch is ([below](#the-standard-probe))",
                  "adam": "trained like the concept heads (Adam, the lr grid, epochs and batch above) on the raw "
                          "features"}
PROTOCOL_NAME = {"iis": "`iis` (this project's)", "reference": "`reference` (the original code's)"}


def num(v):
    return f"{v:g}" if isinstance(v, float) else str(v)


def protocol_table():
    """docs/protocols.md's table: what each protocol of utils/sweep.py PROTOCOLS fixes, and the flag that overrides."""
    names = list(sweep.PROTOCOLS)
    presets = [sweep.PROTOCOLS[n] for n in names]
    assert all(set(p) == {"keep_rule", "init", "lrs", "lr_decay", "batch_size", "select_on", "standard_probe"}
               for p in presets), \
        "PROTOCOLS gained or lost a setting: add its row to protocol_table() and to docs/protocols.md"

    def keep(p):
        counts = masks.keep_counts(SPARSITY_GRID, K_EXAMPLE, p["keep_rule"])
        return f"{KEEP_RULE[p['keep_rule']]} ({', '.join(map(str, counts))})"

    rows = [("concepts kept at sparsity s, of K (K = 200 on the default grid)", keep, "—"),
            ("gradient at the threshold", lambda p: THRESHOLD_GRADIENT[p["keep_rule"]], "—"),
            ("initial weights", lambda p: INIT[p["init"]], "—"),
            ("lr grid (Adam)", lambda p: ", ".join(num(x) for x in p["lrs"]), "`--lrs`"),
            ("lr after every epoch", lambda p: "× 1 (constant)" if p["lr_decay"] == 1 else f"× {num(p['lr_decay'])}",
             "`--lr_decay`"),
            ("batch size", lambda p: num(p["batch_size"]), "`--batch_size`"),
            ("epoch and lr chosen on", lambda p: SELECTION[p["select_on"]], "`--select_on`"),
            ("standard probe (the IIS's denominator)", lambda p: STANDARD_PROBE[p["standard_probe"]], "—")]
    lines = ["| | " + " | ".join(PROTOCOL_NAME[n] for n in names) + " | set otherwise by |",
             "|---|" + "---|" * len(names) + "---|"]
    lines += [f"| {label} | " + " | ".join(cell(p) for p in presets) + f" | {flag} |" for label, cell, flag in rows]
    return "\n".join(lines)


def model_config_table():
    """docs/backbones.md's table: one row per model_configs/*.yaml (a missing key shows BackboneSpec's default)."""
    defaults = {f.name: f.default for f in dataclasses.fields(specs.BackboneSpec)
                if f.default is not dataclasses.MISSING}
    cols = ["name", "source", "arch", "weights", "layer", "pooling", "layout"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for path in sorted(glob.glob(os.path.join(REPO, "model_configs", "*.yaml"))):
        with open(path) as f:
            cfg = yaml.safe_load(f)
        lines.append("| " + " | ".join(f"`{cfg.get(c, defaults.get(c, ''))}`" for c in cols) + " |")
    return "\n".join(lines)


def assert_rendered(rendered, name):
    assert rendered in page(name), f"docs/{name} should hold this table (the code's):\n\n{rendered}\n"


# ---------------------------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------------------------
def test_protocol_table_is_the_codes():
    assert_rendered(protocol_table(), "protocols.md")


def test_protocol_table_renders_the_presets():
    # known answers, so a renderer that ignored PROTOCOLS could not pass
    t = protocol_table()
    assert "(200, 180, 140, 100, 60, 20, 10, 4)" in t and "(199, 179, 139, 99, 59, 19, 9, 3)" in t
    assert "| epoch and lr chosen on | a dev split held out of train (`--holdout_fraction`) | val, the split it " \
           "reports | `--select_on` |" in t
    assert "| standard probe (the IIS's denominator) | logistic regression on train-standardised" in t
    assert "| initial weights | `uniform`: nn.Linear's default, weight and bias U(±1/√fan_in) | `trunc_normal_0.02`" in t
    for flag in ("--lrs", "--lr_decay", "--batch_size", "--select_on", "--holdout_fraction"):
        assert flag in python_flags("IP_training.IP_Prototype_training")


def test_model_config_table_is_the_codes():
    t = model_config_table()
    assert "| `resnet50` | `torchvision` | `resnet50` | `IMAGENET1K_V1` | `avgpool` | `auto` | `nchw` |" in t
    assert_rendered(t, "backbones.md")


def test_dataset_names_and_image_extensions_are_the_codes():
    text = page("backbones.md")
    assert ", ".join(f"`{n}`" for n in data.BUILTIN) in text
    assert ", ".join(e.lstrip(".") for e in data.IMAGE_EXTS) in re.sub(r"\s+", " ", text)


def test_alias_table_is_the_codes():
    assert_rendered(compat.markdown_table(), "original.md")


def test_default_tables_match_the_parsers():
    """Rows `| script | flag | default | … |` anywhere in the docs: the script's parser has that flag, that default."""
    modules = {os.path.splitext(os.path.basename(p))[0]: module_of(rel(p))
               for folder in ("", "concept_extractor", "IP_training")
               for p in glob.glob(os.path.join(REPO, folder, "[!_]*.py"))}
    seen = 0
    for path in PAGES:
        for t in tables(read(path)):
            if [c.lower() for c in t[0][:3]] != ["script", "flag", "default"]:
                continue
            for script, flag, default, *_ in t[1:]:
                p = parser_of(modules[script])
                action = next((a for a in p._actions if unquote(flag) in a.option_strings), None)
                assert action is not None, f"{rel(path)}: {script} has no flag {flag}"
                d = action.default
                shown = " ".join(num(x) for x in d) if isinstance(d, (list, tuple)) else num(d)
                assert unquote(default) == shown, f"{rel(path)}: {script} {flag} defaults to {shown}, not {default}"
                seen += 1
    assert seen >= 20   # the tables are there (method.md, finetune.md, text.md)


def test_every_command_block_names_scripts_and_flags_that_exist():
    cmds = doc_commands()
    assert len(cmds) >= 30
    problems = []
    for where, cwd, argv in cmds:
        kind, name, args = target(cwd, argv)
        if kind == "python":
            if importlib.util.find_spec(name) is None:
                problems.append(f"{where}: no module {name} ({shlex.join(argv)})")
                continue
            problems += [f"{where}: {p}" for p in check_python_command(name, args)]
        elif kind == "bash":
            if not os.path.isfile(os.path.join(REPO, name)):
                problems.append(f"{where}: no script {name}")
                continue
            problems += [f"{where}: {f} is not a flag of {name} (its --help)"
                         for f in flags_in(args) if f not in runner_flags(name)]
        elif name not in SHELL_OK:
            problems.append(f"{where}: a command this test does not know how to check: {shlex.join(argv)}")
    assert not problems, "\n".join(problems)


def test_the_command_checker_catches_a_wrong_flag_and_a_wrong_default():
    # a misspelt flag, a refused value, a missing required flag and an unknown runner flag are all caught
    assert check_python_command("IP_training.IP_Prototype_training", ["--select_on", "dev"])
    assert check_python_command("iis_computing", ["r", "--bootstraps", "10"])
    assert check_python_command("IP_training.IP_Prototype_training", ["--train_features", "t"])
    assert not check_python_command("iis_computing", ["r", "--bootstrap", "10"])
    assert "--element_seed" in runner_flags("scripts/run_pipeline.sh")
    assert "--models" in runner_flags("scripts/compare_backbones.sh")
    assert "--element_seed" in runner_flags("scripts/compare_backbones.sh")   # handed on to run_pipeline.sh
    assert "--bogus" not in runner_flags("scripts/run_pipeline.sh")
    assert commands("cd a && python x.py --f 1 \\\n  --g 2  # note\nVAR=1 bash s.sh --h") == \
        [(".", ["cd", "a"]), ("a", ["python", "x.py", "--f", "1", "--g", "2"]), ("a", ["bash", "s.sh", "--h"])]


def test_every_python_module_named_answers_help():
    """`python -m X` anywhere in the text (prose and tables too): X exists and its --help works."""
    named = set()
    for path in PAGES:
        named |= set(re.findall(r"python -m ([A-Za-z_][\w.]*)", read(path)))
    assert {"concept_extractor.segment_extractor", "IP_training.IP_Prototype_training", "bench.bench_heads"} <= named
    for module in sorted(named):
        assert module_help(module).startswith("usage:"), module

CHECKED_FOLDERS = "bench|tests|scripts|model_configs|IP_training|concept_extractor|docs" + ("|utils" if LAYOUT_LANDED else "")


def test_every_file_named_in_code_spans_exists():
    """Scripts and files of this repository named in `code` (python X.py, bash X.sh, bench/..., tests/...)."""
    missing = []
    for path in PAGES:
        for span in re.findall(r"`([^`\n]+)`", without_fences(read(path))):
            for m in re.findall(r"(?:python|bash) ((?:[\w-]+/)*[\w-]+\.(?:py|sh))", span):
                if not os.path.isfile(os.path.join(REPO, m)):
                    missing.append(f"{rel(path)}: {span}")
            if re.fullmatch(rf"(?:{CHECKED_FOLDERS})/[\w./-]+", span) \
                    and "<" not in span and "*" not in span and not os.path.exists(os.path.join(REPO, span)):
                missing.append(f"{rel(path)}: {span}")
    assert not missing, "\n".join(missing)


def test_relative_links_resolve():
    broken = []
    for path in PAGES:
        text = read(path)
        for link in re.findall(r"\]\(([^)\s]+)\)", without_fences(text)):
            if re.match(r"[a-z]+://", link):
                continue
            file, _, anchor = link.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
            if not os.path.exists(dest):
                broken.append(f"{rel(path)}: {link}")
            elif anchor and dest.endswith(".md"):
                anchors = {slug(h) for h in re.findall(r"^#+ (.+)$", without_fences(read(dest)), re.M)}
                if anchor not in anchors:
                    broken.append(f"{rel(path)}: {link} (no such heading)")
    assert not broken, "\n".join(broken)


def test_every_docs_page_is_in_the_index():
    index = page("README.md")
    for path in PAGES[1:]:
        name = os.path.basename(path)
        if name != "README.md":
            assert f"]({name})" in index, f"docs/README.md does not link {name}"


def test_readme_is_a_front_door():
    text = read(os.path.join(REPO, "README.md"))
    assert len(text.splitlines()) <= README_MAX_LINES
    # the two set-up commands CI runs, as CI runs them
    ci = read(os.path.join(REPO, ".ci", "run"))
    for cmd in ("bash scripts/demo.sh", "bash scripts/test.sh"):
        assert cmd in ci and re.search(rf"^{re.escape(cmd)}\b", text, re.M)
    image = re.search(r"!\[[^\]]*\]\((docs/[^)]+\.png)\)", text)
    assert image and os.path.getsize(os.path.join(REPO, image.group(1))) < 150_000


def test_every_block_is_tagged():
    """An untagged fence would escape the command check."""
    for path in PAGES:
        for lang, body in fenced_blocks(read(path)):
            assert lang in ("bash", "text", "json", "python"), f"{rel(path)}: a ``` block without a known language"



@pytest.mark.skipif(not LAYOUT_LANDED, reason="the README's layout is the refactor branch's (utils/errors.py, "
                                              "utils/compat.py, ...); checked once it is merged")
def test_readme_layout_tree_is_the_tree():
    """Every line of the README's layout names something that exists, and a folder whose files are listed has every
    one of its modules listed (utils/ and its packages, the stage-script folders; private _modules may be left out)."""
    assert layout_problems(read(os.path.join(REPO, "README.md"))) == []


def layout_problems(readme, root=REPO):
    tree = next(body for lang, body in fenced_blocks(readme) if lang == "text" and "utils/" in body)
    listed, stack = {}, []          # path -> listed children (for folders)
    for line in tree.splitlines():
        m = re.match(r"^( *)(\S+)", line)
        if not m:
            continue
        depth = len(m.group(1))
        while stack and stack[-1][0] >= depth:
            stack.pop()
        path = (stack[-1][1] if stack else "") + m.group(2)
        listed[path] = set()
        if stack:
            listed[stack[-1][1]].add(path)
        if path.endswith("/"):
            stack.append((depth, path))
    problems = [f"{p} does not exist" for p in listed if not os.path.exists(os.path.join(root, p))]
    for folder, children in listed.items():
        if folder.endswith("/") and children and os.path.isdir(os.path.join(root, folder)):
            for f in sorted(os.listdir(os.path.join(root, folder))):
                full = folder + f + ("/" if os.path.isdir(os.path.join(root, folder, f)) else "")
                is_module = f.endswith(".py") and not f.startswith("_")
                is_package = full.endswith("/") and os.path.isfile(os.path.join(root, full, "__init__.py"))
                if (is_module or is_package) and full not in children:
                    problems.append(f"{full} is missing from the layout")
    return problems


def test_layout_check_catches_a_missing_and_a_stale_module(tmp_path):
    for f in ("utils/a.py", "utils/b.py", "utils/pkg/__init__.py", "utils/pkg/c.py", "bench/x.py"):
        os.makedirs(tmp_path / os.path.dirname(f), exist_ok=True)
        (tmp_path / f).write_text("")
    good = "```text\nutils/   lib\n  a.py  A\n  b.py  B\n  pkg/  P\n    c.py  C\nbench/  benches\n```\n"
    assert layout_problems(good, str(tmp_path)) == []
    assert layout_problems(good.replace("  b.py  B\n", ""), str(tmp_path)) == ["utils/b.py is missing from the layout"]
    assert layout_problems(good.replace("c.py", "d.py"), str(tmp_path)) == \
        ["utils/pkg/d.py does not exist", "utils/pkg/c.py is missing from the layout"]


def test_the_background_rule_is_described_with_the_code_thresholds():
    """docs/reports.md states is_background's thresholds as utils/elements.py has them."""
    from utils import elements as el
    text = " ".join(read(os.path.join(DOCS, "reports.md")).split("**Mostly-background concepts.**")[1]
                    .split("\n\n")[0].split())
    for phrase in (f"at least {el.BACKGROUND_FILL_SHARE * 100:g} % of its pixels are the fill",
                   f"at least {el.BACKGROUND_CONSTANT * 100:g} % of its own pixels lie within {el.CONSTANT_TOLERANCE} "
                   f"grey levels", f"at least {el.BACKGROUND_DARK * 100:g} % of its own pixels are near-black, at or "
                   f"below grey {el.DARK_LEVEL}"):
        assert phrase in text, phrase

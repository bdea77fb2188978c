# Sourced by demo.sh and test.sh: create .venv if missing, (re)install requirements only when they changed, and
# install the project into it in editable mode.
# Usage: source scripts/_env.sh [extra requirement files...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ ! -x .venv/bin/python ]; then
  echo "[env] creating .venv"
  "${PYTHON:-python3}" -m venv .venv
fi
_install() {  # _install <stamp-name> <pip args...>: pip install once per distinct argument list
  local stamp a
  stamp=$(for a in "${@:2}"; do echo "$a"; if [ -f "$a" ]; then cat "$a"; fi; done | sha256sum | cut -c1-16)
  stamp=".venv/.installed-$1-$stamp"
  if [ ! -f "$stamp" ]; then
    echo "[env] pip install ${*:2}"
    .venv/bin/python -m pip install -q --disable-pip-version-check "${@:2}"
    touch "$stamp"
  fi
}
_install base -r requirements.txt
# The project itself, editable, so the stage scripts also run as files from any folder
# (python concept_extractor/segment_extractor.py). Its build backend is installed first, so the editable install
# needs no network (a fresh venv's bundled setuptools is too old to build editable wheels). Checked by importing, not
# by a stamp: a copied or moved .venv points at another checkout.
_install build "setuptools>=70.1"
if ! (cd / && "$ROOT/.venv/bin/python" -I -c 'import os, sys, utils, concept_extractor, IP_training as t
sys.exit(any(os.path.dirname(os.path.dirname(m.__file__)) != sys.argv[1] for m in (utils, concept_extractor, t)))' \
      "$ROOT") 2>/dev/null; then
  echo "[env] pip install -e . (editable)"
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e "$ROOT"
fi
export PATH="$ROOT/.venv/bin:$PATH"
export PYTHONUNBUFFERED=1

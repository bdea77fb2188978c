# Sourced by demo.sh and test.sh: create .venv if missing and (re)install requirements only when they changed.
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
export PATH="$ROOT/.venv/bin:$PATH"
export PYTHONUNBUFFERED=1

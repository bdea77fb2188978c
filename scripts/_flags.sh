# Sourced by the runners: parse_flags NAME... -- "$@" sets variable NAME from each "--NAME value" pair.
# Only the listed names are accepted; -h/--help prints the runner's header comment.
# PY is the interpreter: $PYTHON when set, else the project's .venv (made by scripts/demo.sh or scripts/test.sh)
# whether or not it is activated, else python3 from PATH.
_venv="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin/python"
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x "$_venv" ]; then PY=$_venv; else PY=python3; fi
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
parse_flags() {
  local allowed=" " name
  while [ "$1" != "--" ]; do allowed+="$1 "; shift; done
  shift
  while [ $# -gt 0 ]; do
    case "$1" in -h|--help) usage; exit 0 ;; esac
    name="${1#--}"
    if [ "${1:0:2}" != "--" ] || [[ "$allowed" != *" $name "* ]]; then
      echo "error: unknown flag $1 (see --help)" >&2; exit 2
    fi
    [ $# -ge 2 ] || { echo "error: $1 needs a value" >&2; exit 2; }
    printf -v "$name" '%s' "$2"
    shift 2
  done
}

#!/usr/bin/env bash
# Run the test suite in .venv (created on first use). Extra arguments go to pytest, e.g. -m "not slow".
#
#   bash scripts/test.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
_install test -r requirements-test.txt
# foolbox only for its 20 labelled ImageNet photos (tests read its data/ files; it is never imported)
_install foolbox --no-deps foolbox==3.3.4
python -m pytest "$@"

# Sourced by scripts/demo and scripts/test: make .venv (Python >= 3.11) and install into it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "error: Python 3.11 or newer is needed (found: $("$PY" --version 2>&1))" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv || {
    echo "error: cannot create a virtualenv; on Debian/Raspberry Pi OS: apt-get install python3-venv" >&2
    exit 1
  }
fi
venv_install() {
  # $1: the extras to install, e.g. "test" or "demo"
  local stamp=".venv/.installed-$1" spec="."
  [ -n "$1" ] && spec=".[$1]"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$spec"
    touch "$stamp"
  fi
}

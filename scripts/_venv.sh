# Sourced by scripts/demo and scripts/test: the system packages they need (apt, when run as
# root or with password-less sudo; otherwise the one command to run), then .venv
# (Python >= 3.11) with the agent installed into it. Each step says what it does.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
WHO=$(basename "$0")

step() { printf '[%s] %s\n' "$WHO" "$*"; }

have_mosquitto() { command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; }

missing_packages() {
  # the Debian packages among $@ (mosquitto socat openssl systemd python3-venv) not installed here
  local p
  for p in "$@"; do
    case $p in
    mosquitto) have_mosquitto || echo mosquitto ;;
    systemd) command -v systemd-analyze >/dev/null 2>&1 || echo systemd ;;
    python3-venv) "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1 || echo python3-venv ;;
    *) command -v "$p" >/dev/null 2>&1 || echo "$p" ;;
    esac
  done
}

system_packages() {
  # $1: "required" (stop when they cannot be installed) or "optional"; then the packages.
  # Installs the missing ones with apt-get when this runs as root or sudo needs no
  # password; otherwise prints the command that does and returns 1.
  local need=$1 missing sudo=()
  shift
  mapfile -t missing < <(missing_packages "$@")
  [ ${#missing[@]} -gt 0 ] || return 0
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo=(sudo -n); else sudo=(none); fi
  fi
  if ! command -v apt-get >/dev/null 2>&1 || [ "${sudo[0]:-}" = none ]; then
    if command -v apt-get >/dev/null 2>&1; then
      step "needs ${missing[*]}; install with: sudo apt-get install -y ${missing[*]}"
    else
      step "needs ${missing[*]}: install them with this system's package manager"
    fi
    [ "$need" = optional ] || exit 1
    return 1
  fi
  step "installing ${missing[*]} (apt-get update, apt-get install)"
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
  step "installed ${missing[*]}"
}

venv_create() {
  if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "error: Python 3.11 or newer is needed (found: $("$PY" --version 2>&1)); Raspberry Pi OS Bookworm and Debian 12 or newer have it" >&2
    exit 1
  fi
  if [ ! -x .venv/bin/python ]; then
    step "creating .venv ($("$PY" --version))"
    "$PY" -m venv .venv || {
      echo "error: cannot create a virtualenv; on Debian/Raspberry Pi OS: sudo apt-get install -y python3-venv" >&2
      exit 1
    }
  fi
}

venv_install() {
  # $1: the extras to install, e.g. "test" or "demo"
  local stamp=".venv/.installed-$1" spec="." started=$SECONDS
  [ -n "$1" ] && spec=".[$1]"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    step "installing the agent${1:+ with its $1 extras} and dependencies into .venv (pip; under a minute the first time)"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$spec"
    touch "$stamp"
    step "installed into .venv in $((SECONDS - started)) s"
  fi
}
